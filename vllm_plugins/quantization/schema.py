"""The ``native`` checkpoint's ``quantization_config``, validated (format version 1).

No vLLM import; the single source of the format's defaults. What each
scheme is (grid, group sizes, act-order) comes from :mod:`quant.schemes`,
the table the toolkit reads too. Layout of the tensors is described in the
project briefing and in :mod:`vllm_plugins.quantization.packing`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quant.schemes import SCHEMES as SCHEME_TABLE
from quant.schemes import Scheme

QUANT_METHOD = "vllm_plugins"
FORMAT_VERSION = 1
# How this format names each scheme it holds (``scheme`` and ``overrides.*.scheme``).
SCHEMES = tuple(s.formats["native"] for s in SCHEME_TABLE.values() if "native" in s.formats)
_BY_NATIVE_NAME = {s.formats["native"]: s for s in SCHEME_TABLE.values() if "native" in s.formats}

DEFAULT_SCHEME = "w4a16"
DEFAULT_GROUP_SIZE = 128
DEFAULT_ACT_ORDER = False
# How the CPU int4 tile kernel takes W4A16 activations: "bf16" exactly (the default), or "int8"
# (opt-in: quantized per 32 inputs, AVX512-VNNI; W4A8 numerics, faster from batch 4). A serving
# choice, not a property of the weights: set it in the checkpoint or with vLLM's --hf-overrides.
CPU_ACTIVATIONS = ("bf16", "int8")
DEFAULT_CPU_ACTIVATIONS = "bf16"

_TOP_KEYS = {"quant_method", "format_version", "scheme", "group_size", "act_order", "ignore", "overrides",
             "cpu_activations"}
_OVERRIDE_KEYS = {"scheme", "group_size", "act_order"}
_GROUPED_ONLY = ("group_size", "act_order")  # settings of grouped schemes
_GROUPED = tuple(n for n, s in _BY_NATIVE_NAME.items() if s.grouped)


class QuantConfigError(ValueError):
    """The ``quantization_config`` is malformed or asks for something impossible."""


@dataclass(frozen=True)
class LayerScheme:
    """How one linear layer is quantized."""

    scheme: str
    group_size: int = -1  # grouped schemes only
    act_order: bool = False  # schemes with act-order only

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantConfigError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        spec = self.spec
        if spec.grouped:
            if isinstance(self.group_size, bool) or self.group_size not in spec.group_sizes:
                raise QuantConfigError(f"group_size must be one of {spec.group_sizes}, got {self.group_size!r}")
            if not isinstance(self.act_order, bool):
                raise QuantConfigError(f"act_order must be true or false, got {self.act_order!r}")
            if self.act_order and not spec.act_order:
                raise QuantConfigError(f"{self.scheme} takes no act_order")
        elif (self.group_size, self.act_order) != (-1, False):
            raise QuantConfigError(f"{self.scheme} is per-channel: it takes no group_size and no act_order")

    @property
    def spec(self) -> Scheme:
        return _BY_NATIVE_NAME[self.scheme]


@dataclass(frozen=True)
class NativeQuantConfig:
    """``config.json["quantization_config"]`` of a ``native`` checkpoint."""

    scheme: str = DEFAULT_SCHEME
    group_size: int = DEFAULT_GROUP_SIZE
    act_order: bool = DEFAULT_ACT_ORDER
    ignore: tuple[str, ...] = ()
    overrides: Mapping[str, LayerScheme] = field(default_factory=dict)
    cpu_activations: str = DEFAULT_CPU_ACTIVATIONS

    def __post_init__(self) -> None:
        self.default_layer  # validates scheme / group_size / act_order
        if self.cpu_activations not in CPU_ACTIVATIONS:
            raise QuantConfigError(f"cpu_activations must be one of {CPU_ACTIVATIONS}, got {self.cpu_activations!r}")
        bad = sorted(set(self.ignore) & set(self.overrides))
        if bad:
            raise QuantConfigError(f"modules both ignored and overridden: {bad}")

    @property
    def default_layer(self) -> LayerScheme:
        if self.scheme in _BY_NATIVE_NAME and not _BY_NATIVE_NAME[self.scheme].grouped:
            return LayerScheme(self.scheme)
        return LayerScheme(self.scheme, self.group_size, self.act_order)

    def layer(self, name: str) -> LayerScheme | None:
        """The scheme of HF module ``name``, or None when it is left unquantized."""
        if name in self.ignore:
            return None
        return self.overrides.get(name, self.default_layer)

    def renamed(self, rename) -> "NativeQuantConfig":
        """A copy with every module name passed through ``rename`` (name -> name)."""
        return NativeQuantConfig(
            scheme=self.scheme, group_size=self.group_size, act_order=self.act_order,
            ignore=tuple(rename(n) for n in self.ignore),
            overrides={rename(n): s for n, s in self.overrides.items()},
            cpu_activations=self.cpu_activations,
        )

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "NativeQuantConfig":
        if not isinstance(cfg, Mapping):
            raise QuantConfigError(f"quantization_config must be an object, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - _TOP_KEYS)
        if unknown:
            raise QuantConfigError(f"unknown quantization_config keys {unknown}; allowed: {sorted(_TOP_KEYS)}")
        if cfg.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise QuantConfigError(f"quant_method must be {QUANT_METHOD!r}, got {cfg.get('quant_method')!r}")
        if cfg.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise QuantConfigError(
                f"format_version {cfg.get('format_version')!r} is not supported (this reader knows {FORMAT_VERSION})")
        scheme = cfg.get("scheme", DEFAULT_SCHEME)
        overrides_raw = cfg.get("overrides", {}) or {}
        if not isinstance(overrides_raw, Mapping):
            raise QuantConfigError("overrides must be an object: module name -> settings")
        if scheme in _BY_NATIVE_NAME and not _BY_NATIVE_NAME[scheme].grouped and any(k in cfg for k in _GROUPED_ONLY):
            uses_grouped = any(isinstance(o, Mapping) and o.get("scheme", scheme) in _GROUPED
                               for o in overrides_raw.values())
            if not uses_grouped:
                raise QuantConfigError(
                    f"group_size/act_order are settings of {'/'.join(_GROUPED)}, but scheme is {scheme} "
                    "and no override uses one")
        base = {
            "scheme": scheme,
            "group_size": cfg.get("group_size", DEFAULT_GROUP_SIZE),
            "act_order": cfg.get("act_order", DEFAULT_ACT_ORDER),
        }
        if scheme not in SCHEMES:
            raise QuantConfigError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        for grouped in _GROUPED:  # validate the defaults of grouped overrides
            LayerScheme(grouped, base["group_size"], base["act_order"])
        overrides = {}
        for name, o in overrides_raw.items():
            if not isinstance(o, Mapping):
                raise QuantConfigError(f"override for {name!r} must be an object, got {o!r}")
            unknown = sorted(set(o) - _OVERRIDE_KEYS)
            if unknown:
                raise QuantConfigError(f"override for {name!r}: unknown keys {unknown}; allowed: {sorted(_OVERRIDE_KEYS)}")
            layer_scheme = o.get("scheme", scheme)
            try:
                if layer_scheme in SCHEMES and layer_scheme not in _GROUPED:
                    if any(k in o for k in _GROUPED_ONLY):
                        raise QuantConfigError(
                            f"{layer_scheme} is per-channel: it takes no group_size and no act_order")
                    overrides[name] = LayerScheme(layer_scheme)
                else:
                    overrides[name] = LayerScheme(
                        layer_scheme, o.get("group_size", base["group_size"]), o.get("act_order", base["act_order"]))
            except QuantConfigError as exc:
                raise QuantConfigError(f"override for {name!r}: {exc}") from None
        ignore = cfg.get("ignore", []) or []
        if isinstance(ignore, str) or not isinstance(ignore, Iterable) or not all(isinstance(n, str) for n in ignore):
            raise QuantConfigError(f"ignore must be a list of module names, got {ignore!r}")
        return cls(ignore=tuple(ignore), overrides=overrides,
                   cpu_activations=cfg.get("cpu_activations", DEFAULT_CPU_ACTIVATIONS), **base)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "scheme": self.scheme}
        if self.scheme in _GROUPED or any(s.scheme in _GROUPED for s in self.overrides.values()):
            out.update(group_size=self.group_size, act_order=self.act_order)
        out["ignore"] = list(self.ignore)
        if self.cpu_activations != DEFAULT_CPU_ACTIVATIONS:
            out["cpu_activations"] = self.cpu_activations
        if self.overrides:
            out["overrides"] = {
                n: ({"scheme": s.scheme, "group_size": s.group_size, "act_order": s.act_order}
                    if s.scheme in _GROUPED else {"scheme": s.scheme})
                for n, s in self.overrides.items()
            }
        return out
