"""``vllm serve`` of W4A16 and W8A8 ``native`` exports of a random Llama.

One server per scheme (module-scoped, parametrized). Greedy tokens must equal
the float64 dequantized HF reference (``test_qpacking.dequantized_reference``),
and 64 concurrent completion requests must all be answered in full.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

from test_qpacking import dequantized_reference, export_native, greedy_reference
from vllm_plugins.serving import VllmServer

EXPORTS = {
    "w4a16": {"quant_method": "vllm_plugins", "format_version": 1, "scheme": "w4a16", "group_size": 64,
              "act_order": True, "ignore": ["lm_head"]},
    "w8a8": {"quant_method": "vllm_plugins", "format_version": 1, "scheme": "w8a8", "ignore": ["lm_head"]},
}
PROMPTS = [[1, 5, 77, 200, 31], [1, 300, 12], [1, 42, 43, 44, 45, 46, 47, 48], [1, 400]]
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=sorted(EXPORTS))
def served(request, tiny_llama, tmp_path_factory):
    src = tiny_llama()
    qcfg = EXPORTS[request.param]
    out = tmp_path_factory.mktemp(f"native-{request.param}") / "ckpt"
    deq = export_native(src, out, qcfg)
    reference = greedy_reference(dequantized_reference(src, qcfg, deq), PROMPTS, MAX_TOKENS)
    with VllmServer(out, "--enforce-eager", "--max-model-len", "512", "--dtype", "float32",
                    "--max-num-seqs", "64") as server:
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
