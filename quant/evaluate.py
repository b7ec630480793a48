"""Torch reference for exported checkpoints: dequantize any export, measure perplexity.

:func:`dequantized_state_dict` reads an export of any format back into the
float Hugging Face state dict (``W = q * scale``), independently of vLLM.
:func:`load_dequantized_model` builds a transformers model from it, so the
quantized checkpoints can be evaluated (perplexity, greedy tokens) in torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from quant.checkpoint import ShardReader
from quant.packing import unpack_int4_along_input, unpack_int4_gptq


def _dequant(q: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None) -> torch.Tensor:
    q = q.to(torch.float32)
    scales = scales.to(torch.float32)
    if g_idx is None:
        groups = scales.shape[1]
        g_idx = torch.arange(q.shape[1]) // (q.shape[1] // groups)
    return q * scales[:, g_idx.long()]


def dequantized_state_dict(export_dir: str | Path) -> dict[str, torch.Tensor]:
    """Float32 weights (other tensors as stored) of a ``native``, ``gptq`` or ``compressed-tensors`` export."""
    export_dir = Path(export_dir)
    qc = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    method = qc["quant_method"]
    reader = ShardReader(export_dir)
    with reader.open():
        tensors = {n: reader.read(n) for n in reader.names()}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if method == "vllm_plugins" and name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            q = unpack_int4_along_input(t) if t.dtype == torch.int32 else t
            out[f"{base}.weight"] = _dequant(q, tensors[f"{base}.scales"], tensors.get(f"{base}.g_idx"))
        elif method == "gptq" and name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            out[f"{base}.weight"] = _dequant(unpack_int4_gptq(t), tensors[f"{base}.scales"].t(), tensors[f"{base}.g_idx"])
        elif method == "compressed-tensors" and name.endswith(".weight_packed"):
            base = name[: -len(".weight_packed")]
            out[f"{base}.weight"] = _dequant(unpack_int4_along_input(t), tensors[f"{base}.weight_scale"], None)
        elif method == "compressed-tensors" and name.endswith(".weight") and t.dtype == torch.int8:
            base = name[: -len(".weight")]
            out[name] = _dequant(t, tensors[f"{base}.weight_scale"], None)
        elif name.rsplit(".", 1)[-1] in ("scales", "g_idx", "qzeros", "weight_scale", "weight_shape"):
            continue
        else:
            out[name] = t
    return out


def w8a8_module_names(export_dir: str | Path) -> list[str]:
    """HF names of the linears an export quantizes as w8a8 (int8 weights)."""
    reader = ShardReader(export_dir)
    qc = json.loads((Path(export_dir) / "config.json").read_text())["quantization_config"]
    suffix = ".weight" if qc["quant_method"] == "compressed-tensors" else ".qweight"
    return [n[: -len(suffix)] for n in reader.names() if n.endswith(suffix) and reader.dtype(n) == torch.int8]


def fake_quant_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token symmetric int8 activations, as vLLM's W8A8 computes them."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(x.float() / scale), -127, 127) * scale).to(x.dtype)


def load_dequantized_model(export_dir: str | Path, dtype=torch.float32, act_quant: bool = True):
    """A transformers causal LM holding the dequantized weights of ``export_dir``.

    With ``act_quant`` the inputs of w8a8 linears are fake-quantized per token
    to int8, as at serving time.
    """
    from transformers import AutoModelForCausalLM

    from quant.model import load_hf_config

    export_dir = Path(export_dir)
    raw = json.loads((export_dir / "config.json").read_text())
    raw.pop("quantization_config", None)
    config = type(load_hf_config(export_dir)).from_dict(raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in dequantized_state_dict(export_dir).items()}
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(config.get_text_config(), "tie_word_embeddings", False):
        for a, b in tied.items():
            if a in state and b not in state:
                state[b] = state[a]
            elif b in state and a not in state:
                state[a] = state[b]
    model.load_state_dict(state, strict=False, assign=True)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:
            if name.endswith("inv_freq") or "rotary" in name:
                continue
            raise ValueError(f"{export_dir}: no tensor for {name}")
    _reinit_meta_buffers(model)
    if act_quant:
        for name in w8a8_module_names(export_dir):
            model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args: (fake_quant_per_token_int8(args[0]), *args[1:]))
    return model.eval()


def _reinit_meta_buffers(model) -> None:
    for module in model.modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if metas:
            module.to_empty(device="cpu")
            model._init_weights(module)


def load_float_model(model_dir: str | Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from quant.model import load_hf_config

    load_hf_config(Path(model_dir))  # registers the package's own model types

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


def perplexity(model, tokens: torch.Tensor, seqlen: int = 512) -> float:
    """exp(mean NLL) of a 1-D token stream cut into windows of ``seqlen``."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, tokens.numel() - 1, seqlen):
            chunk = tokens[s:s + seqlen + 1]
            if chunk.numel() < 2:
                break
            logits = model(input_ids=chunk[:-1].unsqueeze(0)).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
            count += chunk.numel() - 1
    return math.exp(nll / count)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
