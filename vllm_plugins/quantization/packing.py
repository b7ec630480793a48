"""Tensor layouts of the ``native`` format, as pure torch functions.

w4a16: ``qweight`` int32 ``[out, ceil(in/8)]``; element ``i = 8*k + j`` of a
row sits in bits ``4j..4j+3`` of word ``k`` (low nibble first), stored as
``q + 8`` with ``q`` in [-8, 7]. ``scales`` ``[out, n_groups]``. ``g_idx``
int32 ``[in]`` when act_order. ``W[o, i] = q[o, i] * scales[o, g(i)]``.

w8a8: ``qweight`` int8 ``[out, in]``, ``scales`` float32 ``[out, 1]``;
activations are quantized per token, symmetric, at run time.
"""

from __future__ import annotations

import torch

PACK_FACTOR = 8  # int4 values per int32
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q`` int in [-8, 7], ``[out, in]`` -> int32 ``[out, ceil(in/8)]`` (zero-padded)."""
    if q.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    out_f, in_f = q.shape
    words = -(-in_f // PACK_FACTOR)
    u = torch.full((out_f, words * PACK_FACTOR), 8, dtype=torch.int64)
    u[:, :in_f] = q.to(torch.int64) + 8
    u = u.view(out_f, words, PACK_FACTOR) << _SHIFTS.to(torch.int64)
    packed = u.sum(-1)  # < 2**32, no overlap between nibbles
    return (packed - ((packed >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def unpack_uint4(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 ``[out, words]`` -> stored nibbles (``q + 8``) as int32 ``[out, in_features]``."""
    out_f, words = qweight.shape
    if words * PACK_FACTOR < in_features:
        raise ValueError(f"qweight has {words} words per row, too few for {in_features} inputs")
    u = (qweight.to(torch.int32).unsqueeze(-1) >> _SHIFTS.to(qweight.device)) & 0xF
    return u.reshape(out_f, words * PACK_FACTOR)[:, :in_features].contiguous()


def unpack_int4(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 ``[out, words]`` -> ``q`` in [-8, 7] as int8 ``[out, in_features]``."""
    return (unpack_uint4(qweight, in_features) - 8).to(torch.int8)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``g(i)`` for every input column (``g_idx`` wins when given)."""
    if g_idx is not None:
        return g_idx.to(torch.long)
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


def dequantize_w4(qweight, scales, in_features, group_size, g_idx=None, dtype=torch.float64):
    """The float weight ``[out, in]`` of a w4a16 layer, in ``dtype``."""
    q = unpack_int4(qweight, in_features).to(dtype)
    g = group_index(in_features, group_size, g_idx).to(scales.device)
    return q * scales.to(dtype)[:, g]


def dequantize_w8(qweight, scales, dtype=torch.float64):
    """The float weight ``[out, in]`` of a w8a8 layer, in ``dtype``."""
    return qweight.to(dtype) * scales.to(dtype).reshape(-1, 1)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8: ``x ~= q * s`` with ``s = max|x_row| / 127``."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 127.0
    q = torch.round(xf / s).clamp(-127, 127).to(torch.int8)
    return q, s


def w4a16_reference(x, qweight, scales, in_features, group_size, g_idx=None, bias=None):
    """Torch fallback and reference: dequantize in the activation dtype, then matmul."""
    w = dequantize_w4(qweight, scales, in_features, group_size, g_idx, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def w8a8_reference(x, qweight, scales, bias=None):
    """Torch fallback and reference: per-token int8 activations, exact integer matmul."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_per_token_int8(x2)
    # Integer products summed in float64 are exact for any realistic K.
    acc = xq.double() @ qweight.double().t()
    out = (acc * xs.double() * scales.double().reshape(1, -1)).to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*shape[:-1], out.shape[-1])
