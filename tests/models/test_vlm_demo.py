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

SMALL = dict(steps=30, vision_pretrain_steps=10, batch_size=8, train_records=8, heldout_records=12)
UNTRAINED = {**SMALL, "steps": 0, "vision_pretrain_steps": 0}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo-vlm")
    trained = build_demo_vlm(base / "trained", VlmDemoConfig(**SMALL), progress=False)
    untrained = build_demo_vlm(base / "untrained", VlmDemoConfig(**UNTRAINED), progress=False)
    return base / "trained", trained, untrained


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _untrained_model(base):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from models.vlm_demo import _encoder

    model = LlavaForConditionalGeneration.from_pretrained(base / "untrained", dtype=torch.float32)
    return model, _encoder(base / "untrained", AutoTokenizer.from_pretrained(base / "untrained"), model.config)


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


def test_same_seed_gives_the_same_model(tmp_path):
    """Training runs on ``VlmDemoConfig.threads`` threads whatever torch's
    setting around it, so one seed gives bit-identical weights."""
    cfg = VlmDemoConfig(**{**SMALL, "steps": 6, "vision_pretrain_steps": 4})
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            build_demo_vlm(tmp_path / f"ambient-{threads}", cfg, progress=False)
    finally:
        torch.set_num_threads(before)
    a, b = _weights(tmp_path / "ambient-1"), _weights(tmp_path / "ambient-2")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_vision_pretraining_makes_cells_readable(built):
    """Stage 0 trains the vision tower, projector and a linear probe (not
    the language model) until the probe names the content of every cell of
    images it has not seen."""
    from models.vlm_train import cell_targets, image_features, pixel_values, pretrain_vision

    out, _, _ = built
    model, encoder = _untrained_model(out.parent)
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    cfg = VlmDemoConfig(**SMALL)
    seeds = iter(range(1000, 2000))
    probe, _ = pretrain_vision(model, encoder, lambda: cfg.samples(16, next(seeds)), steps=60, lr=3e-3)
    assert all(torch.equal(v, lm_before[k]) for k, v in model.model.language_model.state_dict().items())
    heldout = cfg.samples(64, 77)
    with torch.no_grad():
        logits = probe(image_features(model, pixel_values([s.image for s in heldout], encoder.mean, encoder.std)))
    accuracy = (logits.argmax(-1) == cell_targets(heldout)).double().mean().item()
    assert accuracy > 0.85, accuracy  # 0.94 here; 0.05 with the optimizer step left out


def test_stage_one_keeps_the_vision_tower_frozen(built):
    from models.vlm_demo import train_vlm

    out, _, _ = built
    model, encoder = _untrained_model(out.parent)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_vlm(model, encoder, VlmDemoConfig(**{**UNTRAINED, "steps": 3}), progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and not any("vision_tower" in k for k in changed)
    assert any("language_model" in k for k in changed) and any("projector" in k for k in changed)
    assert all(p.requires_grad for p in model.parameters())


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
