"""`vllm-plugins demo-model`: the main job's self-built default checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from models.demo import DemoConfig, build_demo_model
from vllm_plugins.cli import main


def _heldout_nll(model_dir) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = (model_dir / "heldout.txt").read_text().split("\n\n")[:8]
    ids = tok("\n\n".join(text), return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_training_lowers_heldout_loss(tmp_path):
    small = dict(steps=40, batch_size=4, seq_len=64)
    untrained = build_demo_model(tmp_path / "untrained", DemoConfig(**{**small, "steps": 0}), progress=False)
    trained = build_demo_model(tmp_path / "trained", DemoConfig(**small), progress=False)
    for d in (untrained, trained):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "calib.txt", "heldout.txt"):
            assert (d / name).is_file(), name
    before, after = _heldout_nll(untrained), _heldout_nll(trained)
    assert before > math.log(100)  # near-uniform over a 512 vocabulary
    assert after < 0.6 * before, (before, after)


def test_existing_output_is_refused(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["demo-model", "--out", str(out), "--steps", "0"]) == 2
    assert f"--out {out} already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"  # an empty directory is taken over, as by every command
    empty.mkdir()
    assert main(["demo-model", "--out", str(empty), "--steps", "0"]) == 0
    assert (empty / "model.safetensors").is_file()


def test_bad_config_is_one_error(tmp_path, capsys):
    assert main(["demo-model", "--out", str(tmp_path / "x"), "--steps", "-1"]) == 2
    assert "steps >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
