"""`vllm-plugins demo-vlm`: the trained tiny VLM and its jsonl datasets.

Builds use a few training steps (fast); that the default build reaches its
held-out accuracy is a benchmark (the command prints it), not a test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.vlm_demo import HELDOUT_STREAM, DRAFTER_STREAM, VlmDemoConfig, build_demo_vlm
from vllm_plugins.cli import main

SMALL = dict(steps=30, batch_size=8, train_records=8, heldout_records=12)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo-vlm")
    trained = build_demo_vlm(base / "trained", VlmDemoConfig(**SMALL), progress=False)
    untrained = build_demo_vlm(base / "untrained", VlmDemoConfig(**{**SMALL, "steps": 0}), progress=False)
    return base / "trained", trained, untrained


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_checkpoint_and_jsonl_contract(built):
    from PIL import Image

    from models.tiny_vlm import IMAGE_TOKEN, VLM_ARCH

    out, _, _ = built
    cfg = VlmDemoConfig(**SMALL)
    assert json.loads((out / "config.json").read_text())["architectures"] == [VLM_ARCH]
    for name, n, stream in (("train", cfg.train_records, DRAFTER_STREAM),
                            ("heldout", cfg.heldout_records, HELDOUT_STREAM)):
        rows = _rows(out / f"{name}.jsonl")
        samples = cfg.samples(n, cfg.seed + stream)
        assert len(rows) == n
        for row, s in zip(rows, samples):
            assert set(row) == {"image", "conversations", "task"}
            assert not row["image"].startswith("/")
            human, gpt = row["conversations"]
            assert human == {"from": "human", "value": f"{IMAGE_TOKEN}\n{s.question}"}
            assert gpt == {"from": "gpt", "value": s.answer} and row["task"] == s.task
            # PNG is lossless: the file holds exactly the generated image.
            with Image.open(out / row["image"]) as img:
                assert np.array_equal(np.asarray(img.convert("RGB")), s.image)
    train_imgs = {r["image"] for r in _rows(out / "train.jsonl")}
    assert not train_imgs & {r["image"] for r in _rows(out / "heldout.jsonl")}
    record = json.loads((out / "vlm_demo.json").read_text())
    assert record["config"]["steps"] == SMALL["steps"]
    assert set(record["heldout_exact_match"]) == {"global", "grid", "count", "position", "overall"}


def test_training_lowers_heldout_loss(built):
    _, trained, untrained = built
    assert untrained["loss"] > 4.0  # near-uniform over the vocabulary
    assert trained["loss"] < 0.6 * untrained["loss"], (trained["loss"], untrained["loss"])


def test_encoding_matches_the_hf_processor(built):
    """Prompt ids and pixels equal what the checkpoint's own LlavaProcessor
    makes of the chat-formatted prompt and the PNG."""
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    from models.tiny_vlm import IMAGE_TOKEN
    from models.vlm_train import expand_image, pixel_values, prompt_ids

    out, _, _ = built
    tok = AutoTokenizer.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    for row in _rows(out / "heldout.jsonl")[:4]:
        question = row["conversations"][0]["value"].split("\n", 1)[1]
        text = tok.apply_chat_template([{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}],
                                       add_generation_prompt=True, tokenize=False)
        with Image.open(out / row["image"]) as img:
            img = img.convert("RGB")
            ref = proc(images=img, text=text, add_special_tokens=False, return_tensors="pt")
            ours = expand_image(prompt_ids(tok, question), config["image_token_index"], 16)
            assert ref["input_ids"][0].tolist() == ours
            got = pixel_values([np.asarray(img)], proc.image_processor.image_mean, proc.image_processor.image_std)
            torch.testing.assert_close(got, ref["pixel_values"], atol=1e-5, rtol=0)


def test_existing_output_is_refused(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["demo-vlm", "--out", str(out), "--steps", "0"]) == 2
    assert f"--out {out} already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_bad_config_is_one_error(tmp_path, capsys):
    assert main(["demo-vlm", "--out", str(tmp_path / "x"), "--train-records", "0"]) == 2
    assert "train_records >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
