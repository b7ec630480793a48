"""End to end: the tiny VLM served with the multimodal drafter (eagle3, K=3)
through ``vllm serve``; images go through the OpenAI chat API. Greedy
outputs must equal the Hugging Face target's own greedy decoding."""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
import torch

from vllm_plugins.serving import VllmServer

COLORS = [(200, 30, 60), (20, 180, 90), (250, 250, 10)]


def _image(color):
    from PIL import Image

    img = Image.new("RGB", (32, 32), color)
    for x in range(0, 32, 4):
        img.putpixel((x, x), (0, 0, 0))
    return img


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(vlm_target, vlm_drafter):
    spec = {"method": "eagle3", "model": str(vlm_drafter), "num_speculative_tokens": 3}
    srv = VllmServer(vlm_target, "--enforce-eager", "--max-model-len", "512", "--dtype", "float32",
                     "--speculative-config", json.dumps(spec))
    with srv:
        yield srv


def _chat(server, img, text, max_tokens=12):
    payload = {
        "model": server.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(img)}},
            {"type": "text", "text": text},
        ]}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
    }
    r = requests.post(server.url("/v1/chat/completions"), json=payload, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _hf_greedy(target, prompt_ids, img, max_tokens):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(target)
    model = LlavaForConditionalGeneration.from_pretrained(target, dtype=torch.float32).eval()
    pixels = proc.image_processor(images=img, return_tensors="pt")["pixel_values"]
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                         max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("color", COLORS)
def test_vlm_chat_with_image_is_lossless(server, vlm_target, color):
    img = _image(color)
    out = _chat(server, img, "Tell me a story.")
    prompt_ids = out["prompt_token_ids"]
    image_token = json.loads((vlm_target / "config.json").read_text())["image_token_index"]
    assert prompt_ids.count(image_token) == 16, "the image did not reach the prompt"
    got = out["choices"][0]["token_ids"]
    assert got == _hf_greedy(vlm_target, prompt_ids, img, len(got))


def test_vlm_drafts_were_proposed(server):
    # vLLM logs this when a drafter cannot take the target's image embeddings.
    assert "does not support external multimodal embeddings" not in server.log()
    text = requests.get(server.url("/metrics"), timeout=30).text
    drafts = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert drafts and sum(drafts) > 0, "no spec-decode drafts were made"
