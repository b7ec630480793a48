"""Vision-language targets for drafter training: prompts, pixels, image
embeddings, positions and self-distillation, the way vLLM serves them.

Two families of Hugging Face targets:

- LLaVA-style (``LlavaForConditionalGeneration``, this project's tiny VLM):
  one ``image_token_index`` placeholder per vision patch (plus CLS for the
  ``full`` strategy; 576 for LLaVA-1.5), 1-D positions;
- Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): ``image_token_id``
  placeholders, as many as the image's merged patch grid, between
  ``vision_start`` / ``vision_end`` tokens; M-RoPE positions from the model's
  own ``get_rope_index`` (what vLLM computes at serve time).

Pixels come from transformers' PIL image processors (``CLIPImageProcessorPil``,
``Qwen2VLImageProcessorPil``), configured from the target's
``preprocessor_config.json`` when it has one: the processors that
``AutoProcessor`` picks need torchvision, which the CPU set-up lacks.

The target's language model is fed ``inputs_embeds`` built here (token
embeddings, image embeddings written over the placeholder positions), so an
image-token id inside the text is just a token, as in vLLM, instead of a
"features and tokens do not match" crash; its loss is masked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eagle.checks import DrafterError
from eagle.features import target_features
from eagle.mm_data import IMAGE_TAG, Conversation, load_image

# embeds: the target's image embeddings at the placeholders; placeholder: the
# placeholder token's embedding there (both trained on the image-conditioned
# rows); none: rows without the image at all (text only, as public drafters).
IMAGE_INPUTS = ("embeds", "placeholder", "none")
_QWEN_TYPES = ("qwen2_5_vl", "qwen2_vl")


@dataclass
class Example:
    """One training row: ``ids`` holds ``n_image`` placeholders from ``start``."""

    ids: list[int]
    start: int
    n_image: int
    pixels: dict = field(repr=False)
    line: int = 0

    def text_ids(self) -> list[int]:
        return self.ids[: self.start] + self.ids[self.start + self.n_image:]


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T]
    valid: torch.Tensor  # [B, T] False on padding
    image_mask: torch.Tensor  # [B, T] placeholder positions
    pixels: dict


class VLMInputs:
    """What training needs of a vision-language ``target`` loaded from ``target_dir``."""

    def __init__(self, target, target_dir: Path):
        cfg = target.config
        self.target = target
        self.config = cfg
        self.qwen = getattr(cfg, "model_type", "") in _QWEN_TYPES
        token = getattr(cfg, "image_token_id", None)
        self.image_token_id = token if token is not None else getattr(cfg, "image_token_index", None)
        if self.image_token_id is None:
            raise DrafterError(f"--target {target_dir}: config.json has no image_token_id / "
                               "image_token_index")
        self.processor = _image_processor(cfg, target_dir, self.qwen)

    # --- prompts and pixels -------------------------------------------------
    def image_text(self, tokenizer) -> str:
        """The text the image tag becomes in the target's prompt."""
        text = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.qwen:
            start = tokenizer.convert_ids_to_tokens(self.config.vision_start_token_id)
            end = tokenizer.convert_ids_to_tokens(self.config.vision_end_token_id)
            text = start + text + end
        return text

    def pixels(self, image) -> tuple[dict, int]:
        """``(processor outputs for one image, number of placeholders)``."""
        out = self.processor(images=[image], return_tensors="pt")
        if self.qwen:
            grid = out["image_grid_thw"]
            merge = self.config.vision_config.spatial_merge_size
            return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, \
                int(grid.prod()) // merge ** 2
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if self.config.vision_feature_select_strategy == "full":
            n += 1
        return {"pixel_values": out["pixel_values"]}, n

    def prompt_ids(self, tokenizer, prompt: str, n_image: int, where: str) -> tuple[list[int], int]:
        """The served prompt (chat template, generation prompt) with the
        image expanded to ``n_image`` placeholders; ``(ids, start)``."""
        ids = _chat_ids(tokenizer, prompt.replace(IMAGE_TAG, self.image_text(tokenizer)))
        if ids.count(self.image_token_id) != 1:
            raise DrafterError(f"{where}: the prompt holds the image token "
                               f"{ids.count(self.image_token_id)} times besides its {IMAGE_TAG} tag")
        start = ids.index(self.image_token_id)
        return ids[:start] + [self.image_token_id] * n_image + ids[start + 1:], start

    def text_prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        """The prompt without its image: the human turn's text alone (no
        image tag, no placeholders), in the same chat template."""
        return _chat_ids(tokenizer, prompt.replace(IMAGE_TAG, "").strip())

    # --- target forward -----------------------------------------------------
    def image_embeds(self, pixels: dict) -> torch.Tensor:
        """The language model's input at the placeholders, ``[sum n, H]``."""
        model = self.target.model
        if self.qwen:
            out = model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
        else:
            out = model.get_image_features(
                pixel_values=pixels["pixel_values"],
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy)
        hidden = self.config.get_text_config().hidden_size
        return torch.cat(list(out.pooler_output)).reshape(-1, hidden)

    def positions(self, batch: Batch) -> torch.Tensor:
        """``[B, T]``, or ``[3, B, T]`` M-RoPE positions for Qwen2.5-VL
        (placeholder runs get the image grid's temporal/height/width)."""
        b, t = batch.ids.shape
        if not self.qwen:
            return torch.arange(t, device=batch.ids.device).expand(b, t)
        pos, _ = self.target.model.get_rope_index(
            batch.ids, batch.image_mask.int(), image_grid_thw=batch.pixels.get("image_grid_thw"))
        return pos

    def inputs_embeds(self, batch: Batch) -> torch.Tensor:
        embed = self.target.get_input_embeddings()
        x = embed(batch.ids.masked_fill(batch.image_mask, 0))
        if not batch.pixels:  # text-only rows: the vision tower is never run
            return x
        image = self.image_embeds(batch.pixels).to(x.dtype)
        if image.shape[0] != int(batch.image_mask.sum()):
            raise DrafterError(f"the target's vision tower gave {image.shape[0]} image embeddings "
                               f"for {int(batch.image_mask.sum())} placeholders")
        return x.masked_scatter(batch.image_mask[..., None], image)

    def placeholder_embedding(self) -> torch.Tensor:
        """What a stock (text-only) drafter reads at image positions."""
        embed = self.target.get_input_embeddings()
        return embed.weight[self.image_token_id]

    @torch.no_grad()
    def generate(self, prompts: list[Example], new_tokens: int, eos: int | None) -> list[list[int]]:
        """Greedy continuations of same-shape prompts, conditioned on their
        images: at most ``new_tokens``, ending with the first ``eos`` (kept),
        as a served response ends. (Forcing ``new_tokens`` past EOS made most
        of every row text the target never writes when served.)"""
        device = self.target.device
        ids = torch.tensor([p.ids for p in prompts], device=device)
        kwargs = collate_pixels([p.pixels for p in prompts], self.qwen, device)
        if self.qwen:
            mask = torch.zeros_like(ids, dtype=torch.int)
            for row, p in enumerate(prompts):
                mask[row, p.start: p.start + p.n_image] = 1
            kwargs["mm_token_type_ids"] = mask
        out = self.target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs,
                                   max_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
        return [cont[: cont.index(eos) + 1] if eos in cont else cont
                for cont in out[:, ids.shape[1]:].tolist()]


def _chat_ids(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def _image_processor(cfg, target_dir: Path, qwen: bool):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    saved = target_dir / "preprocessor_config.json"
    kwargs = {}
    if saved.is_file():
        raw = json.loads(saved.read_text())
        keep = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
                "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")
        kwargs = {k: raw[k] for k in keep if k in raw}
    vc = cfg.vision_config
    if qwen:
        kwargs.setdefault("patch_size", vc.patch_size)
        kwargs.setdefault("temporal_patch_size", vc.temporal_patch_size)
        kwargs.setdefault("merge_size", vc.spatial_merge_size)
        return Qwen2VLImageProcessorPil(**kwargs)
    kwargs.setdefault("size", {"shortest_edge": vc.image_size})
    kwargs.setdefault("crop_size", {"height": vc.image_size, "width": vc.image_size})
    return CLIPImageProcessorPil(**kwargs)


def collate_pixels(items: list[dict], qwen: bool, device) -> dict:
    """The batch's pixels; ``{}`` for text-only rows (no image in any row)."""
    if not any(items):
        return {}
    if not all(items):
        raise DrafterError("a batch mixes rows with and without an image")
    if qwen:
        return {"pixel_values": torch.cat([p["pixel_values"] for p in items]).to(device),
                "image_grid_thw": torch.cat([p["image_grid_thw"] for p in items]).to(device)}
    return {"pixel_values": torch.cat([p["pixel_values"] for p in items]).to(device)}


def collate(examples: list[Example], qwen: bool, device, pad_id: int = 0) -> Batch:
    """Right-padded batch; placeholders are contiguous per row."""
    t = max(len(e.ids) for e in examples)
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    valid = torch.zeros(b, t, dtype=torch.bool)
    image = torch.zeros(b, t, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        valid[row, : len(e.ids)] = True
        image[row, e.start: e.start + e.n_image] = True
    return Batch(ids.to(device), valid.to(device), image.to(device),
                 collate_pixels([e.pixels for e in examples], qwen, device))


def build_examples(vlm: VLMInputs, tokenizer, convs: list[Conversation], data: Path, *,
                   seq_len: int, distill: int, natural_text: bool, progress: bool = False,
                   batch_size: int = 32, text_only: bool = False) -> list[Example]:
    """Training rows: the prompt with its image, then up to ``seq_len`` text
    tokens in all (the image placeholders come on top). Responses are the
    target's greedy continuation given the image for the first ``distill``
    conversations (self-distillation), plus the dataset's own answers with
    ``natural_text`` (or when ``distill`` is 0). With ``text_only`` the
    responses are the same but each row's prompt is the human turn's text
    alone (:meth:`VLMInputs.text_prompt_ids`): no image token, no pixels."""
    from tqdm import tqdm

    prompts = []
    for conv in convs:
        where = f"--data {data} line {conv.line}"
        pixels, n = vlm.pixels(load_image(data, conv))
        ids, start = vlm.prompt_ids(tokenizer, conv.prompt, n, where)
        text_len = len(ids) - n
        if text_len >= seq_len:
            raise DrafterError(f"--seq-len {seq_len}: leaves no response text for {where} "
                               f"(its prompt has {text_len} text tokens besides {n} image placeholders)")
        prompts.append(Example(ids, start, n, pixels, conv.line))

    rows: list[Example] = []
    eos = tokenizer.eos_token_id
    if natural_text or not distill:
        for conv, p in zip(convs, prompts):
            answer = tokenizer(conv.response, add_special_tokens=False)["input_ids"]
            answer = (answer + ([eos] if eos is not None else []))[: seq_len - (len(p.ids) - p.n_image)]
            rows.append(Example(p.ids + answer, p.start, p.n_image, p.pixels, p.line))
    if distill:
        chosen = prompts[:distill]
        groups: dict[tuple, list[Example]] = {}
        for p in chosen:  # same prompt length and image shape: one generate call
            key = (len(p.ids), p.start, tuple(p.pixels["pixel_values"].shape))
            groups.setdefault(key, []).append(p)
        bar = tqdm(total=len(chosen), desc="self-distill (with images)", disable=not progress)
        for group in groups.values():
            new = seq_len - (len(group[0].ids) - group[0].n_image)
            for i in range(0, len(group), batch_size):
                part = group[i: i + batch_size]
                for p, cont in zip(part, vlm.generate(part, new, eos)):
                    rows.append(Example(p.ids + cont, p.start, p.n_image, p.pixels, p.line))
                bar.update(len(part))
        bar.close()
    if text_only:
        prompt_of = {p.line: p for p in prompts}
        texts = {conv.line: vlm.text_prompt_ids(tokenizer, conv.prompt) for conv in convs}
        rows = [Example(texts[r.line] + r.ids[len(prompt_of[r.line].ids):], 0, 0, {}, r.line)
                for r in rows]
    return rows


@torch.no_grad()
def vlm_features(vlm: VLMInputs, batch: Batch, aux_ids, image_inputs: str = "embeds"):
    """``(features, positions)`` of ``batch`` for drafter training: the
    target's aux states and logits given the image, and the drafter's input
    embeddings at the placeholders: the image embeddings (``embeds``) or
    the placeholder token's embedding (``placeholder``, what vLLM's stock
    drafter reads)."""
    positions = vlm.positions(batch)
    embeds = vlm.inputs_embeds(batch)
    feats = target_features(vlm.target, None, aux_ids, inputs_embeds=embeds, position_ids=positions)
    if image_inputs == "placeholder":
        stock = vlm.placeholder_embedding().to(feats["embeds"].dtype)
        feats["embeds"] = feats["embeds"].masked_scatter(
            batch.image_mask[..., None], stock.expand(int(batch.image_mask.sum()), -1))
    return feats, positions


def label_mask(batch: Batch, image_token_id: int) -> torch.Tensor:
    """Positions whose token the drafter is trained to predict: text, not
    padding, not an image-token id that turned up inside the text."""
    return batch.valid & ~batch.image_mask & (batch.ids != image_token_id)
