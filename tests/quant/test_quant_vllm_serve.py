"""vLLM serves the exports with its own in-tree methods (CPU backend).

- W8A8 ``compressed-tensors``: vLLM's in-tree method loads it and generates
  the same greedy tokens as the torch dequantized reference (weights
  dequantized, activations fake-quantized per token to int8).
- W4A16 ``gptq`` and ``compressed-tensors``, with this package's plugin
  excluded (``VLLM_PLUGINS=none``): vLLM's own weight loaders accept the
  checkpoint; on an AVX2-only CPU the engine then stops at the AVX2 build's
  missing int4 op ``cpu_gemm_wna16`` (asserted exactly), on an AVX-512 CPU
  vLLM's CPUWNA16 kernel runs and must give the reference's greedy tokens.
  The plugin's own CPU int4 path is tested with the serving methods.
"""

from __future__ import annotations

import re

import pytest
import requests
import torch

from quant.config import QuantConfig
from quant.evaluate import load_dequantized_model
from quant.pipeline import quantize_checkpoint
from vllm_plugins.serving import VllmServer

PROMPTS = [[1, 45, 200, 31, 77, 9], [1, 300, 12, 5]]
MAX_TOKENS = 12
SERVE_ARGS = ("--enforce-eager", "--max-model-len", "256", "--dtype", "float32", "--max-num-seqs", "4")
MISSING_OP = "'_C' object has no attribute 'cpu_gemm_wna16'"


@pytest.fixture(scope="module")
def model_dir(tiny_llama):
    # Head size 64 (CPU attention), every size a multiple of 32.
    return tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=512, num_hidden_layers=2, vocab_size=512)


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory, shared_dir):
    out = tmp_path_factory.mktemp("serve-exports")
    calib = shared_dir / "data" / "tinystories_val.txt"
    w8 = QuantConfig(scheme="w8a8", num_samples=16, seqlen=128)
    quantize_checkpoint(model_dir, {"compressed-tensors": out / "w8a8-ct"}, w8, calib, progress=False)
    w4 = QuantConfig(scheme="w4a16", group_size=64, num_samples=16, seqlen=128)
    quantize_checkpoint(model_dir, {"gptq": out / "w4-gptq", "compressed-tensors": out / "w4-ct"}, w4, calib,
                        progress=False)
    return out


def _reference_greedy(export_dir) -> list[list[int]]:
    model = load_dequantized_model(export_dir)
    outs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS,
                                 eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(prompt):].tolist())
    return outs


def test_w8a8_compressed_tensors_serves_same_greedy_tokens(exports):
    export = exports / "w8a8-ct"
    expected = _reference_greedy(export)
    with VllmServer(export, *SERVE_ARGS) as server:
        got = []
        for prompt in PROMPTS:
            r = requests.post(server.url("/v1/completions"), timeout=300, json={
                "model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["token_ids"])
        log = server.log()
    assert "CompressedTensorsW8A8Int8" in log or "compressed-tensors" in log.lower()
    assert got == expected


BF16_LOGIT_TOL = 0.3  # bf16 activations: near-ties between the top logits may flip


def _assert_greedy_under_reference(export_dir, generated: list[list[int]]) -> None:
    """Every token vLLM chose (bf16) is the float32 torch reference's argmax up to the bf16 noise.

    A chosen token's float32 gap to the argmax can only come from rounding if it is at most twice
    the bf16 error of a logit: the tolerance is twice the largest |logit| change of the same torch
    reference run in bfloat16 on the same tokens, and never below ``BF16_LOGIT_TOL``. A wrong
    kernel moves the logits by whole units, far above either.
    """
    model = load_dequantized_model(export_dir)
    model_bf16 = load_dequantized_model(export_dir).to(torch.bfloat16)
    for prompt, tokens in zip(PROMPTS, generated):
        assert len(tokens) == MAX_TOKENS
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
            logits_bf16 = model_bf16(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        tol = max(BF16_LOGIT_TOL, 2 * float((logits_bf16 - logits).abs().max()))
        gaps = logits.max(dim=-1).values - logits[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert float(gaps.max()) <= tol, (tokens, tol, gaps.tolist())


def _complete(server, prompt, max_tokens):
    """(status, token ids or None); status None when the engine died with the connection open."""
    try:
        r = requests.post(server.url("/v1/completions"), timeout=300, json={
            "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
    except requests.RequestException:
        return None, None
    return r.status_code, (r.json()["choices"][0]["token_ids"] if r.status_code == 200 else None)


@pytest.mark.parametrize("name", ["w4-gptq", "w4-ct"])
def test_w4a16_in_tree_method_without_plugin(exports, name):
    """vLLM picks ``_C_AVX512`` (which has ``cpu_gemm_wna16``) when the CPU has AVX-512, else
    ``_C_AVX2`` (which lacks it). With AVX-512 the in-tree CPUWNA16 kernel must reproduce the
    torch reference's greedy tokens; on AVX2 it must load the weights and then fail with exactly
    the missing-op error at the first forward."""
    # vLLM's gptq method takes fp16/bf16 activations only.
    args = [a if a != "float32" else "bfloat16" for a in SERVE_ARGS]
    with VllmServer(exports / name, *args, env={"VLLM_PLUGINS": "none"}) as server:
        assert re.search(r"Loading weights took", server.log())
        results = [_complete(server, p, MAX_TOKENS) for p in PROMPTS]
        log = server.log()
    assert "vllm_plugins registered" not in log
    assert "CPUWNA16" in log
    if torch.cpu._is_avx512_supported():
        assert [r[0] for r in results] == [200, 200], log[-4000:]
        _assert_greedy_under_reference(exports / name, [r[1] for r in results])
    else:
        assert results[0][0] != 200
        assert MISSING_OP in log, log[-4000:]
