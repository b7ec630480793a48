"""Bit packing of int4 weights: every layout this toolkit writes, and its inverse.

All packers take signed integers ``q`` int8 ``[out, in]`` in ``[-8, 7]`` and
store them unsigned as ``u = q + 8`` (the symmetric zero point 8), eight
4-bit values per int32 word, **low nibble first**: value ``j`` of a word sits
in bits ``4j .. 4j+3``. The layouts differ in which axis is packed:

``pack_int4_along_input`` — native ``NAME.qweight`` and compressed-tensors
    ``pack-quantized`` ``NAME.weight_packed``: int32 ``[out, in/8]``, word
    ``[o, k]`` holds inputs ``8k .. 8k+7`` of row ``o``.

``pack_int4_gptq`` — AutoGPTQ v1 ``NAME.qweight``: int32 ``[in/8, out]``,
    word ``[k, o]`` holds inputs ``8k .. 8k+7`` of output ``o``
    (the transpose of the layout above).

``gptq_qzeros`` — AutoGPTQ v1 ``NAME.qzeros``: int32 ``[n_groups, out/8]``,
    packed along the output axis, storing ``zero - 1 = 7`` (the v1 off-by-one),
    so every word of a symmetric int4 checkpoint is ``0x77777777``.

Words are reinterpreted as signed int32 (a set bit 31 makes them negative),
which is what safetensors stores and what vLLM's loaders expect.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)  # value j at bits 4j


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> the same bits as int32."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _pack_last_dim(u: torch.Tensor) -> torch.Tensor:
    """Unsigned nibbles ``[..., n]`` (n % 8 == 0) -> int32 words ``[..., n/8]``, low nibble first."""
    if u.shape[-1] % 8:
        raise ValueError(f"cannot pack {u.shape[-1]} int4 values into int32 words (needs a multiple of 8)")
    u = u.to(torch.int64).reshape(*u.shape[:-1], u.shape[-1] // 8, 8)
    return _to_int32((u << _SHIFTS).sum(dim=-1))


def _unpack_last_dim(words: torch.Tensor) -> torch.Tensor:
    """int32 words ``[..., k]`` -> unsigned nibbles int64 ``[..., 8k]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    u = (w.unsqueeze(-1) >> _SHIFTS) & 0xF
    return u.reshape(*words.shape[:-1], words.shape[-1] * 8)


def _check_int4(q: torch.Tensor) -> None:
    if q.dim() != 2:
        raise ValueError(f"expected a 2-D integer weight, got shape {tuple(q.shape)}")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise ValueError("int4 values must lie in [-8, 7]")


def pack_int4_along_input(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in]`` -> int32 ``[out, in/8]`` (native / compressed-tensors)."""
    _check_int4(q)
    return _pack_last_dim(q.to(torch.int64) + 8)


def unpack_int4_along_input(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_along_input`: int8 ``[out, in]``."""
    return (_unpack_last_dim(packed) - 8).to(torch.int8)


def pack_int4_gptq(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in]`` -> AutoGPTQ v1 ``qweight`` int32 ``[in/8, out]``."""
    _check_int4(q)
    return _pack_last_dim(q.to(torch.int64) + 8).t().contiguous()


def unpack_int4_gptq(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_gptq`: int8 ``[out, in]``."""
    return unpack_int4_along_input(qweight.t().contiguous())


def gptq_qzeros(n_groups: int, out_features: int) -> torch.Tensor:
    """AutoGPTQ v1 ``qzeros`` of a symmetric int4 weight: int32 ``[n_groups, out/8]`` of ``zero - 1 = 7``."""
    u = torch.full((n_groups, out_features), 7, dtype=torch.int64)
    return _pack_last_dim(u)


def unpack_gptq_qzeros(qzeros: torch.Tensor) -> torch.Tensor:
    """Stored zero points (``zero - 1``) int64 ``[n_groups, out]``."""
    return _unpack_last_dim(qzeros)
