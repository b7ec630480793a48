"""TinyStories-656K served through the LLaMA variant with a drafter trained
here by ``train-drafter`` (its defaults), K=3, greedy, on held-out
TinyStories text:

- lossless: outputs identical to the target alone (same process, vLLM);
- acceptance: vLLM's mean acceptance length (from its spec-decode
  counters) is at least 2.0, the issue's target (a drafter that learned
  nothing scores about 1.0; the defaults measured 2.14 here).

48 prompts (about 1500 drafts) keep the figure's spread between prompt
sets near 0.04; 16 prompts gave 1.97 where 48 gave 2.00 for one drafter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANT = {"architectures": ["LlamaVariantForCausalLM"]}
PROMPT_TOKENS, MAX_TOKENS, NUM_PROMPTS = 24, 64, 48
ACCEPTANCE_TARGET = 2.0


@pytest.fixture(scope="module")
def target(shared_dir) -> Path:
    return shared_dir / "models" / "TinyStories-656K"


@pytest.fixture(scope="module")
def drafter(target, shared_dir, tmp_path_factory) -> Path:
    from eagle.train import TrainDrafterConfig, train_drafter

    out = tmp_path_factory.mktemp("ts-drafter") / "drafter"
    return train_drafter(TrainDrafterConfig(
        target=target, data=shared_dir / "data" / "tinystories_val.txt", out=out, progress=False))


@pytest.fixture(scope="module")
def run(target, drafter, shared_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from eagle.train import TrainDrafterConfig, split_text

    tok = AutoTokenizer.from_pretrained(target)
    # The held-out tail that train-drafter never saw.
    _, held = split_text(shared_dir / "data" / "tinystories_val.txt",
                         TrainDrafterConfig.holdout_fraction)
    prompts = [ids[:PROMPT_TOKENS] for ids in (tok(p)["input_ids"] for p in held)
               if len(ids) >= PROMPT_TOKENS][:NUM_PROMPTS]
    path = tmp_path_factory.mktemp("ts-prompts") / "prompts.json"
    path.write_text(json.dumps(prompts))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "eagle.spec_run", "--target", str(target), "--draft", str(drafter),
         "--hf-overrides", json.dumps(VARIANT), "--compare-target", "--prompts", str(path),
         "--max-tokens", str(MAX_TOKENS), "--k", "3"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("SPEC_RUN_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    return json.loads(lines[-1].split(" ", 1)[1])


def test_variant_with_drafter_is_lossless(run):
    assert len(run["outputs"]) == NUM_PROMPTS
    assert all(len(o) == MAX_TOKENS for o in run["outputs"])
    assert run["outputs"] == run["target_outputs"]


def test_mean_acceptance_length(run, record_property):
    spec = run["spec"]
    assert spec["num_drafts"] > 0
    mal = spec["mean_acceptance_length"]
    record_property("mean_acceptance_length", mal)
    print(f"\nTinyStories-656K, K=3: mean acceptance length {mal:.3f} "
          f"(accepted per position {spec['num_accepted_tokens_per_pos']}, drafts {spec['num_drafts']})")
    assert mal >= ACCEPTANCE_TARGET
