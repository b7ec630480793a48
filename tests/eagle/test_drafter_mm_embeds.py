"""Mechanics: at image placeholder positions the multimodal drafter's input
embeddings are the target's image embeddings; a text-only drafter (vLLM's
stock ``Eagle3LlamaForCausalLM``, same weights) reads the placeholder
token's embedding there instead. Plus the optional norms."""

from __future__ import annotations

import json

import pytest
import torch
from vllm.model_executor.models.interfaces import supports_multimodal_embeddings
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

from eagle.layouts import read_drafter, write_drafter
from eagle.torch_drafter import TorchEagle3Drafter


@pytest.fixture(scope="module")
def hf_vlm(vlm_target):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(vlm_target, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def image_case(hf_vlm, vlm_target):
    """Token ids with one image's placeholders and the target's embeddings
    for that image (vision tower + projector, as the target computes them)."""
    cfg = json.loads((vlm_target / "config.json").read_text())
    image_token = cfg["image_token_index"]
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = hf_vlm.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default")
    image_embeds = torch.cat(list(feats.pooler_output))  # projected, one entry per image
    ids = torch.tensor([1, 40, *[image_token] * image_embeds.shape[0], 41, 42])
    return ids, ids == image_token, image_embeds


def _with_target_embeddings(model, hf_vlm):
    weight = hf_vlm.get_input_embeddings().weight  # vLLM pads its table to a multiple of 64
    model.model.embed_tokens.weight.data[: weight.shape[0]].copy_(weight)
    return model


def test_multimodal_drafter_takes_target_image_embeddings(vlm_target, vlm_drafter, vllm_drafter,
                                                          hf_vlm, image_case):
    ids, mask, image_embeds = image_case
    model = _with_target_embeddings(vllm_drafter(vlm_target, vlm_drafter)[0], hf_vlm)
    assert supports_multimodal_embeddings(model)
    with torch.no_grad():
        embeds = model.embed_input_ids(ids, multimodal_embeddings=[image_embeds], is_multimodal=mask)
        text = hf_vlm.get_input_embeddings()(ids[~mask])
    assert torch.equal(embeds[mask], image_embeds)
    assert torch.equal(embeds[~mask], text)


def test_text_only_drafter_does_not(vlm_target, vlm_drafter, vllm_drafter, hf_vlm, image_case):
    ids, mask, image_embeds = image_case
    stock = _with_target_embeddings(
        vllm_drafter(vlm_target, vlm_drafter, cls=Eagle3LlamaForCausalLM)[0], hf_vlm)
    assert not supports_multimodal_embeddings(stock)
    with torch.no_grad():
        embeds = stock.embed_input_ids(ids, multimodal_embeddings=[image_embeds], is_multimodal=mask)
        placeholder = hf_vlm.get_input_embeddings()(ids[mask])
    assert torch.equal(embeds[mask], placeholder)
    assert not torch.allclose(embeds[mask], image_embeds)


def test_out_of_vocabulary_placeholders(llama_target, llama_drafter, vllm_drafter):
    model = vllm_drafter(llama_target, llama_drafter)[0]
    ids = torch.tensor([1, 9999, 9999, 5])  # placeholder id beyond the vocabulary
    mask = ids == 9999
    image = torch.randn(2, 128)
    embeds = model.embed_input_ids(ids, multimodal_embeddings=[image], is_multimodal=mask)
    assert torch.equal(embeds[mask], image)


def test_optional_norms(llama_target, llama_drafter, vllm_drafter, tmp_path):
    _, cfg, state = read_drafter(llama_drafter)
    cfg.update(input_embeds_norm=True, fused_hidden_norm=True)
    torch.manual_seed(1)
    state["embed_norm.weight"] = 1 + 0.3 * torch.randn(cfg["hidden_size"])
    state["fused_norm.weight"] = 1 + 0.3 * torch.randn(cfg["hidden_size"])
    path = write_drafter(tmp_path / "normed", state, cfg, "specforge")
    model, loaded, params = vllm_drafter(llama_target, path)
    assert torch.equal(params["model.fused_norm.weight"], state["fused_norm.weight"])
    assert torch.equal(params["model.embed_norm.weight"], state["embed_norm.weight"])
    ref = TorchEagle3Drafter(cfg, 3).eval()
    ref.load_state_dict(state, strict=False)
    aux = torch.randn(5, 3 * cfg["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(model.combine_hidden_states(aux), ref.fuse(aux), rtol=1e-5, atol=1e-5)
        plain = vllm_drafter(llama_target, llama_drafter)[0].combine_hidden_states(aux)
    assert not torch.allclose(plain, ref.fuse(aux))
