"""vLLM ``QuantizationConfig`` for ``quant_method: "vllm_plugins"`` checkpoints.

Reads the validated :class:`~vllm_plugins.quantization.schema.NativeQuantConfig`
and hands every linear layer its method: W4A16, W8A8 or unquantized. vLLM
names fused layers (``qkv_proj``, ``gate_up_proj``); the model's
``packed_modules_mapping`` maps them back to the HF modules the checkpoint
names, which must then agree on their scheme.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from models.hf_registration import import_target
from vllm_plugins.quantization.schema import QUANT_METHOD, LayerScheme, NativeQuantConfig, QuantConfigError

logger = init_logger("vllm.plugins.vllm_plugins.quantization")

# The serving kernel of each scheme of quant.schemes the native format holds: "module:Class" of a
# KernelLinearMethod, imported when a layer first needs it. Adding a scheme: its table entry plus this line.
LINEAR_METHODS = {
    "w4a16": "vllm_plugins.quantization.w4a16:W4A16LinearMethod",
    "w8a8": "vllm_plugins.quantization.w8a8:W8A8LinearMethod",
}


class VllmPluginsQuantConfig(QuantizationConfig):
    """The plugin's W4A16 / W8A8 config; one instance per loaded model."""

    def __init__(self, native: NativeQuantConfig) -> None:
        super().__init__()
        self.native = native
        self._fallbacks: list[str] = []

    def __repr__(self) -> str:
        return f"VllmPluginsQuantConfig({self.native})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Turing: CUTLASS int8, Marlin / Machete pick their own minimum

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json["quantization_config"] only

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VllmPluginsQuantConfig":
        try:
            return cls(NativeQuantConfig.from_dict(config))
        except QuantConfigError as exc:
            raise QuantConfigError(f"config.json quantization_config: {exc}") from None

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Keep ``g_idx`` (vLLM's default drops it): act_order layers need it."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Fused (stacked) names are resolved through packed_modules_mapping in
        # layer_scheme(); only plain renames apply to the checkpoint's names.
        mapper = dataclasses.replace(hf_to_vllm_mapper, orig_to_new_stacked={})

        def rename(name: str) -> str:
            return mapper.map_name(name) or name

        self.native = self.native.renamed(rename)

    def hf_modules(self, prefix: str) -> list[str]:
        """The checkpoint module names behind vLLM layer ``prefix``."""
        head, _, last = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(last)
        if not shards:
            return [prefix]
        return [f"{head}.{s}" if head else s for s in shards]

    def layer_scheme(self, prefix: str) -> LayerScheme | None:
        names = self.hf_modules(prefix)
        schemes = {n: self.native.layer(n) for n in names}
        if len(set(schemes.values())) > 1:
            detail = ", ".join(f"{n}: {s.scheme if s else 'unquantized'}"
                               + (f"/g{s.group_size}" if s and s.spec.grouped else "")
                               for n, s in schemes.items())
            raise QuantConfigError(
                f"vLLM fuses {names} into {prefix}, so they must be quantized alike; got {detail}")
        return schemes[names[0]]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, ParallelLMHead):
            if self.layer_scheme(prefix) is not None:
                raise QuantConfigError(
                    f"{prefix} is quantized in quantization_config, which this plugin does not serve; "
                    f"list {prefix!r} in 'ignore'")
            return None
        if not isinstance(layer, LinearBase):
            return None
        scheme = self.layer_scheme(prefix)
        if scheme is None:
            return UnquantizedLinearMethod()
        return import_target(LINEAR_METHODS[scheme.scheme])(self, scheme, prefix)

    def note_fallback(self, prefix: str, reason: str) -> None:
        """Record a layer on the torch fallback; logged once per model."""
        if not self._fallbacks:
            logger.warning(
                "vllm_plugins: no kernel takes %s (%s); it and any further such layers of this "
                "model use the torch reference (dequantize, then matmul)", prefix, reason)
        self._fallbacks.append(prefix)

    @property
    def fallback_layers(self) -> list[str]:
        return list(self._fallbacks)


def register_config() -> None:
    """Make ``quant_method: "vllm_plugins"`` known to vLLM (re-entrant)."""
    from vllm.model_executor.layers.quantization import register_quantization_config

    register_quantization_config(QUANT_METHOD)(VllmPluginsQuantConfig)
