"""``vllm-plugins convert``: llama2.c stories260K and a HF Llama checkpoint.

- Pure contracts: the wq/wk row permutation turns llama2.c's interleaved-pair
  RoPE into transformers' half-split RoPE; the rebuilt tokenizer encodes like
  llama2.c's own BPE encoder (re-implemented here from ``run.c``).
- HF greedy from "Once upon a time" on the converted stories260K gives the
  first sentence of the llama2.c reference output (karpathy/llama2.c,
  ``doc/stories260K.md``, ``./run ... -t 0.0``).
- vLLM serves the converted stories260K (head size 8, padded) and the
  config-only conversion of TinyStories-656K, both matching HF greedy.
- Bad input: one clear error, no output directory, source unchanged.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from variant_helpers import hf_greedy, job_outputs, load_hf

from vllm_plugins.cli import main as cli_main

# First sentence of the greedy (temperature 0) sample in llama2.c's doc/stories260K.md.
REFERENCE_FIRST_SENTENCE = "Once upon a time, there was a little girl named Lily."
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def stories_bin(shared_dir):
    return shared_dir / "models" / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="module")
def stories260k(stories_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "stories260K"
    assert cli_main(["convert", str(stories_bin), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tinystories(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "TinyStories-656K-variant"
    assert cli_main(["convert", str(shared_dir / "models" / "TinyStories-656K"), str(out)]) == 0
    return out


def _tree_digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


# --- pure contracts -------------------------------------------------------

def _rope_interleaved(x, pos, theta=10000.0):
    """llama2.c: rotate pairs (x[2i], x[2i+1]) of each head by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    freq = pos[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = torch.cos(freq)[:, None], torch.sin(freq)[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def _rope_half(x, pos, theta=10000.0):
    """transformers: rotate pairs (x[i], x[i + d/2])."""
    d = x.shape[-1]
    freq = pos[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = torch.cos(freq)[:, None], torch.sin(freq)[:, None]
    x0, x1 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)


def test_rope_permutation_makes_attention_scores_equal():
    from models.llama2c import unpermute_rope_rows

    g = torch.Generator().manual_seed(0)
    heads, hs, dim, tokens = 4, 8, 32, 6
    wq = torch.randn(heads * hs, dim, generator=g, dtype=torch.float64)
    wk = torch.randn(heads * hs, dim, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    pos = torch.arange(tokens, dtype=torch.float64) * 3

    def scores(q, k):
        return torch.einsum("thd,shd->hts", q, k)

    ref = scores(*(_rope_interleaved((x @ w.T).view(tokens, heads, hs), pos) for w in (wq, wk)))
    permuted = [torch.from_numpy(unpermute_rope_rows(w.numpy(), heads)) for w in (wq, wk)]
    got = scores(*(_rope_half((x @ w.T).view(tokens, heads, hs), pos) for w in permuted))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)
    # Without the permutation the scores differ: the test can fail.
    wrong = scores(*(_rope_half((x @ w.T).view(tokens, heads, hs), pos) for w in (wq, wk)))
    assert not torch.allclose(wrong, ref, atol=1e-3)


def _llama2c_encode(text, pieces):
    """llama2.c run.c ``encode``: dummy prefix, chars (byte fallback), best-score merges."""
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    scores = [s for _, s in pieces]
    ids = []
    for ch in "\u2581" + text.replace(" ", "\u2581"):
        if ch in vocab:
            ids.append(vocab[ch])
        else:
            ids += [vocab[f"<0x{b:02X}>"] for b in ch.encode("utf-8")]
    while True:
        best = None
        for i in range(len(ids) - 1):
            merged = pieces[ids[i]][0] + pieces[ids[i + 1]][0]
            if merged in vocab and (best is None or scores[vocab[merged]] > best[0]):
                best = (scores[vocab[merged]], i, vocab[merged])
        if best is None:
            return ids
        _, i, new = best
        ids[i:i + 2] = [new]


def test_tokenizer_encodes_like_llama2c(stories260k, stories_bin, shared_dir):
    from transformers import AutoTokenizer

    from models.llama2c import read_tokenizer

    pieces = read_tokenizer(stories_bin.parent / "tok512.bin", 512)
    tok = AutoTokenizer.from_pretrained(stories260k)
    text = (shared_dir / "data" / "tinystories_val.txt").read_text()[:3000]
    samples = [p.strip() for p in text.split("\n") if p.strip()][:20] + ["Émile ate 3½ cakes ☃!"]
    for sample in samples:
        assert tok(sample).input_ids == [tok.bos_token_id] + _llama2c_encode(sample, pieces), sample
        assert tok.decode(tok(sample).input_ids, skip_special_tokens=True) == sample


# --- conversion outputs ---------------------------------------------------

def test_hf_greedy_matches_llama2c_reference(stories260k):
    from transformers import AutoTokenizer

    model = load_hf(stories260k)
    assert type(model).__name__ == "LlamaVariantForCausalLM"
    tok = AutoTokenizer.from_pretrained(stories260k)
    prompt = tok("Once upon a time").input_ids
    out = hf_greedy(model, [prompt], MAX_TOKENS)[0]
    text = tok.decode(prompt + out, skip_special_tokens=True)
    assert text.startswith(REFERENCE_FIRST_SENTENCE), text


def test_config_only_conversion(tinystories, shared_dir):
    src = shared_dir / "models" / "TinyStories-656K"
    before, after = _tree_digest(src), _tree_digest(tinystories)
    assert {k: v for k, v in after.items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"
    }
    old = json.loads((src / "config.json").read_text())
    new = json.loads((tinystories / "config.json").read_text())
    assert new.pop("model_type") == "llama_variant" and old.pop("model_type") == "llama"
    assert new.pop("architectures") == ["LlamaVariantForCausalLM"]
    old.pop("architectures")
    assert new == old

    variant, stock = load_hf(tinystories), load_hf(src)
    assert type(variant).__name__ == "LlamaVariantForCausalLM"
    ids = torch.tensor([[1, 100, 200, 300, 400]])
    with torch.no_grad():
        torch.testing.assert_close(variant(ids).logits, stock(ids).logits, rtol=0, atol=0)


def test_bad_inputs_fail_cleanly(tmp_path, stories_bin, stories260k, capsys):
    truncated = tmp_path / "broken.bin"
    truncated.write_bytes(stories_bin.read_bytes()[:5000])
    (tmp_path / "tok512.bin").write_bytes((stories_bin.parent / "tok512.bin").read_bytes())
    cases = [
        (["convert", str(truncated), str(tmp_path / "out1")], "broken.bin"),
        (["convert", str(stories_bin), str(stories260k)], "already exists"),
        (["convert", str(tmp_path / "missing"), str(tmp_path / "out2")], "not found"),
        (["convert", str(tmp_path), str(tmp_path / "out3")], "config.json"),
    ]
    for argv, expected in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, err
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


# --- served by vLLM -------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_results(vllm_jobs, stories260k, tinystories):
    from transformers import AutoTokenizer

    prompts = {}
    for path in (stories260k, tinystories):
        tok = AutoTokenizer.from_pretrained(path)
        prompts[path] = [tok(p).input_ids for p in ("Once upon a time", "Tom and his dog")]
    outs = vllm_jobs([
        {"model": str(path), "prompts": prompts[path], "max_tokens": MAX_TOKENS}
        for path in (stories260k, tinystories)
    ])
    results = {path: (prompts[path], job_outputs(out)) for path, out in zip((stories260k, tinystories), outs)}
    return results, outs[0]["log"]


@pytest.mark.parametrize("which", ["stories260k", "tinystories"])
def test_vllm_serves_converted_checkpoint_like_hf(which, request, vllm_results):
    path = request.getfixturevalue(which)
    prompts, outs = vllm_results[0][path]
    assert [o["token_ids"] for o in outs] == hf_greedy(load_hf(path), prompts, MAX_TOKENS)


def test_vllm_pads_stories260k_heads(vllm_results):
    """vLLM's CPU attention refuses head size 8; the variant ran it padded."""
    assert "LlamaVariant: head size 8 runs attention at 32" in vllm_results[1]

