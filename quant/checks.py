"""Checks of a quantization plan before any work: each failure is one
:class:`quant.errors.QuantInputError` naming the flag, file or tensor at fault.

- :func:`check_plan`: ``--seqlen`` within the model's positions, every
  ``--override`` / ``--ignore`` glob matching a module, and the linears vLLM
  fuses (q/k/v, gate/up) quantized alike.
- :func:`check_scale_range`: weights whose scales do not fit their stored dtype
  (float16 for W4A16; :mod:`quant.schemes`).
"""

from __future__ import annotations

import fnmatch

import torch

from quant.config import LayerScheme, QuantConfig
from quant.errors import QuantInputError

# vLLM's packed modules of Llama-style decoders: one fused layer each, one scheme each.
FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _describe(s: LayerScheme | None) -> str:
    if s is None:
        return "left in float"
    return s.scheme if s.scheme == "w8a8" else f"w4a16 group {s.group_size}"


def check_seqlen(config: QuantConfig, max_positions: int | None) -> None:
    if max_positions and config.seqlen > max_positions:
        raise QuantInputError(f"--seqlen {config.seqlen} is longer than the model's max_position_embeddings "
                              f"({max_positions})")


def check_globs_match(config: QuantConfig, layer_linears: list[str], all_linears: list[str]) -> None:
    """Every ``--override`` glob must match a decoder-layer linear (only those are quantized), every
    ``--ignore`` glob some linear (``lm_head``, the default, may match none)."""
    for pattern in config.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layer_linears):
            raise QuantInputError(f"--override {pattern}: matches no decoder-layer linear (e.g. {layer_linears[0]})")
    default_ignore = QuantConfig.__dataclass_fields__["ignore"].default
    for pattern in config.ignore:
        if pattern not in default_ignore and not any(fnmatch.fnmatchcase(n, pattern) for n in all_linears):
            raise QuantInputError(f"--ignore {pattern}: matches no linear module (e.g. {all_linears[0]})")


def _flags_splitting(config: QuantConfig, names: list[str]) -> list[str]:
    """The flags whose globs match some of ``names`` but not all."""
    flags = []
    for pattern, spec in config.overrides.items():
        hits = [fnmatch.fnmatchcase(n, pattern) for n in names]
        if any(hits) and not all(hits):
            value = spec["scheme"] if set(spec) == {"scheme"} else spec
            flags.append(f"--override {pattern}={value}")
    for pattern in config.ignore:
        hits = [fnmatch.fnmatchcase(n, pattern) for n in names]
        if any(hits) and not all(hits):
            flags.append(f"--ignore {pattern}")
    return flags


def check_fused_alike(config: QuantConfig, schemes: dict[str, LayerScheme | None]) -> None:
    """q/k/v and gate/up of one layer need one scheme: vLLM loads each set into one fused linear."""
    for name in schemes:
        parent, _, leaf = name.rpartition(".")
        for fused in FUSED_LINEARS:
            if leaf != fused[0]:
                continue
            names = [f"{parent}.{m}" for m in fused if f"{parent}.{m}" in schemes]
            kinds = {schemes[n] for n in names}
            if len(kinds) > 1:
                flags = _flags_splitting(config, names) or ["--override/--ignore"]
                detail = ", ".join(f"{n.rpartition('.')[2]} {_describe(schemes[n])}" for n in names)
                raise QuantInputError(
                    f"{'; '.join(flags)}: {parent} would get {detail}; vLLM fuses {'/'.join(fused)} into one "
                    "layer, so they must be quantized alike")


def check_plan(config: QuantConfig, schemes: dict[str, LayerScheme | None], all_linears: list[str],
               max_positions: int | None) -> None:
    check_seqlen(config, max_positions)
    check_globs_match(config, list(schemes), all_linears)
    check_fused_alike(config, schemes)


def check_scale_range(linears: dict[str, torch.nn.Linear], schemes: dict[str, LayerScheme | None],
                      reader) -> None:
    """Weights whose scale overflows the scheme's stored scale dtype (float16 for W4A16: |w| above
    about 491,000): one error naming the tensor and its shard (``reader``: the
    :class:`quant.checkpoint.ShardReader` they came from)."""
    for name, lin in linears.items():
        s = schemes.get(name)
        if s is None:
            continue
        amax = lin.weight.detach().abs().max().to(torch.float32).reshape(1)
        stored = s.spec.scale_dtype
        if float(s.spec.scale(amax)[0]) > torch.finfo(stored).max:
            key = f"{name}.weight"
            where = reader.entries[key][0] if key in reader.entries else f"--model {reader.dir}"
            limit = torch.finfo(stored).max * float(amax[0]) / float(s.spec.scale(amax)[0])
            raise QuantInputError(f"{where}: tensor {key} has values up to {float(amax[0]):.3g}; {s.scheme} "
                                  f"stores {str(stored).removeprefix('torch.')} scales, which hold weights up to "
                                  f"{limit:.3g}")
