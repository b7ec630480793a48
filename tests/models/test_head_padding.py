"""Head-size padding: exact attention, and the size chosen by asking the backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.head_padding import attention_head_size, pad_heads, unpad_heads


def _attention(q, k, v, heads, kv_heads, head_size, scale):
    """Causal GQA attention on ``[tokens, heads * head_size]`` tensors."""
    t = q.shape[0]
    q = q.view(t, heads, head_size).transpose(0, 1)
    k = k.view(t, kv_heads, head_size).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = v.view(t, kv_heads, head_size).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(0, 1).reshape(t, -1)


@pytest.mark.parametrize("head_dim,padded", [(8, 32), (16, 32), (40, 64)])
def test_padded_attention_is_exact(head_dim, padded):
    g = torch.Generator().manual_seed(head_dim)
    t, heads, kv = 7, 4, 2
    q = torch.randn(t, heads * head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(t, kv * head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(t, kv * head_dim, generator=g, dtype=torch.float64)
    scale = head_dim**-0.5
    ref = _attention(q, k, v, heads, kv, head_dim, scale)
    out = _attention(pad_heads(q, head_dim, padded), pad_heads(k, head_dim, padded),
                     pad_heads(v, head_dim, padded), heads, kv, padded, scale)
    assert out.shape == (t, heads * padded)
    torch.testing.assert_close(unpad_heads(out, head_dim, padded), ref, rtol=1e-12, atol=1e-12)
    # The padded size's own scale would be wrong: the test can fail.
    wrong = _attention(pad_heads(q, head_dim, padded), pad_heads(k, head_dim, padded),
                       pad_heads(v, head_dim, padded), heads, kv, padded, padded**-0.5)
    assert not torch.allclose(unpad_heads(wrong, head_dim, padded), ref, atol=1e-3)


def test_pad_layout_is_per_head():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 12)  # 3 heads of 4
    p = pad_heads(x, 4, 8).view(2, 3, 8)
    assert torch.equal(p[..., :4], x.view(2, 3, 4)) and not p[..., 4:].any()
    assert pad_heads(x, 4, 4) is x and unpad_heads(x, 4, 4) is x


def test_head_size_is_asked_of_the_cpu_backend():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = sorted(CPUAttentionBackend.get_supported_head_sizes())
    with set_current_vllm_config(VllmConfig()):
        for head_dim in (8, 16, 40, 64, 130):
            size, backend = attention_head_size(head_dim, torch.float32, "auto")
            assert backend is CPUAttentionBackend
            assert size == min(s for s in supported if s >= head_dim)
