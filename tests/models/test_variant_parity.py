"""Parity of the vLLM variant with vLLM's own Llama and with the HF reference.

1. Every option off, on a random stock Llama checkpoint (head size 32):
   the variant (through ``hf_overrides``) vs vLLM's ``LlamaForCausalLM``,
   prompts of different lengths in one batch: top-k logprobs close in the
   manner of vLLM's ``check_logprobs_close`` and identical greedy tokens.
2. Each option on (every option appears in at least one checkpoint; each
   checkpoint also uses one RoPE type, and all are padded head sizes; every
   RoPE type is also checked alone in ``test_variant_rope.py``), vLLM
   vs the HF reference in float32: prefill logits within relative error 1e-3
   and identical greedy tokens for 32 steps.
3. Tensor parallel size 2 on CPU (``VLLM_CPU_OMP_THREADS_BIND='0|1'``, one
   entry per rank) gives the same greedy tokens as size 1, on the checkpoint
   with every option on (8 query / 4 KV heads of 16, split 4 + 2 per rank).

All engines run in one subprocess, one after another.
"""

from __future__ import annotations

import pytest
import torch
from variant_helpers import hf_greedy, hf_logprobs, job_outputs, load_hf

MAX_TOKENS = 32
TOP_K = 5
VOCAB = 512
REL_TOL = 1e-3
PROMPT_LENGTHS = (3, 11, 40, 97)

# Head size 16 (hidden 128, 8 heads, 4 KV heads) unless the case says otherwise.
SMALL_HEADS = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4)
OPTION_CASES = {
    "qk_norm+rope_linear": dict(qk_norm=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "partial_rotary+rope_yarn": dict(
        partial_rotary_factor=0.5,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "geglu+rope_llama3": dict(
        hidden_act="gelu_pytorch_tanh",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "bias+rope_longrope": dict(
        attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 256,
                      "short_factor": [1.0 + 0.25 * i for i in range(8)],
                      "long_factor": [2.0 + 0.5 * i for i in range(8)]},
    ),
    "head_dim_40+rope_dynamic_alpha+tied": dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=40,
        tie_word_embeddings=True, rope_scaling={"rope_type": "dynamic", "alpha": 4.0},
    ),
    "all_options": dict(
        qk_norm=True, partial_rotary_factor=0.5, hidden_act="gelu_pytorch_tanh",
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_scaling={"rope_type": "deepseek_yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                      "mscale": 1.0, "mscale_all_dim": 0.5},
    ),
}

TP_CASE = "all_options"

# vLLM's longrope chooses the long factors for every position once
# max_model_len exceeds original_max_position_embeddings; transformers chooses
# per call by sequence length. Within the original length both use the short ones.
CASE_LLM_KWARGS = {"bias+rope_longrope": {"max_model_len": 256}}


@pytest.fixture(scope="module")
def prompts():
    """BOS then deterministic non-special token ids, one prompt per length."""
    ids = [1] + [(7 * i + 3) % (VOCAB - 3) + 3 for i in range(max(PROMPT_LENGTHS))]
    return [ids[:n] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def stock_llama(tiny_llama):
    return tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head 32


@pytest.fixture(scope="module")
def option_models(tiny_llama):
    return {
        name: tiny_llama(model_type="llama_variant", **{**SMALL_HEADS, **opts})
        for name, opts in OPTION_CASES.items()
    }


@pytest.fixture(scope="module")
def results(vllm_jobs, stock_llama, option_models, prompts):
    base = {"prompts": prompts, "max_tokens": MAX_TOKENS}
    jobs = [
        {**base, "model": str(stock_llama), "logprobs": TOP_K},
        {**base, "model": str(stock_llama), "logprobs": TOP_K,
         "llm": {"hf_overrides": {"architectures": ["LlamaVariantForCausalLM"]}}},
    ] + [
        {**base, "model": str(path), "prompt_logprobs": VOCAB,
         "llm": {"max_logprobs": VOCAB, **CASE_LLM_KWARGS.get(name, {})}}
        for name, path in option_models.items()
    ] + [
        {**base, "model": str(option_models[TP_CASE]), "llm": {"tensor_parallel_size": 2},
         "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}},
    ]
    outs = vllm_jobs(jobs)
    return {"llama": outs[0], "variant": outs[1], **dict(zip(option_models, outs[2:-1])), "tp2": outs[-1]}


def check_logprobs_close(outputs_0, outputs_1, name_0, name_1):
    """vLLM's check: step by step, each side's token is in the other's top-k;
    comparison stops at the first differing token."""
    for i, (o0, o1) in enumerate(zip(outputs_0, outputs_1)):
        for step, (t0, t1) in enumerate(zip(o0["token_ids"], o1["token_ids"])):
            lp0, lp1 = o0["logprobs"][step], o1["logprobs"][step]
            msg = f"prompt {i} step {step}: {name_0} {t0} {lp0} vs {name_1} {t1} {lp1}"
            assert str(t0) in lp1 and str(t1) in lp0, msg
            if t0 != t1:
                break


def test_variant_matches_vllm_llama_logprobs(results):
    llama, variant = job_outputs(results["llama"]), job_outputs(results["variant"])
    check_logprobs_close(llama, variant, "LlamaForCausalLM", "LlamaVariantForCausalLM")
    # Same kernels, same weights: the shared top-k values agree closely too.
    worst = max(
        abs(a[t] - b[t])
        for o0, o1 in zip(llama, variant)
        for a, b in zip(o0["logprobs"], o1["logprobs"])
        for t in set(a) & set(b)
    )
    print(f"variant vs vLLM Llama: max |logprob diff| over shared top-{TOP_K}: {worst:.2e}")
    assert worst < 1e-4


def test_variant_matches_vllm_llama_greedy(results):
    llama, variant = job_outputs(results["llama"]), job_outputs(results["variant"])
    assert [o["token_ids"] for o in llama] == [o["token_ids"] for o in variant]
    assert [len(o["token_ids"]) for o in variant] == [MAX_TOKENS] * len(PROMPT_LENGTHS)


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_prefill_logits_match_hf(case, results, option_models, prompts):
    outs = job_outputs(results[case])
    model = load_hf(option_models[case])
    worst = 0.0
    for ids, out in zip(prompts, outs):
        ref = hf_logprobs(model, ids)[:-1]  # position p predicts token p + 1
        got = torch.tensor(
            [[out["prompt_logprobs"][p][str(t)] for t in range(VOCAB)] for p in range(1, len(ids))],
            dtype=torch.float64,
        )
        # Log-probs are logits shifted per row; centring each row recovers the
        # logits up to that softmax-invariant shift.
        ref_c, got_c = ref - ref.mean(-1, keepdim=True), got - got.mean(-1, keepdim=True)
        worst = max(worst, float((got_c - ref_c).norm() / ref_c.norm()))
    print(f"{case}: prefill logits relative error {worst:.2e}")
    assert worst <= REL_TOL


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_greedy_matches_hf(case, results, option_models, prompts):
    outs = job_outputs(results[case])
    expected = hf_greedy(load_hf(option_models[case]), prompts, MAX_TOKENS)
    assert [o["token_ids"] for o in outs] == expected


def test_tp2_greedy_equals_tp1(results):
    tp1, tp2 = job_outputs(results[TP_CASE]), job_outputs(results["tp2"])
    assert "world_size=2 rank=1" in results["tp2"]["log"], "TP=2 did not start a second rank"
    assert [o["token_ids"] for o in tp2] == [o["token_ids"] for o in tp1]
