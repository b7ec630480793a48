"""TinyStories-656K (a stock LlamaForCausalLM, head size 16) served by vLLM
through the variant with ``hf_overrides`` (attention padded to a size the
backend supports) matches HF transformers: greedy text and perplexity.
"""

from __future__ import annotations

import math

import pytest
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


@pytest.fixture(scope="module")
def vllm_results(vllm_jobs, model_dir, prompt_ids, ppl_windows):
    overrides = {"hf_overrides": {"architectures": ["LlamaVariantForCausalLM"]}}
    gen, ppl = vllm_jobs([
        {"model": str(model_dir), "llm": overrides, "prompts": prompt_ids, "max_tokens": MAX_TOKENS},
        {"model": str(model_dir), "llm": overrides, "prompts": ppl_windows, "max_tokens": 1,
         "prompt_logprobs": 0},
    ])
    return job_outputs(gen), job_outputs(ppl), gen["log"]


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf(model_dir)


def test_greedy_matches_hf(vllm_results, hf_model, prompt_ids, tokenizer):
    gen, _, _ = vllm_results
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
    _, ppl, _ = vllm_results
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
    assert "LlamaVariant: head size 16 runs attention at 32" in vllm_results[2]
