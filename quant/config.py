"""The one validated configuration object of the GPTQ toolkit.

:class:`QuantConfig` is the single source of defaults: the CLI reads its
defaults from the dataclass fields, the pipeline and the exporters read the
validated instance. Per-module settings come from :meth:`QuantConfig.scheme_for`,
which applies ``ignore`` and ``overrides`` (HF module-name globs, matched with
:func:`fnmatch.fnmatchcase`, the last matching override wins).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from dataclasses import dataclass, field

from quant.errors import QuantInputError

SCHEMES = ("w4a16", "w8a8")
FORMATS = ("native", "gptq", "compressed-tensors")
METHODS = ("gptq", "rtn")
GROUP_SIZES = (32, 64, 128, -1)
CALIB_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class LayerScheme:
    """How one linear module is quantized."""

    scheme: str  # "w4a16" or "w8a8"
    group_size: int = -1  # w4a16 only; -1 = one group per output channel

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "w4a16" else 8

    def n_groups(self, in_features: int) -> int:
        if self.scheme == "w8a8" or self.group_size == -1:
            return 1
        return in_features // self.group_size

    def as_dict(self) -> dict:
        if self.scheme == "w8a8":
            return {"scheme": "w8a8"}
        return {"scheme": "w4a16", "group_size": self.group_size}


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides a quantization run, validated on creation.

    ``overrides`` maps an HF module-name glob (``model.layers.*.mlp.down_proj``)
    to a dict with ``scheme`` and, for w4a16, ``group_size``.
    ``ignore`` lists HF module-name globs that stay unquantized; modules
    outside the decoder layers (``lm_head``, embeddings) are never quantized.
    """

    scheme: str = "w4a16"
    group_size: int = 128
    method: str = "gptq"
    format: str = "native"
    act_order: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    num_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    smoothquant: float | None = None  # alpha in (0, 1]; w8a8 only
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: dict[str, dict] = field(default_factory=dict)
    max_damp_retries: int = 5
    # Dtype of the layer weights and activations in the calibration forwards (Hessians, GPTQ and
    # scales are always float32/float64). "auto": bfloat16 for a bfloat16 checkpoint, else float32.
    calib_dtype: str = "auto"
    # GPTQ paper's true-sequential order: each input group's Hessian comes from a forward pass
    # through the already-quantized earlier groups of the layer. False: one pass per layer.
    true_sequential: bool = True
    # Search each group's scale among ratio * amax, ratio = 1.0, 0.99, ... clip_min_ratio, for the least
    # diag(H)-weighted rounding error before GPTQ uses it (quant.clip). gptq method only. On by default:
    # w4a16 perplexity 0.985x-1.0x of plain GPTQ's over 3 seeds (README, "Quantizing checkpoints").
    clip_search: bool = True
    clip_min_ratio: float = 0.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "overrides", {k: dict(v) for k, v in self.overrides.items()})
        _choice("--scheme", self.scheme, SCHEMES)
        _choice("--method", self.method, METHODS)
        _choice("--format", self.format, FORMATS)
        _choice("--group-size", self.group_size, GROUP_SIZES)
        _choice("--calib-dtype", self.calib_dtype, CALIB_DTYPES)
        if not 0 < self.damp_percent < 1:
            raise QuantInputError(f"--damp-percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise QuantInputError(f"--block-size must be positive, got {self.block_size}")
        if self.num_samples < 1:
            raise QuantInputError(f"--num-samples must be positive, got {self.num_samples}")
        if not 0 < self.clip_min_ratio <= 1:
            raise QuantInputError(f"--clip-min-ratio must be in (0, 1], got {self.clip_min_ratio}")
        if self.seqlen < 2:
            raise QuantInputError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.smoothquant is not None:
            if not (0 < self.smoothquant <= 1) or math.isnan(self.smoothquant):
                raise QuantInputError(f"--smoothquant ALPHA must be in (0, 1], got {self.smoothquant}")
            if self.scheme != "w8a8":
                raise QuantInputError("--smoothquant applies to --scheme w8a8 only")
        if self.act_order and self.scheme != "w4a16":
            raise QuantInputError("--act-order applies to --scheme w4a16 only")
        for pattern, spec in self.overrides.items():
            _override_scheme(pattern, spec, self.group_size)
        if self.format == "gptq":
            if self.scheme != "w4a16":
                raise QuantInputError("--format gptq holds w4a16 only; use native or compressed-tensors for w8a8")
            if self.overrides:
                raise QuantInputError("--override is not supported by --format gptq; use native or compressed-tensors")
        if self.format == "compressed-tensors" and self.act_order:
            raise QuantInputError("--act-order is exported by --format gptq and native only")

    @property
    def clip_ratios(self) -> tuple[float, ...]:
        """The clipping ratios GPTQ searches (``(1.0,)``: the amax scale, no search)."""
        from quant.clip import clip_ratios

        return clip_ratios(self.clip_min_ratio) if self.clip_search else (1.0,)

    @property
    def default_scheme(self) -> LayerScheme:
        if self.scheme == "w8a8":
            return LayerScheme("w8a8")
        return LayerScheme("w4a16", self.group_size)

    def is_ignored(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.ignore)

    def scheme_for(self, module_name: str) -> LayerScheme | None:
        """The scheme of one HF linear module, or ``None`` when it is ignored."""
        if self.is_ignored(module_name):
            return None
        chosen = self.default_scheme
        for pattern, spec in self.overrides.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                chosen = _override_scheme(pattern, spec, self.group_size)
        return chosen

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


def _choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise QuantInputError(f"{flag} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _override_scheme(pattern: str, spec: dict, default_group_size: int = 128) -> LayerScheme:
    unknown = set(spec) - {"scheme", "group_size"}
    if unknown:
        raise QuantInputError(f"--override {pattern}: unknown keys {sorted(unknown)}")
    scheme = spec.get("scheme")
    _choice(f"--override {pattern} scheme", scheme, SCHEMES)
    if scheme == "w8a8":
        if "group_size" in spec:
            raise QuantInputError(f"--override {pattern}: w8a8 is per channel and takes no group_size")
        return LayerScheme("w8a8")
    group_size = spec.get("group_size", default_group_size)
    _choice(f"--override {pattern} group_size", group_size, GROUP_SIZES)
    return LayerScheme("w4a16", group_size)


def parse_override(text: str) -> tuple[str, dict]:
    """The CLI's ``--override PATTERN=SCHEME`` or ``PATTERN=JSON``.

    ``SCHEME`` is ``w8a8`` or ``w4a16`` (w4a16 then takes ``default_group_size``);
    a JSON object gives the keys of the native ``overrides`` dict, e.g.
    ``model.layers.*.mlp.down_proj={"scheme": "w4a16", "group_size": 64}``.
    """
    pattern, sep, value = text.partition("=")
    if not sep or not pattern or not value:
        raise QuantInputError(f"--override {text!r}: expected PATTERN=SCHEME, e.g. 'model.layers.0.*=w8a8'")
    if value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as exc:
            raise QuantInputError(f"--override {text!r}: invalid JSON ({exc})") from None
    else:
        spec = {"scheme": value}
    _override_scheme(pattern, spec)
    return pattern, spec
