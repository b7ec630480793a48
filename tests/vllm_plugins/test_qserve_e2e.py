"""``vllm serve`` of W4A16 and W8A8 ``native`` exports of a random Llama and of
TinyStories-656K (through the LLaMA variant).

One server per export (module-scoped, parametrized). Greedy tokens must equal
the float64 dequantized HF reference (``test_qpacking.dequantized_reference``),
and 64 concurrent completion requests must all be answered in full.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest
import requests

from test_qpacking import dequantized_reference, export_native, greedy_reference, read_native
from vllm_plugins.serving import VllmServer

W4A16 = {"quant_method": "vllm_plugins", "format_version": 1, "scheme": "w4a16", "group_size": 64,
         "act_order": True, "ignore": ["lm_head"]}
W8A8 = {"quant_method": "vllm_plugins", "format_version": 1, "scheme": "w8a8", "ignore": ["lm_head"]}
# id -> (source, how it is exported). The random Llama goes through this test's
# own RTN exporter; TinyStories-656K through ``vllm-plugins quantize``.
EXPORTS = {
    "llama-w4a16": ("tiny", W4A16),
    "llama-w8a8": ("tiny", W8A8),
    "tinystories-w4a16": ("tinystories", ["--scheme", "w4a16", "--group-size", "32", "--method", "gptq"]),
    "tinystories-w8a8": ("tinystories", ["--scheme", "w8a8", "--method", "rtn"]),
}
# TinyStories-656K has head size 16: served through the LLaMA variant, which pads it.
VARIANT = ("--hf-overrides", json.dumps({"architectures": ["LlamaVariantForCausalLM"]}))
PROMPTS = [[1, 5, 77, 200, 31], [1, 300, 12], [1, 42, 43, 44, 45, 46, 47, 48], [1, 400]]
MAX_TOKENS = 12


def _toolkit_export(src, out, shared_dir, args) -> tuple[dict, dict]:
    from vllm_plugins.cli import main

    assert main(["quantize", "--model", str(src), "--out", str(out), "--format", "native",
                 "--calib", str(shared_dir / "data" / "tinystories_val.txt"), "--num-samples", "16",
                 "--seqlen", "128", "--no-progress", *args]) == 0
    return read_native(out)  # the test's own reader of the contract


@pytest.fixture(scope="module", params=list(EXPORTS))
def served(request, tiny_llama, tmp_path_factory):
    source, how = EXPORTS[request.param]
    out = tmp_path_factory.mktemp(f"native-{request.param}") / "ckpt"
    if source == "tiny":
        src, qcfg = tiny_llama(), how
        deq = export_native(src, out, qcfg)
    else:
        shared_dir = request.getfixturevalue("shared_dir")
        src = shared_dir / "models" / "TinyStories-656K"
        qcfg, deq = _toolkit_export(src, out, shared_dir, how)
    reference = greedy_reference(dequantized_reference(src, qcfg, deq), PROMPTS, MAX_TOKENS)
    extra = VARIANT if source == "tinystories" else ()
    with VllmServer(out, "--enforce-eager", "--max-model-len", "512", "--dtype", "float32",
                    "--max-num-seqs", "64", *extra) as server:
        yield server, reference


def _complete(server, prompt, max_tokens):
    r = requests.post(server.url("/v1/completions"), timeout=300, json={
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text + server.log()[-4000:]
    return r.json()


def test_greedy_equals_dequantized_reference(served):
    server, reference = served
    got = [_complete(server, p, MAX_TOKENS)["choices"][0]["token_ids"] for p in PROMPTS]
    assert got == reference
    assert "quantization=vllm_plugins" in server.log()


def test_64_concurrent_completions_answered_in_full(served):
    server, _ = served
    prompts = [[1, 10 + i, 20 + (i * 7) % 400] for i in range(64)]
    with cf.ThreadPoolExecutor(64) as pool:
        outs = list(pool.map(lambda p: _complete(server, p, 16), prompts))
    for out in outs:
        choice = out["choices"][0]
        assert out["usage"]["completion_tokens"] == 16 and choice["finish_reason"] == "length"
        assert len(choice["token_ids"]) == 16
    # Greedy is batch-independent here: the first request alone gives the same tokens.
    assert _complete(server, prompts[0], 16)["choices"][0]["token_ids"] == outs[0]["choices"][0]["token_ids"]
