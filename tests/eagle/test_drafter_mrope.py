"""M-RoPE: a draft config carrying ``mrope_section`` in its
``rope_parameters`` (as a Qwen2-VL-style target's does) gives the vLLM
drafter's attention an M-RoPE rotary embedding, which rotates frequency
band ``j`` by the temporal, height or width position of its section.

Checked against an independent float64 reference of that definition; with
the three position rows equal it is plain RoPE, as the torch drafter's."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding

from eagle.layouts import read_drafter, write_drafter
from eagle.torch_drafter import rope

SECTION = [8, 4, 4]  # sums to head_dim / 2 = 16


def _mrope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """``x`` [T, heads, dim], ``positions`` [3, T]: neox rotation where band
    ``j`` uses position row 0, 1 or 2 by the section ``j`` falls in."""
    dim = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    row = torch.repeat_interleave(torch.arange(3), torch.tensor(SECTION))  # [dim/2]
    ang = positions.double()[row].t() * inv  # [T, dim/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., : dim // 2].double(), x[..., dim // 2:].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.fixture(scope="module")
def mrope_drafter(llama_target, llama_drafter, vllm_drafter, tmp_path_factory):
    _, cfg, state = read_drafter(llama_drafter)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"],
                              "mrope_section": SECTION}
    path = write_drafter(tmp_path_factory.mktemp("mrope") / "d", state, cfg, "specforge")
    model = vllm_drafter(llama_target, path)[0]
    return model.model.layers[0].self_attn.rotary_emb, cfg


def test_mrope_section_gives_mrope(mrope_drafter, llama_target, llama_drafter, vllm_drafter):
    rotary, cfg = mrope_drafter
    assert isinstance(rotary, MRotaryEmbedding)
    assert list(rotary.mrope_section) == SECTION
    plain = vllm_drafter(llama_target, llama_drafter)[0].model.layers[0].self_attn.rotary_emb
    assert not isinstance(plain, MRotaryEmbedding)


def test_mrope_rotation_matches_reference(mrope_drafter):
    rotary, cfg = mrope_drafter
    heads, kv, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    t = 7
    torch.manual_seed(0)
    q, k = torch.randn(t, heads * dim), torch.randn(t, kv * dim)
    positions = torch.stack([torch.arange(t), torch.arange(t) * 3 % 5, torch.arange(t).flip(0)])
    q_out, k_out = rotary.forward_native(positions, q.clone(), k.clone())
    # float32 cos/sin cache against float64: tolerance of a few float32 ulps on O(1) values.
    torch.testing.assert_close(q_out.view(t, heads, dim).double(),
                               _mrope_reference(q.view(t, heads, dim), positions, cfg["rope_theta"]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out.view(t, kv, dim).double(),
                               _mrope_reference(k.view(t, kv, dim), positions, cfg["rope_theta"]),
                               rtol=1e-5, atol=1e-5)

    # Equal rows: plain RoPE, as the torch drafter trains it.
    same = torch.arange(t).expand(3, t)
    q_same, _ = rotary.forward_native(same, q.clone(), k.clone())
    plain = rope(q.view(1, t, heads, dim), torch.arange(t)[None], cfg["rope_theta"])[0]
    torch.testing.assert_close(q_same.view(t, heads, dim), plain, rtol=1e-5, atol=1e-5)
    # Distinct rows change the bands past the temporal section only.
    diff = (q_out - q_same).view(t, heads, dim).abs().amax(dim=(0, 1))
    half = dim // 2
    assert diff[: SECTION[0]].max() == 0 and diff[half: half + SECTION[0]].max() == 0
    assert diff[SECTION[0]: half].max() > 1e-3


def test_torch_drafter_mrope_matches_reference(mrope_drafter):
    """The training-side rotation (``eagle.torch_drafter.rope`` with
    ``[3, B, T]`` positions) equals the same float64 reference, hence vLLM's."""
    _, cfg = mrope_drafter
    heads, dim, t = cfg["num_attention_heads"], cfg["head_dim"], 6
    torch.manual_seed(1)
    q = torch.randn(1, t, heads, dim)
    positions = torch.stack([torch.arange(t), torch.arange(t) % 2 + 4, torch.arange(t).flip(0)])
    got = rope(q, positions[:, None], cfg["rope_theta"], SECTION)[0]
    torch.testing.assert_close(got.double(), _mrope_reference(q[0], positions, cfg["rope_theta"]),
                               rtol=1e-5, atol=1e-5)
