"""What :func:`vllm_plugins.register` registers, and the code that does it.

Each later feature adds one line to a table below (transformers model types:
``models.hf_registration.HF_CONFIGS``); nothing here imports
torch models or initialises a device.
"""

from __future__ import annotations

from vllm.logger import init_logger

from models.hf_registration import import_target, register_hf_configs

# Under the "vllm" logger namespace, so vLLM's handler (configured when
# vllm.logger is imported) prints it in every process.
logger = init_logger("vllm.plugins.vllm_plugins")

# vLLM architecture name -> "module:Class", imported by vLLM only when used.
MODELS: dict[str, str] = {
    "LlamaVariantForCausalLM": "models.llama_variant:LlamaVariantForCausalLM",
    "Eagle3MultimodalLlamaForCausalLM": "eagle.drafter:Eagle3MultimodalLlamaForCausalLM",
    "TinyLlavaForConditionalGeneration": "eagle.vlm_target:TinyLlavaForConditionalGeneration",
}

# Modules whose import registers a vLLM quantization config (through
# ``register_quantization_config``) or a kernel; imported in order.
QUANT_MODULES: list[str] = [
    "vllm_plugins.quantization.plugin",
]

_registered: list[str] | None = None


def _register_models() -> list[str]:
    from vllm import ModelRegistry

    done = []
    for arch, target in MODELS.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
        done.append(arch)
    return done


def _register_quant() -> list[str]:
    done = []
    for module in QUANT_MODULES:
        import_target(module)
        done.append(module)
    return done


def register_all() -> list[str]:
    """Register everything once per process; return what was registered."""
    global _registered
    if _registered is not None:
        return _registered
    what = (
        [f"model {a}" for a in _register_models()]
        + [f"hf-config {t}" for t in register_hf_configs()]
        + [f"quant {q}" for q in _register_quant()]
    )
    _registered = what
    logger.info("vllm_plugins registered: %s", ", ".join(what) or "nothing yet")
    return what
