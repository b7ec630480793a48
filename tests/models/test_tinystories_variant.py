"""TinyStories-656K (a stock LlamaForCausalLM, head size 16) served by vLLM
through the variant with ``hf_overrides`` (attention padded to a size the
backend supports) matches HF transformers: greedy text and perplexity.
It is also an EAGLE-3 target: with a random-weight EAGLE-3 drafter reading
its auxiliary hidden states, greedy output is unchanged (lossless).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from variant_helpers import hf_greedy, hf_logprobs, job_outputs, load_hf

PROMPTS = [
    "Once upon a time",
    "Lily and Ben went to the park. They",
    "The little dog was sad because",
]
MAX_TOKENS = 32
PPL_WINDOW = 256  # tokens per perplexity window (BOS + 255 text tokens)
PPL_WINDOWS = 4


@pytest.fixture(scope="module")
def model_dir(shared_dir):
    return shared_dir / "models" / "TinyStories-656K"


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def ppl_windows(tokenizer, shared_dir):
    text = (shared_dir / "data" / "tinystories_val.txt").read_text()[:20000]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    step = PPL_WINDOW - 1
    assert len(ids) >= step * PPL_WINDOWS
    return [[tokenizer.bos_token_id] + ids[i * step:(i + 1) * step] for i in range(PPL_WINDOWS)]


def build_random_eagle3_drafter(out, target_config: dict):
    """A one-layer EAGLE-3 drafter (vLLM's ``LlamaForCausalLMEagle3`` layout)
    with random weights, reading the target's hidden states after layers 0, 1, 2."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    h, vocab, inter, kv = target_config["hidden_size"], target_config["vocab_size"], 256, 64
    config = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=vocab, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2).to_dict()
    config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=vocab, target_hidden_size=h,
                  eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 2]})
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (0.05 * torch.randn(*shape, generator=g)).contiguous()  # noqa: E731
    layer = "midlayer."
    save_file({
        layer + "self_attn.q_proj.weight": rnd(h, 2 * h), layer + "self_attn.k_proj.weight": rnd(kv, 2 * h),
        layer + "self_attn.v_proj.weight": rnd(kv, 2 * h), layer + "self_attn.o_proj.weight": rnd(h, h),
        layer + "mlp.gate_proj.weight": rnd(inter, h), layer + "mlp.up_proj.weight": rnd(inter, h),
        layer + "mlp.down_proj.weight": rnd(h, inter),
        layer + "input_layernorm.weight": torch.ones(h), layer + "hidden_norm.weight": torch.ones(h),
        layer + "post_attention_layernorm.weight": torch.ones(h),
        "fc.weight": rnd(h, 3 * h), "norm.weight": torch.ones(h), "lm_head.weight": rnd(vocab, h),
    }, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def vllm_results(vllm_jobs, model_dir, prompt_ids, ppl_windows, tmp_path_factory):
    overrides = {"hf_overrides": {"architectures": ["LlamaVariantForCausalLM"]}}
    drafter = build_random_eagle3_drafter(
        tmp_path_factory.mktemp("eagle3") / "drafter", json.loads((model_dir / "config.json").read_text())
    )
    gen, ppl, spec = vllm_jobs([
        {"model": str(model_dir), "llm": overrides, "prompts": prompt_ids, "max_tokens": MAX_TOKENS},
        {"model": str(model_dir), "llm": overrides, "prompts": ppl_windows, "max_tokens": 1,
         "prompt_logprobs": 0},
        {"model": str(model_dir), "prompts": prompt_ids, "max_tokens": MAX_TOKENS, "metrics": True,
         "llm": {**overrides, "speculative_config": {
             "method": "eagle3", "model": str(drafter), "num_speculative_tokens": 2}}},
    ])
    return {"gen": job_outputs(gen), "ppl": job_outputs(ppl), "log": gen["log"],
            "spec": job_outputs(spec), "spec_metrics": spec["metrics"]}


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf(model_dir)


def test_greedy_matches_hf(vllm_results, hf_model, prompt_ids, tokenizer):
    gen = vllm_results["gen"]
    expected = hf_greedy(hf_model, prompt_ids, MAX_TOKENS)
    for prompt, out, ref in zip(PROMPTS, gen, expected):
        assert out["token_ids"] == ref, (
            f"{prompt!r}\n vLLM: {tokenizer.decode(out['token_ids'])!r}\n HF:   {tokenizer.decode(ref)!r}"
        )


def _nll(windows, logprob_of):
    total, count = 0.0, 0
    for w, ids in enumerate(windows):
        for pos in range(1, len(ids)):
            total -= logprob_of(w, pos, ids[pos])
            count += 1
    return total / count


def test_perplexity_within_one_percent_of_hf(vllm_results, hf_model, ppl_windows):
    ppl = vllm_results["ppl"]
    hf_lp = [hf_logprobs(hf_model, ids) for ids in ppl_windows]
    hf_nll = _nll(ppl_windows, lambda w, pos, tok: float(hf_lp[w][pos - 1, tok]))
    vllm_nll = _nll(ppl_windows, lambda w, pos, tok: ppl[w]["prompt_logprobs"][pos][str(tok)])
    hf_ppl, vllm_ppl = math.exp(hf_nll), math.exp(vllm_nll)
    print(f"TinyStories-656K perplexity over {len(ppl_windows)}x{PPL_WINDOW} tokens: "
          f"HF {hf_ppl:.4f}, vLLM {vllm_ppl:.4f}, rel diff {abs(vllm_ppl / hf_ppl - 1):.2e}")
    assert hf_ppl < 100, f"HF perplexity {hf_ppl} is implausible for TinyStories-656K (uniform would be 2048)"
    assert abs(vllm_ppl / hf_ppl - 1) <= 0.01


def test_attention_ran_padded(vllm_results):
    """vLLM's CPU attention refuses head size 16; the variant ran it at 32."""
    assert "LlamaVariant: head size 16 runs attention at 32" in vllm_results["log"]


def test_eagle3_drafter_is_lossless(vllm_results):
    assert "Using auxiliary layers from speculative config: (0, 1, 2)" in vllm_results["log"]
    assert [o["token_ids"] for o in vllm_results["spec"]] == [o["token_ids"] for o in vllm_results["gen"]]
    metrics = vllm_results["spec_metrics"]
    assert metrics.get("vllm:spec_decode_num_drafts", 0) > 0, metrics
