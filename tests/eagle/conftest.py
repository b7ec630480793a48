"""Fixtures of the EAGLE tests: tiny targets and drafters trained for them,
built once per session (training is short; quality does not matter for
losslessness or formats, only for the acceptance test)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llama_target(tiny_llama) -> Path:
    """Stock Llama with head size 32, which vLLM's CPU attention serves."""
    return tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def synthetic_text(tmp_path_factory) -> Path:
    from models.tiny import synthetic_corpus

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(synthetic_corpus()))
    return path


def _train(target: Path, data: Path, out: Path, **overrides) -> Path:
    from eagle.train import TrainDrafterConfig, train_drafter

    settings = dict(steps=8, seq_len=64, batch_size=4, draft_vocab_size=256,
                    self_distill_sequences=8, progress=False)
    settings.update(overrides)
    return train_drafter(TrainDrafterConfig(target=target, data=data, out=out, **settings))


@pytest.fixture(scope="session")
def llama_drafter(llama_target, synthetic_text, tmp_path_factory) -> Path:
    return _train(llama_target, synthetic_text, tmp_path_factory.mktemp("llama-draft") / "d")


@pytest.fixture(scope="session")
def vlm_target(tmp_path_factory, image_conversations) -> Path:
    """The tiny LLaVA-style VLM, briefly trained to answer from its image
    (the colours of a box and its field): its answers depend on the image
    and are regular enough for a drafter to learn."""
    from models.tiny_vlm import build_tiny_llava

    path = build_tiny_llava(tmp_path_factory.mktemp("tiny-vlm"))
    _fit_vlm(path, image_conversations, steps=VLM_TARGET_STEPS)
    return path


VLM_TARGET_STEPS = 300


def _fit_vlm(path: Path, data: Path, steps: int, batch_size: int = 16) -> None:
    """Teacher-forced training on the jsonl's answers, prompts laid out as
    served (chat template, 16 placeholders); saved in place."""
    import json

    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from eagle.mm_data import load_image, read_conversations
    from eagle.vlm_inputs import VLMInputs

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vlm = VLMInputs(model, path)
    rows = []
    for conv in read_conversations(data):
        pixels, n = vlm.pixels(load_image(data, conv))
        prompt, _ = vlm.prompt_ids(tokenizer, conv.prompt, n, "test data")
        answer = tokenizer(conv.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + answer, len(prompt), pixels["pixel_values"]))
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (seq, plen, _) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, plen: len(seq)] = torch.tensor(seq[plen:])
        attn[i, : len(seq)] = 1
    pixels = torch.cat([r[2] for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    gen = torch.Generator().manual_seed(0)
    # One thread, as demo-vlm and train-drafter train: with torch's two threads
    # beside other busy processes, these fixtures' setup took 302 s (47.5 s alone).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            pick = torch.randint(0, len(rows), (batch_size,), generator=gen)
            loss = model(input_ids=ids[pick], pixel_values=pixels[pick], attention_mask=attn[pick],
                         labels=labels[pick]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    config = json.loads((path / "config.json").read_text())
    model.eval().save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    saved["architectures"] = config["architectures"]  # vLLM must keep picking the tiny VLM class
    (path / "config.json").write_text(json.dumps(saved, indent=2))


QUESTIONS = ["Tell me a story.", "What is in the image?", "Describe the picture."]
PALETTE = {"red": (200, 30, 60), "green": (20, 180, 90), "yellow": (250, 250, 10),
           "blue": (30, 60, 220), "white": (245, 245, 245), "black": (15, 15, 15)}


def write_image_conversations(root: Path, n: int, seed: int = 0, size: int = 32) -> Path:
    """``root/train.jsonl`` in the LLaVA format with ``n`` PNG images under
    ``root/img``: a field of one colour with a box of another (and, half of
    the time, the diagonal dots of the serve test's images); the answer names
    both colours."""
    import json
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        field, box = rng.sample(sorted(PALETTE), 2)
        img = Image.new("RGB", (size, size), PALETTE[field])
        x, y = rng.randrange(size // 2), rng.randrange(size // 2)
        ImageDraw.Draw(img).rectangle([x, y, x + size // 3, y + size // 3], fill=PALETTE[box])
        if rng.random() < 0.5:
            for d in range(0, size, 4):
                img.putpixel((d, d), (0, 0, 0))
        img.save(root / "img" / f"{i}.png")
        answer = (f"The box is {box} and the field is {field}. "
                  f"Tom saw the {box} box in the {field} field and he was happy.")
        rows.append({"image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
            {"from": "gpt", "value": answer},
        ]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def image_conversations(tmp_path_factory) -> Path:
    return write_image_conversations(tmp_path_factory.mktemp("image-data"), 128)


@pytest.fixture(scope="session")
def vlm_drafter(vlm_target, image_conversations, tmp_path_factory) -> Path:
    """Trained on the tiny VLM's own image-conditioned answers, long enough
    for the serve test to accept a good share of its drafts."""
    return _train(vlm_target, image_conversations, tmp_path_factory.mktemp("vlm-draft") / "d",
                  steps=VLM_DRAFTER_STEPS, seq_len=48, batch_size=8, self_distill_sequences=128,
                  draft_vocab_size=None)


VLM_DRAFTER_STEPS = 300


@pytest.fixture(scope="session")
def vllm_drafter(vllm_single_process):
    """``vllm_drafter(target_dir, draft_dir, cls=None, weights=None)``: build the
    vLLM drafter class in this process (no engine, no attention forward),
    with vLLM's own config parsing of both checkpoints, and load
    ``weights`` (default: the draft checkpoint's raw tensors). Returns
    ``(model, loaded_names, parameters_as_loaded)``."""
    import torch
    from vllm.config import (
        DeviceConfig, ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig,
        set_current_vllm_config,
    )
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from eagle.drafter import Eagle3MultimodalLlamaForCausalLM

    def build(target: Path, draft: Path, cls=None, weights=None):
        model_config = ModelConfig(model=str(target), dtype="float32", enforce_eager=True,
                                   max_model_len=256)
        parallel = ParallelConfig()
        spec = SpeculativeConfig(model=str(draft), method="eagle3", num_speculative_tokens=3,
                                 target_model_config=model_config, target_parallel_config=parallel)
        config = VllmConfig(model_config=model_config, parallel_config=parallel,
                            speculative_config=spec, device_config=DeviceConfig("cpu"))
        with set_current_vllm_config(config):
            model = (cls or Eagle3MultimodalLlamaForCausalLM)(vllm_config=config)
            if weights is None:
                weights = _raw_tensors(draft)
            loaded = model.load_weights(list(weights.items()))
            # Snapshot first: on CPU, post-processing repacks linear weights.
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            process_weights_after_loading(model, spec.draft_model_config, torch.device("cpu"))
        return model.eval(), loaded, params

    return build


@pytest.fixture(scope="session")
def raw_tensors():
    """``raw_tensors(draft_dir)``: its tensors under their on-disk names."""
    return _raw_tensors


def _raw_tensors(draft: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if (draft / "pytorch_model.bin").is_file():
        return torch.load(draft / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return load_file(str(draft / "model.safetensors"))
