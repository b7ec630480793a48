"""End to end: the tiny VLM served with the multimodal drafter (eagle3, K=3)
through ``vllm serve``; images go through the OpenAI chat API. Greedy
outputs must equal the Hugging Face target's own greedy decoding, with a
drafter (trained by ``train-drafter`` on image conversations) that gets more
than 30% of its draft tokens accepted, so the lossless check covers accepted
drafts; and ``train-drafter`` lays out its prompts exactly as the server does."""

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


@pytest.fixture(scope="module")
def hf_model(vlm_target):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(vlm_target, dtype=torch.float32).eval()


def _hf_greedy(target, model, prompt_ids, img, max_tokens):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(target)
    pixels = proc.image_processor(images=img, return_tensors="pt")["pixel_values"]
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                         max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("color", COLORS)
def test_vlm_chat_with_image_is_lossless(server, vlm_target, hf_model, color):
    img = _image(color)
    out = _chat(server, img, "Tell me a story.", max_tokens=24)
    prompt_ids = out["prompt_token_ids"]
    image_token = json.loads((vlm_target / "config.json").read_text())["image_token_index"]
    assert prompt_ids.count(image_token) == 16, "the image did not reach the prompt"
    got = out["choices"][0]["token_ids"]
    assert got == _hf_greedy(vlm_target, hf_model, prompt_ids, img, len(got))


def test_training_prompt_is_the_served_prompt(server, vlm_target, hf_model):
    from transformers import AutoTokenizer

    from eagle.vlm_inputs import VLMInputs

    out = _chat(server, _image(COLORS[0]), "Tell me a story.", max_tokens=1)
    tokenizer = AutoTokenizer.from_pretrained(vlm_target)
    ids, _ = VLMInputs(hf_model, vlm_target).prompt_ids(tokenizer, "<image>\nTell me a story.", 16, "test")
    assert ids == out["prompt_token_ids"]


def test_vlm_drafts_were_proposed(server):
    # vLLM logs this when a drafter cannot take the target's image embeddings.
    assert "does not support external multimodal embeddings" not in server.log()
    text = requests.get(server.url("/metrics"), timeout=30).text
    def counter(name):
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(f"vllm:spec_decode_{name}_total"))

    assert counter("num_drafts") > 0, "no spec-decode drafts were made"
    rate = counter("num_accepted_tokens") / counter("num_draft_tokens")
    print(f"draft tokens accepted: {rate:.1%}")
    assert rate > 0.3, f"only {rate:.1%} of the draft tokens were accepted"
