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
from quant.schemes import GROUP_SIZES, SCHEMES, Scheme, names

FORMATS = ("native", "gptq", "compressed-tensors")
METHODS = ("gptq", "rtn")
CALIB_DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # for help and errors; N is a CUDA device index


@dataclass(frozen=True)
class LayerScheme:
    """How one linear module is quantized."""

    scheme: str  # a name in quant.schemes.SCHEMES
    group_size: int = -1  # grouped schemes only; -1 = one group per output channel

    @property
    def spec(self) -> Scheme:
        return SCHEMES[self.scheme]

    @property
    def bits(self) -> int:
        return self.spec.bits

    def n_groups(self, in_features: int) -> int:
        if not self.spec.grouped or self.group_size == -1:
            return 1
        return in_features // self.group_size

    def as_dict(self) -> dict:
        if not self.spec.grouped:
            return {"scheme": self.scheme}
        return {"scheme": self.scheme, "group_size": self.group_size}


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
    # GPTAQ's asymmetric calibration (quant.gptaq): each linear is fitted to the float model's output W X_fp
    # on the quantized model's input X; gptaq_alpha in (0, 1] scales the correction. gptq method only. It keeps
    # a float copy of the calibration hidden states and the float inputs of the layer in hand.
    gptaq: bool = False
    gptaq_alpha: float = 0.5
    # True-sequential: keep group inputs (MiB, where the activations live) to replay finished modules of a
    # layer instead of recomputing them in its later passes (quant.replay; same exports). 0 turns it off.
    replay_cache_mb: float = 4096
    # Where layers are calibrated and GPTQ runs ("auto": CUDA when available, else the CPU; quant.device).
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "overrides", {k: dict(v) for k, v in self.overrides.items()})
        _choice("--scheme", self.scheme, SCHEMES)
        _choice("--method", self.method, METHODS)
        _choice("--format", self.format, FORMATS)
        _choice("--group-size", self.group_size, GROUP_SIZES)
        _choice("--calib-dtype", self.calib_dtype, CALIB_DTYPES)
        if not _is_device(self.device):
            raise QuantInputError(f"--device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if not 0 < self.damp_percent < 1:
            raise QuantInputError(f"--damp-percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise QuantInputError(f"--block-size must be positive, got {self.block_size}")
        if self.num_samples < 1:
            raise QuantInputError(f"--num-samples must be positive, got {self.num_samples}")
        if not 0 < self.clip_min_ratio <= 1:
            raise QuantInputError(f"--clip-min-ratio must be in (0, 1], got {self.clip_min_ratio}")
        if self.gptaq and self.method != "gptq":
            raise QuantInputError("--gptaq applies to --method gptq only")
        if not 0 < self.gptaq_alpha <= 1:
            raise QuantInputError(f"--gptaq-alpha must be in (0, 1], got {self.gptaq_alpha}")
        if not self.replay_cache_mb >= 0:
            raise QuantInputError(f"--replay-cache-mb must be >= 0, got {self.replay_cache_mb}")
        if self.seqlen < 2:
            raise QuantInputError(f"--seqlen must be at least 2, got {self.seqlen}")
        spec = SCHEMES[self.scheme]
        if self.smoothquant is not None:
            if not (0 < self.smoothquant <= 1) or math.isnan(self.smoothquant):
                raise QuantInputError(f"--smoothquant ALPHA must be in (0, 1], got {self.smoothquant}")
            if spec.act_bits is None:
                raise QuantInputError(f"--smoothquant applies to --scheme {_either(names(_quantizes_acts))} only")
        if self.act_order and not spec.act_order:
            raise QuantInputError(f"--act-order applies to --scheme {_either(names(lambda s: s.act_order))} only")
        for pattern, override in self.overrides.items():
            _override_scheme(pattern, override, self.group_size)
        self._check_format(self.scheme)
        if self.format == "gptq" and self.overrides:
            raise QuantInputError("--override is not supported by --format gptq; use native or compressed-tensors")
        for override in self.overrides.values():
            self._check_format(override["scheme"])
        if self.format == "compressed-tensors" and self.act_order:
            raise QuantInputError("--act-order is exported by --format gptq and native only")

    def _check_format(self, scheme: str) -> None:
        if self.format not in SCHEMES[scheme].formats:
            holds = _either(names(lambda s: self.format in s.formats))
            raise QuantInputError(f"--format {self.format} holds {holds} only; use "
                                  f"{_either(list(SCHEMES[scheme].formats))} for {scheme}")

    @property
    def clip_ratios(self) -> tuple[float, ...]:
        """The clipping ratios GPTQ searches (``(1.0,)``: the amax scale, no search)."""
        from quant.clip import clip_ratios

        return clip_ratios(self.clip_min_ratio) if self.clip_search else (1.0,)

    @property
    def default_scheme(self) -> LayerScheme:
        if not SCHEMES[self.scheme].grouped:
            return LayerScheme(self.scheme)
        return LayerScheme(self.scheme, self.group_size)

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


def _is_device(value) -> bool:
    if not isinstance(value, str):
        return False
    kind, sep, index = value.partition(":")
    if sep:
        return kind == "cuda" and index.isascii() and index.isdigit()
    return value in ("auto", "cpu", "cuda")


def _quantizes_acts(s: Scheme) -> bool:
    return s.act_bits is not None


def _either(items: list[str]) -> str:
    return " or ".join(items)


def _choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise QuantInputError(f"{flag} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _override_scheme(pattern: str, spec: dict, default_group_size: int = 128) -> LayerScheme:
    unknown = set(spec) - {"scheme", "group_size"}
    if unknown:
        raise QuantInputError(f"--override {pattern}: unknown keys {sorted(unknown)}")
    scheme = spec.get("scheme")
    _choice(f"--override {pattern} scheme", scheme, SCHEMES)
    if not SCHEMES[scheme].grouped:
        if "group_size" in spec:
            raise QuantInputError(f"--override {pattern}: {scheme} is per channel and takes no group_size")
        return LayerScheme(scheme)
    group_size = spec.get("group_size", default_group_size)
    _choice(f"--override {pattern} group_size", group_size, SCHEMES[scheme].group_sizes)
    return LayerScheme(scheme, group_size)


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
