"""Replay the finished parts of a decoder layer in true-sequential calibration instead of recomputing them.

True-sequential calibration runs one forward pass per input group of a
layer (q/k/v, o, gate/up, down for a Llama), each through the already
quantized earlier groups, plus one pass that propagates the quantized
output: the attention is recomputed in four passes and the MLP's gate/up in
two, although their results stop changing once the groups inside them are
quantized. Every pass already captures its group's input ``X_g`` (for the
Hessian); this module keeps it for the rest of the layer and, in the later
passes, swaps two kinds of modules for stand-ins that return the kept
tensors:

- an *input replay*: a module without linears (a norm) whose output tensor
  *is* group ``g``'s input returns ``X_g``;
- a *tail replay*: a module (an attention block, an MLP) whose output is the
  very tensor returned by a linear ``L`` of group ``g`` (alone, or first of
  a tuple whose other items are ``None``) returns ``L(X_g)``, ``L`` carrying
  its quantized weight; every quantized linear inside the module belongs to
  group ``g`` or an earlier one.

Both conditions are checked on the layer's own forward (tensor identity, in
:func:`find_replays`), not assumed from module names, and a module qualifies
only when it and the linear are called once per forward. From the pass after
group ``g`` on, nothing that feeds such a module changes any more, and the
stand-in computes what the module would, on the same batches: the exports
are bit for bit those of recomputing (``tests/quant/test_quant_replay.py``).
The kept inputs cost memory (one ``[samples, seqlen, width]`` tensor per
group, where the calibration activations live), so they are kept only within
``QuantConfig.replay_cache_mb``, tail replays first (they skip the most work).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Replay:
    """One module of a layer that returns kept tensors from the pass after group ``group`` on."""

    module: str  # name inside the layer
    group: int  # index of the input group (in the layer's quantization plan) whose input it replays
    linear: str | None  # tail replay: the linear applied to that input; None: the input itself
    trailing_nones: int | None  # tail replay of a tuple output: the Nones after the tensor; None: a bare tensor


def find_replays(layer: nn.Module, outputs: dict[str, object], calls: dict[str, int],
                 linear_inputs: dict[str, torch.Tensor], linear_group: dict[str, int]) -> list[Replay]:
    """The replays of ``layer`` found on one recorded forward.

    ``outputs`` / ``calls``: each submodule's (name inside the layer) output and call count;
    ``linear_inputs``: each linear's input tensor; ``linear_group``: the plan index of the
    group of each quantized linear (linears left in float are absent).
    """
    modules = dict(layer.named_modules())
    linears = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    group_input = {}
    for name, g in linear_group.items():
        group_input.setdefault(g, linear_inputs[name])
    found: list[Replay] = []
    for name, mod in modules.items():
        if not name or name in linears or calls.get(name) != 1 or name not in outputs:
            continue
        if any(name.startswith(r.module + ".") for r in found):  # inside a module already replayed
            continue
        inner = [n for n in linears if n.startswith(name + ".")]
        out = outputs[name]
        if not inner:
            g = next((g for g, x in group_input.items() if out is x), None)
            if g is not None:
                found.append(Replay(name, g, None, None))
            continue
        head, rest = (out[0], out[1:]) if isinstance(out, tuple) and out else (out, None)
        if rest is not None and any(r is not None for r in rest):
            continue
        tail = next((n for n in inner if calls.get(n) == 1 and outputs.get(n) is head), None)
        if tail is None or tail not in linear_group:
            continue
        g = linear_group[tail]
        if all(linear_group.get(n, -1) <= g for n in inner):
            found.append(Replay(name, g, tail, None if rest is None else len(rest)))
    return found


class _StandIn(nn.Module):
    """Takes a replayed module's place for one pass: returns the kept tensors of the current batch."""

    def __init__(self, replay: Replay, cache: "ReplayCache", linear: nn.Module | None):
        super().__init__()
        self.replay, self.cache = replay, cache
        self.linear = [linear]  # a list: not registered as a submodule (its hooks and parameters stay the layer's)

    def forward(self, *args, **kwargs):
        x = self.cache.batch(self.replay.group)
        if self.replay.linear is None:
            return x.clone()  # the caller may modify it in place; the kept tensor must not change
        y = self.linear[0](x)
        return y if self.replay.trailing_nones is None else (y, *([None] * self.replay.trailing_nones))


class ReplayCache:
    """The kept group inputs of one layer (``[samples, seqlen, width]`` each, where ``hidden`` lives)."""

    def __init__(self, replays: list[Replay], hidden: torch.Tensor, widths: dict[int, int], budget_bytes: float,
                 compute_device: torch.device):
        per_sample = hidden.shape[1] * hidden.element_size()
        chosen, used = [], 0
        for r in sorted(replays, key=lambda r: r.linear is None):  # tail replays first
            extra = 0 if any(c.group == r.group for c in chosen) else widths[r.group] * per_sample * hidden.shape[0]
            if used + extra <= budget_bytes:
                chosen.append(r)
                used += extra
        self.replays = chosen
        self.groups = {r.group for r in chosen}
        self.kept: dict[int, torch.Tensor] = {}
        self.store_device, self.compute_device = hidden.device, compute_device
        self.samples = hidden.shape[0]
        self.rows = slice(0, 0)  # the current batch, set by the pass
        self.nbytes = used

    def keep(self, group: int, x: torch.Tensor) -> None:
        """Keep ``x``, group ``group``'s input on the current batch, when a replay needs it."""
        if group not in self.groups:
            return
        if group not in self.kept:
            self.kept[group] = torch.empty((self.samples, *x.shape[1:]), dtype=x.dtype, device=self.store_device)
        self.kept[group][self.rows] = x

    def batch(self, group: int) -> torch.Tensor:
        return self.kept[group][self.rows].to(self.compute_device, non_blocking=True)

    @contextlib.contextmanager
    def replaying(self, layer: nn.Module, before_group: int | None = None):
        """Inside the block, every chosen module whose group comes before ``before_group`` (None: every
        group, the pass that propagates the layer's output) is a stand-in."""
        swapped = []
        try:
            for r in self.replays:
                if (before_group is None or r.group < before_group) and r.group in self.kept:
                    parent_name, _, attr = r.module.rpartition(".")
                    parent = layer.get_submodule(parent_name) if parent_name else layer
                    linear = layer.get_submodule(r.linear) if r.linear else None
                    original = getattr(parent, attr)
                    setattr(parent, attr, _StandIn(r, self, linear))
                    swapped.append((parent, attr, original))
            yield
        finally:
            for parent, attr, original in reversed(swapped):
                setattr(parent, attr, original)
