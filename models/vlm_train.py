"""Prompt encoding, training and exact-match evaluation of the tiny VLM demo.

The prompt is the checkpoint's chat template applied to one user turn
``"<image>\\n<question>"`` (the LLaVA/ShareGPT human turn), tokenized with
no extra special tokens: ``<s>user: <image>\\n<question>\\nassistant:``.
The answer follows as `` <answer>`` and ends with EOS. The single
``<image>`` token is expanded to one placeholder per vision patch, as
vLLM's processor and ``LlavaProcessor`` do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.tiny_vlm import IMAGE_TOKEN
from models.vlm_tasks import CELL_LABELS, Sample


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the chat prompt for ``question``, one ``<image>`` token."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}],
        add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's ids as the model generates them: `` <answer>`` then EOS."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def expand_image(ids: Sequence[int], image_token_id: int, n: int) -> list[int]:
    out: list[int] = []
    for i in ids:
        out.extend([i] * n if i == image_token_id else [i])
    return out


def pixel_values(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP normalisation of images already at the model's size (what the
    checkpoint's image processor does to them: its resize and crop are
    identities there)."""
    x = torch.from_numpy(np.stack(images)).float().div_(255.0).permute(0, 3, 1, 2)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


class Encoder:
    """Turns samples into padded ``input_ids``/``labels``/``pixel_values``."""

    def __init__(self, tokenizer, image_token_id: int, num_image_tokens: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.tok = tokenizer
        self.image_token_id = image_token_id
        self.n = num_image_tokens
        self.mean, self.std = mean, std
        self._prompts: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            self._prompts[question] = expand_image(prompt_ids(self.tok, question), self.image_token_id, self.n)
        return self._prompts[question]

    def batch(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for s in samples:
            p, a = self.prompt(s.question), answer_ids(self.tok, s.answer)
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(r) for r in rows)
        pad = self.tok.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels)):
            ids[i, :len(r)] = torch.tensor(r)
            lab[i, :len(lb)] = torch.tensor(lb)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": mask,
                "pixel_values": pixel_values([s.image for s in samples], self.mean, self.std)}


def batch_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy on answer tokens, and per-row exact
    match under teacher forcing (every answer token the argmax)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
    hit = (logits.argmax(-1) == labels) | (labels == -100)
    return loss, hit.all(dim=1)


@torch.no_grad()
def evaluate(model, encoder: Encoder, samples: Sequence[Sample], batch_size: int = 64) -> dict:
    """``{"exact_match": {family: rate, ..., "overall": rate}, "loss": mean}``.

    Greedy decoding reproduces an answer (and its EOS) exactly iff every
    answer token is the argmax given the correct previous tokens, so one
    teacher-forced forward decides it; ``loss`` is the mean over batches of
    the answer-token cross-entropy."""
    hits: dict[str, list[bool]] = {}
    losses = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        loss, ok = batch_loss(model, encoder.batch(chunk))
        losses.append(loss.item())
        for s, good in zip(chunk, ok.tolist()):
            hits.setdefault(s.task, []).append(good)
    rates = {task: sum(v) / len(v) for task, v in sorted(hits.items())}
    rates["overall"] = sum(sum(v) for v in hits.values()) / max(1, len(samples))
    return {"exact_match": rates, "loss": sum(losses) / max(1, len(losses))}


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's output, one row per vision patch: what the language
    model reads at the placeholders. ``(batch, patches, text_hidden)``."""
    return torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))


def cell_targets(samples: Sequence[Sample]) -> torch.Tensor:
    """``(batch, cells)`` indices into :data:`CELL_LABELS`."""
    index = {label: i for i, label in enumerate(CELL_LABELS)}
    return torch.tensor([[index[c] for c in s.cells] for s in samples])


def pretrain_vision(model, encoder: Encoder, draw: Callable[[], Sequence[Sample]], steps: int,
                    lr: float) -> tuple[torch.nn.Linear, float]:
    """Stage 0, standing in for the pretrained vision encoder a real LLaVA
    starts from: train the vision tower and projector, with a linear probe
    on the projector's output, to name each cell's content
    (:data:`CELL_LABELS`). Returns the probe (the caller throws it away) and
    its accuracy on the last batch. The language model is not touched."""
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(CELL_LABELS))
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    acc = 0.0
    for _ in range(steps):
        samples = draw()
        logits = head(image_features(model, pixel_values([s.image for s in samples], encoder.mean, encoder.std)))
        target = cell_targets(samples)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(-1) == target).float().mean().item()
    return head, acc
