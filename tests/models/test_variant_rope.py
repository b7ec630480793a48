"""Every accepted RoPE type: vLLM's ``get_rope`` module applied as the vLLM
class applies it (``apply_rope``, CPU kernels) vs the HF reference's rotary
embedding and attention RoPE, on random q/k.

``longrope`` needs an engine's ``max_model_len`` and is covered end to end in
``test_variant_parity.py`` (as are linear, yarn, llama3 and dynamic).
"""

from __future__ import annotations

import pytest
import torch

from models.llama_variant_config import ROPE_TYPES, LlamaVariantConfig, head_dim, rope_parameters

HEADS, HEAD_DIM, MAX_POS = 4, 16, 256

CASES = {
    "default": {},
    "default+partial": {"partial_rotary_factor": 0.5},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "dynamic_factor": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "dynamic_alpha": {"rope_scaling": {"rope_type": "dynamic", "alpha": 3.0}},
    "yarn+partial": {"partial_rotary_factor": 0.5,
                     "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "ntk": {"rope_scaling": {"rope_type": "ntk", "factor": 4.0}},
    "ntk_mixed": {"rope_scaling": {"rope_type": "ntk", "factor": 4.0, "mixed_b": 0.75}},
    "deepseek_yarn": {"rope_scaling": {"rope_type": "deepseek_yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 64, "mscale": 0.8,
                                       "mscale_all_dim": 0.3, "beta_fast": 16, "beta_slow": 2}},
    "deepseek_llama_scaling+partial": {
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"rope_type": "deepseek_llama_scaling", "factor": 2.0,
                         "original_max_position_embeddings": 128}},
}


def test_cases_cover_every_accepted_type():
    covered = {c.get("rope_scaling", {}).get("rope_type", "default") for c in CASES.values()}
    assert covered | {"longrope"} == set(ROPE_TYPES)


def _config(options):
    return LlamaVariantConfig(hidden_size=64, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                              head_dim=HEAD_DIM, max_position_embeddings=MAX_POS, **options)


@pytest.mark.parametrize("case", list(CASES))
def test_get_rope_matches_hf_reference(case):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from models.llama_variant import apply_rope
    from models.llama_variant_hf import LlamaVariantAttention, LlamaVariantRotaryEmbedding

    config = _config(CASES[case])
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 2, 7, 31, 63, 64, 65, 100, 200, MAX_POS - 1])
    q = torch.randn(len(positions), HEADS, HEAD_DIM, generator=g)
    k = torch.randn(len(positions), HEADS, HEAD_DIM, generator=g)

    rotary = LlamaVariantRotaryEmbedding(config)
    cos, sin = rotary(q, positions[None])
    attn = LlamaVariantAttention(config, layer_idx=0)
    ref_q, ref_k = attn._rope(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ref_q, ref_k = ref_q[0].transpose(0, 1).reshape(len(positions), -1), ref_k[0].transpose(0, 1).reshape(len(positions), -1)

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head_dim(config), max_position=MAX_POS, is_neox_style=True,
                        rope_parameters=rope_parameters(config), dtype=torch.float32)
        got_q, got_k = apply_rope(rope, positions, q.reshape(len(positions), -1).clone(),
                                  k.reshape(len(positions), -1).clone(), HEAD_DIM)
        plain = get_rope(HEAD_DIM, max_position=MAX_POS, is_neox_style=True, dtype=torch.float32)
        plain_q, _ = plain.forward_native(positions, q.reshape(len(positions), -1).clone(),
                                          k.reshape(len(positions), -1).clone())
    torch.testing.assert_close(got_q, ref_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_k, ref_k, rtol=1e-4, atol=1e-4)
    # Each case but the plain ones changes the rotation, so a reference that
    # ignored the RoPE type would fail. ("dynamic" by factor leaves positions
    # below max_position_embeddings unscaled, in vLLM and in transformers.)
    if case not in ("default", "dynamic_factor"):
        assert not torch.allclose(plain_q, ref_q, atol=1e-3)


def test_rejected_rope_type_names_the_option():
    with pytest.raises(Exception, match="rope_type"):
        _config({"rope_scaling": {"rope_type": "mllama4"}})
