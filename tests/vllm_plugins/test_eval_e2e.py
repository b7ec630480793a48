"""CI slice of ``vllm-plugins eval`` on TinyStories-656K (fp, through the LLaMA variant):

- ``--base-url`` against one running ``vllm serve`` (lm-eval ``local-completions``);
- ``--backend offline`` (lm-eval's ``vllm`` backend, in a subprocess).

The last-word accuracy and perplexity must equal HF transformers' on the same
documents (acc exactly, perplexity within 0.5 %); the two backends must agree
on wikitext-2 perplexity within 2 % (the server re-tokenizes text windows).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from vllm_plugins.cli import main
from vllm_plugins.serving import VllmServer

LIMIT = 3
VARIANT = {"architectures": ["LlamaVariantForCausalLM"]}


@pytest.fixture(scope="module")
def model_dir(shared_dir):
    return shared_dir / "models" / "TinyStories-656K"


def _common(model_dir, shared_dir, out):
    return ["--model", f"fp={model_dir}", "--limit", str(LIMIT), "--hf-overrides", json.dumps(VARIANT),
            "--shared-dir", str(shared_dir), "--output", str(out)]


@pytest.fixture(scope="module")
def server_results(model_dir, shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "server.json"
    with VllmServer(model_dir, "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
                    "--hf-overrides", json.dumps(VARIANT)) as server:
        assert main(["eval", "--base-url", server.base_url, *_common(model_dir, shared_dir, out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def offline_results(model_dir, shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "offline.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "vllm_plugins.cli", "eval", "--backend", "offline",
                           *_common(model_dir, shared_dir, out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    assert "| fp |" in proc.stdout
    return json.loads(out.read_text())


def _hf_lastword(model_dir, shared_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_plugins.evaluation.tasks import data

    rows = data.last_word_rows((shared_dir / "data" / "tinystories_val.txt").read_text(encoding="utf-8"))[:LIMIT]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lls, greedy = [], []
    for row in rows:
        # lm-eval's split: continuation = tokens of context+target beyond those of context.
        ctx = tok(row["context"]).input_ids
        whole = tok(row["context"] + row["target"]).input_ids
        cont = whole[len(ctx):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        pos = range(len(whole) - len(cont) - 1, len(whole) - 1)
        lls.append(sum(logp[p, t].item() for p, t in zip(pos, cont)))
        greedy.append(all(logp[p].argmax().item() == t for p, t in zip(pos, cont)))
    return sum(greedy) / len(greedy), math.exp(-sum(lls) / len(lls))


@pytest.mark.parametrize("backend", ["server", "offline"])
def test_lastword_matches_hf(backend, request, model_dir, shared_dir):
    res = request.getfixturevalue(f"{backend}_results")["results"]["fp"]["tinystories_lastword"]
    acc, ppl = _hf_lastword(model_dir, shared_dir)
    assert res["acc"] == pytest.approx(acc)
    assert res["perplexity"] == pytest.approx(ppl, rel=5e-3)


def test_backends_agree_on_wikitext(server_results, offline_results):
    server = server_results["results"]["fp"]["wikitext2_ppl"]
    offline = offline_results["results"]["fp"]["wikitext2_ppl"]
    assert math.isfinite(server["word_perplexity"]) and server["word_perplexity"] > 1
    assert server["word_perplexity"] == pytest.approx(offline["word_perplexity"], rel=2e-2)
    assert "| fp |" in server_results["table"]
