"""The optimizer step and learning-rate schedule shared by the project's training loops.

``models/demo.py`` (the main job's text model), ``models/vlm_demo.py`` (the
tiny VLM target) and ``eagle/train.py`` (drafters) all take the same step:
zero the gradients, back-propagate, optionally clip the global gradient norm,
step the optimizer and then the schedule.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(warmup: int, steps: int, floor: float):
    """A LambdaLR factor: linear warmup over ``warmup`` steps, then cosine decay from 1 to ``floor`` at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return factor


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, params=None,
                   max_grad_norm: float | None = None) -> None:
    """Back-propagate ``loss`` and take one step of ``opt`` and ``sched``; clip ``params``' norm to ``max_grad_norm`` first if given."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
