"""Run attention at a head size the active vLLM backend supports.

A model whose ``head_dim`` the backend refuses (vLLM's CPU attention takes
32, 64, 80, ... only) runs attention at the smallest supported size
``padded >= head_dim``: q, k and v are zero-padded per head after RoPE and
the output is sliced back before ``o_proj``. With the softmax scale of the
true ``head_dim`` this is exact: the padded dims add 0 to every q.k score,
and the padded value dims only produce output columns that are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest head size tried when a backend does not list its sizes.
MAX_HEAD_SIZE = 1024


def _backend_for(head_size: int, dtype: torch.dtype, kv_cache_dtype: str | None, attn_type: str | None):
    """The backend vLLM would pick for ``head_size``, or None if none is valid."""
    from vllm.v1.attention.selector import get_attn_backend

    try:
        backend = get_attn_backend(head_size, dtype, kv_cache_dtype, attn_type=attn_type)
    except ValueError:  # the platform found no valid backend for this size
        return None
    return backend if backend.supports_head_size(head_size) else None


def attention_head_size(
    head_dim: int,
    dtype: torch.dtype,
    kv_cache_dtype: str | None = None,
    attn_type: str | None = None,
):
    """``(size, backend)``: the smallest head size >= ``head_dim`` that the
    backend vLLM selects for it supports, and that backend.

    Must run where vLLM's current config is set (inside a model's
    ``__init__``). The candidates are the sizes the backend lists
    (``get_supported_head_sizes``) or, for backends that only answer
    ``supports_head_size``, every even size up to :data:`MAX_HEAD_SIZE`.
    """
    backend = _backend_for(head_dim, dtype, kv_cache_dtype, attn_type)
    if backend is not None:
        return head_dim, backend

    from vllm.v1.attention.selector import get_attn_backend

    listed: list[int] = []
    try:
        listed = list(get_attn_backend(head_dim, dtype, kv_cache_dtype, attn_type=attn_type)
                      .get_supported_head_sizes())
    except ValueError:
        pass  # no backend even for the native size: probe sizes below
    candidates = sorted(s for s in listed if s >= head_dim) or range(
        head_dim + 2, MAX_HEAD_SIZE + 1, 2
    )
    for size in candidates:
        backend = _backend_for(size, dtype, kv_cache_dtype, attn_type)
        if backend is not None:
            return size, backend
    raise ValueError(
        f"no vLLM attention backend supports a head size in [{head_dim}, {MAX_HEAD_SIZE}]"
    )


def pad_heads(x: torch.Tensor, head_dim: int, padded: int) -> torch.Tensor:
    """``[tokens, heads * head_dim]`` -> ``[tokens, heads * padded]``, zeros appended per head."""
    if padded == head_dim:
        return x
    tokens = x.shape[0]
    return F.pad(x.view(tokens, -1, head_dim), (0, padded - head_dim)).view(tokens, -1)


def unpad_heads(x: torch.Tensor, head_dim: int, padded: int) -> torch.Tensor:
    """Inverse of :func:`pad_heads`: keep the first ``head_dim`` dims of each head."""
    if padded == head_dim:
        return x
    tokens = x.shape[0]
    return x.view(tokens, -1, padded)[..., :head_dim].reshape(tokens, -1)
