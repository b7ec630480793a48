"""A tiny LLaVA-style vision-language checkpoint built locally, with no download.

CLIP vision tower + two-layer projector + Llama language model, random
weights, the local BPE tokenizer of :mod:`models.tiny` plus an ``<image>``
token, and a ``LlavaProcessor`` whose image processor is
``CLIPImageProcessorPil`` (no torchvision needed). Hugging Face loads it as
``LlavaForConditionalGeneration``; its ``architectures`` names
:data:`VLM_ARCH`, this package's vLLM class for it
(:mod:`eagle.vlm_target`), since vLLM's own ``llava.py`` needs torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path

VLM_ARCH = "TinyLlavaForConditionalGeneration"
IMAGE_TOKEN = "<image>"


def build_tiny_llava(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 64,
    text_hidden_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    num_hidden_layers: int = 2,
    vocab_size: int = 512,
    initializer_range: float = 0.2,
    seed: int = 0,
    intermediate_size: int | None = None,
    vision_layers: int = 2,
    vision_heads: int = 2,
    tokenizer_texts: list[str] | None = None,
) -> Path:
    """Save the checkpoint to ``out_dir`` and return it.

    ``intermediate_size`` defaults to twice the text hidden size;
    ``tokenizer_texts`` is the BPE training text (default: the synthetic
    stories of :mod:`models.tiny`)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from models.tiny import build_tokenizer

    out = Path(out_dir)
    tokenizer = build_tokenizer(out, vocab_size=vocab_size, seed=seed, texts=tokenizer_texts)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = LlamaConfig(
        hidden_size=text_hidden_size,
        intermediate_size=intermediate_size or 2 * text_hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=text_hidden_size // num_attention_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            elif "projector" in name and param.dim() == 2:
                param.normal_(0.0, initializer_range)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained writes the HF class name; vLLM must pick ours.
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["architectures"] = [VLM_ARCH]
    cfg_path.write_text(json.dumps(saved, indent=2))

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def num_image_tokens(image_size: int = 32, patch_size: int = 8) -> int:
    """Placeholder tokens per image ("default" strategy drops CLS)."""
    return (image_size // patch_size) ** 2
