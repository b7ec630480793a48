"""Registration of the package's model types with transformers (no vLLM import).

``quant`` (which must run where vLLM is not installed) and the vLLM plugin both
call :func:`register_hf_configs`; it is idempotent.
"""

from __future__ import annotations

import importlib

# HF ``model_type`` -> ("module:ConfigClass", "module:ModelClass" or None),
# registered with transformers' AutoConfig / AutoModelForCausalLM.
HF_CONFIGS: dict[str, tuple[str, str | None]] = {
    "llama_variant": ("models.llama_variant_config:LlamaVariantConfig", "models.llama_variant_hf:LlamaVariantForCausalLM"),
}


def import_target(target: str):
    """Import ``"module:attr"`` (or a bare module) and return it."""
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def register_hf_configs() -> list[str]:
    """Register every model type of :data:`HF_CONFIGS`; return their names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    done = []
    for model_type, (config_target, model_target) in HF_CONFIGS.items():
        config_cls = import_target(config_target)
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        if model_target is not None:
            AutoModelForCausalLM.register(config_cls, import_target(model_target), exist_ok=True)
        done.append(model_type)
    return done
