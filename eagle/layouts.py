"""The three standard EAGLE-3 drafter checkpoint layouts: read and write.

- ``eagle``: the EAGLE authors' (SafeAILab/EAGLE): ``pytorch_model.bin`` with
  ``midlayer.*``, ``fc``, ``norm``, ``lm_head``, ``d2t``, ``t2d``; a Llama
  ``config.json`` with ``draft_vocab_size``.
- ``specforge``: SpecForge's ``LlamaForCausalLMEagle3``: the same tensor
  names in ``model.safetensors`` (``embed_tokens`` left out), aux layer ids
  under ``eagle_config``.
- ``speculators``: ``layers.0.*`` in ``model.safetensors`` and a config
  with ``speculators_model_type: eagle3``, ``transformer_layer_config`` and
  ``speculators_config``.

The canonical in-memory names are the authors' (``midlayer.*``). ``d2t``
holds offsets (draft id ``i`` is target id ``i + d2t[i]``); ``t2d`` is a
boolean mask over the target vocabulary.

vLLM maps the architecture names ``LlamaForCausalLMEagle3`` and the
speculators format to its stock drafter; to serve a checkpoint with this
package's drafter, its ``architectures`` must name
:data:`DRAFTER_ARCH` (what :func:`write_drafter` writes by default for the
``eagle`` and ``specforge`` layouts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eagle.checks import DrafterError, check_finite

DRAFTER_ARCH = "Eagle3MultimodalLlamaForCausalLM"
STOCK_ARCH = "LlamaForCausalLMEagle3"
LAYOUTS = ("eagle", "specforge", "speculators")

# Llama fields a drafter config carries (everything else is EAGLE-specific).
LLAMA_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "num_hidden_layers", "rms_norm_eps", "vocab_size", "max_position_embeddings",
    "rope_theta", "rope_parameters", "hidden_act", "attention_bias", "mlp_bias",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
)
# EAGLE-3 fields, written at top level (speculators) or under eagle_config.
EAGLE_FIELDS = (
    "eagle_aux_hidden_state_layer_ids", "input_embeds_norm", "fused_hidden_norm",
)


def canonical_name(name: str) -> str | None:
    """Map a tensor name of any layout to the authors' naming; ``None`` for
    tensors a drafter does not use (speculators' frozen verifier copies)."""
    if name.startswith("verifier_"):
        return None
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("layers.0."):
        name = "midlayer." + name[len("layers.0."):]
    return name


def _speculators_name(name: str) -> str:
    return "layers.0." + name[len("midlayer."):] if name.startswith("midlayer.") else name


def write_drafter(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    config: dict,
    layout: str,
    *,
    architecture: str | None = None,
    verifier: str = "",
    speculative_tokens: int = 3,
) -> Path:
    """Write canonical ``state`` (authors' names) and a flat ``config`` (Llama
    fields plus ``draft_vocab_size`` and :data:`EAGLE_FIELDS`) in ``layout``."""
    if layout not in LAYOUTS:
        raise DrafterError(f"unknown drafter layout {layout!r}; expected one of {LAYOUTS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llama = {k: config[k] for k in LLAMA_FIELDS if config.get(k) is not None}
    eagle = {k: config[k] for k in EAGLE_FIELDS if config.get(k) is not None}
    tensors = {k: v.contiguous() for k, v in state.items() if k != "embed_tokens.weight"}
    if layout == "speculators":
        cfg = {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "speculators_version": "0.1.0",
            "transformer_layer_config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **llama},
            "draft_vocab_size": config["draft_vocab_size"],
            "norm_before_residual": False,
            "target_hidden_size": config.get("target_hidden_size") or llama["hidden_size"],
            **eagle,
            "speculators_config": {
                "algorithm": "eagle3",
                "default_proposal_method": "greedy",
                "proposal_methods": [
                    {"proposal_type": "greedy", "speculative_tokens": speculative_tokens}
                ],
                "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
            },
        }
        tensors = {_speculators_name(k): v for k, v in tensors.items()}
    else:
        cfg = {
            "architectures": [architecture or DRAFTER_ARCH],
            "model_type": "llama",
            **llama,
            "draft_vocab_size": config["draft_vocab_size"],
            "eagle_config": {"use_aux_hidden_state": True, **eagle},
        }
        if config.get("target_hidden_size"):
            cfg["target_hidden_size"] = config["target_hidden_size"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if layout == "eagle":
        torch.save(tensors, out / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def detect_layout(path: str | Path) -> str:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise DrafterError(f"{cfg_path}: no drafter config.json")
    cfg = json.loads(cfg_path.read_text())
    if "speculators_model_type" in cfg:
        return "speculators"
    if (path / "pytorch_model.bin").is_file():
        return "eagle"
    if (path / "model.safetensors").is_file():
        return "specforge"
    raise DrafterError(f"{path}: no pytorch_model.bin or model.safetensors")


def read_drafter(path: str | Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Return ``(layout, flat config, canonical state)`` of a drafter dir."""
    path = Path(path)
    layout = detect_layout(path)
    cfg = json.loads((path / "config.json").read_text())
    if layout == "speculators":
        flat = dict(cfg.get("transformer_layer_config") or {})
        for k in ("draft_vocab_size", "target_hidden_size", *EAGLE_FIELDS):
            if cfg.get(k) is not None:
                flat[k] = cfg[k]
    else:
        flat = {k: v for k, v in cfg.items() if k != "eagle_config"}
        flat.update(cfg.get("eagle_config") or {})
    if layout == "eagle":
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        raw = load_file(str(path / "model.safetensors"))
    check_finite(raw, str(path))
    state = {}
    for name, tensor in raw.items():
        canon = canonical_name(name)
        if canon is not None:
            state[canon] = tensor
    return layout, flat, state
