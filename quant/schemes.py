"""The quantization schemes: one frozen entry per scheme, the one table the toolkit and the plugin read.

Each :class:`Scheme` says what its integers are (bits, grid, how the scale
follows from a group's largest magnitude, the stored scale dtype), how they
are packed, which group sizes and options it takes, whether activations are
quantized too, and which export formats hold it under which name. The GPTQ
toolkit (:mod:`quant.gptq`, :mod:`quant.config`, :mod:`quant.export`,
:mod:`quant.pipeline`) and the vLLM plugin (``vllm_plugins.quantization.schema``
and ``config``) read it; adding a scheme is one entry in :data:`SCHEMES` plus
its serving kernel (the plugin's ``LINEAR_METHODS``).

Grids are symmetric: ``W = q · scale`` with integers in ``[qmin, qmax]``,
stored unsigned as ``q - qmin`` when packed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch


class ScaleRule(enum.Enum):
    """How a group's scale follows from its largest magnitude ``amax``."""

    HALF_RANGE = enum.auto()  # scale = 2·amax / (qmax - qmin): AutoGPTQ's symmetric convention (int4: 2·amax/15)
    QMAX = enum.auto()  # scale = amax / qmax, on a grid with qmin = -qmax (compressed-tensors' int8)


class Packing(enum.Enum):
    """How the integers of a weight are stored."""

    INT32_WORDS = enum.auto()  # 32 // bits values per int32 word along the packed axis, low bits first
    INT8 = enum.auto()  # one int8 per value


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme: everything the toolkit and the plugin need to know about it."""

    name: str
    bits: int
    qmin: int
    qmax: int
    scale_rule: ScaleRule
    scale_dtype: torch.dtype  # dtype the scales are stored (and rounded to before quantizing) in
    packing: Packing
    group_sizes: tuple[int, ...]  # allowed group sizes; -1 = one group per output channel
    act_order: bool  # GPTQ act-order (with static groups) is supported
    act_bits: int | None  # None: activations stay in 16-bit float; else dynamic per-token symmetric ints
    formats: Mapping[str, str]  # export format -> the name that format gives the scheme
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not (self.qmin < 0 < self.qmax and self.qmax - self.qmin < 2**self.bits):
            raise ValueError(f"scheme {self.name}: grid [{self.qmin}, {self.qmax}] does not fit {self.bits} bits")
        if self.scale_rule is ScaleRule.QMAX and self.qmin != -self.qmax:
            raise ValueError(f"scheme {self.name}: ScaleRule.QMAX needs qmin = -qmax")
        if self.packing is Packing.INT32_WORDS and 32 % self.bits:
            raise ValueError(f"scheme {self.name}: {self.bits}-bit values do not fill int32 words")
        if not self.group_sizes or -1 not in self.group_sizes:
            raise ValueError(f"scheme {self.name}: group_sizes must include -1 (per channel)")
        object.__setattr__(self, "formats", MappingProxyType(dict(self.formats)))

    @property
    def grouped(self) -> bool:
        """Takes a group size other than per channel (and with it ``group_size``/``act_order`` settings)."""
        return any(g != -1 for g in self.group_sizes)

    @property
    def pack_factor(self) -> int:
        """Values per stored word; the packed axis must be a multiple of it."""
        return 32 // self.bits if self.packing is Packing.INT32_WORDS else 1

    def scale(self, amax: torch.Tensor) -> torch.Tensor:
        """Scales (float32, not yet rounded to :attr:`scale_dtype`) of groups with largest magnitudes ``amax``."""
        if self.scale_rule is ScaleRule.HALF_RANGE:
            return amax * (2.0 / (self.qmax - self.qmin))
        return amax / float(self.qmax)


W4A16 = Scheme(
    name="w4a16", bits=4, qmin=-8, qmax=7, scale_rule=ScaleRule.HALF_RANGE, scale_dtype=torch.float16,
    packing=Packing.INT32_WORDS, group_sizes=(32, 64, 128, -1), act_order=True, act_bits=None,
    formats={"native": "w4a16", "gptq": "gptq", "compressed-tensors": "pack-quantized"},
)
W8A8 = Scheme(
    name="w8a8", bits=8, qmin=-127, qmax=127, scale_rule=ScaleRule.QMAX, scale_dtype=torch.float32,
    packing=Packing.INT8, group_sizes=(-1,), act_order=False, act_bits=8,
    formats={"native": "w8a8", "compressed-tensors": "int-quantized"},
)

SCHEMES: Mapping[str, Scheme] = MappingProxyType({s.name: s for s in (W4A16, W8A8)})

# Every group size some scheme takes, in table order (the CLI's --group-size choices).
GROUP_SIZES: tuple[int, ...] = tuple(dict.fromkeys(g for s in SCHEMES.values() for g in s.group_sizes if s.grouped))


def names(predicate=None) -> list[str]:
    """Names of the schemes (those for which ``predicate(scheme)`` holds), in table order."""
    return [n for n, s in SCHEMES.items() if predicate is None or predicate(s)]
