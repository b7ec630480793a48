"""Checkpoint formats: the tensors of each quantized linear and the ``quantization_config``.

Every format is written from the same :class:`quant.gptq.QuantResult`
(integers plus scales already rounded to their stored dtype), so one
calibration dequantizes bit-identically in all of them. Which formats hold a
scheme, under which name, its packing and scale dtype come from
:mod:`quant.schemes`; the layouts per packing:

- ``native`` (this package, format_version 1): see the briefing contract.
  w4a16: ``qweight`` int32 ``[out, in/8]`` (:func:`quant.packing.pack_int4_along_input`),
  ``scales`` fp16 ``[out, groups]``, ``g_idx`` int32 ``[in]`` only with act-order;
  w8a8: ``qweight`` int8 ``[out, in]``, ``scales`` fp32 ``[out, 1]``.
- ``gptq`` (AutoGPTQ v1, w4a16 only): ``qweight`` int32 ``[in/8, out]``,
  ``qzeros`` int32 ``[groups, out/8]`` all ``0x77777777``, ``scales`` fp16
  ``[groups, out]``, ``g_idx`` int32 ``[in]``.
- ``compressed-tensors``: w4a16 ``pack-quantized`` (``weight_packed`` int32
  ``[out, in/8]``, ``weight_scale`` fp16 ``[out, groups]``, ``weight_shape``
  int64 ``[2]``); w8a8 ``int-quantized`` (``weight`` int8 ``[out, in]``,
  ``weight_scale`` fp32 ``[out, 1]``) with dynamic per-token int8 inputs.
"""

from __future__ import annotations

import torch

from quant.config import LayerScheme, QuantConfig
from quant.gptq import QuantResult
from quant.packing import gptq_qzeros, pack_int4_along_input, pack_int4_gptq
from quant.schemes import Packing, Scheme


def _words_along_input(res: QuantResult) -> torch.Tensor:
    """The integers packed along the input axis (int32 ``[out, in / pack_factor]``)."""
    if res.scheme.bits != 4:
        raise ValueError(f"no packer for {res.scheme.bits}-bit values")
    return pack_int4_along_input(res.q)


def linear_tensors(fmt: str, name: str, res: QuantResult, act_order: bool) -> dict[str, torch.Tensor]:
    """Stored tensors of one quantized linear (its bias is written separately, unchanged)."""
    spec = res.scheme.spec
    if fmt not in spec.formats:
        raise ValueError(f"the {fmt} format does not hold {spec.name}")
    packed = spec.packing is Packing.INT32_WORDS
    scales = res.scales.to(spec.scale_dtype)
    if fmt == "native":
        out = {f"{name}.qweight": _words_along_input(res) if packed else res.q.to(torch.int8),
               f"{name}.scales": scales}
        if act_order and spec.act_order:
            out[f"{name}.g_idx"] = res.g_idx.to(torch.int32)
        return out
    if fmt == "gptq":
        n_groups, out_f = res.scales.shape[1], res.q.shape[0]
        return {
            f"{name}.qweight": pack_int4_gptq(res.q),
            f"{name}.qzeros": gptq_qzeros(n_groups, out_f),
            f"{name}.scales": scales.t().contiguous(),
            f"{name}.g_idx": res.g_idx.to(torch.int32),
        }
    if fmt == "compressed-tensors":
        if packed:
            return {
                f"{name}.weight_packed": _words_along_input(res),
                f"{name}.weight_scale": scales,
                f"{name}.weight_shape": torch.tensor(list(res.q.shape), dtype=torch.int64),
            }
        return {f"{name}.weight": res.q.to(torch.int8), f"{name}.weight_scale": scales}
    raise ValueError(f"unknown format {fmt}")


def quantization_config(fmt: str, config: QuantConfig, schemes: dict[str, LayerScheme | None],
                        non_layer_linears: list[str]) -> dict:
    """``config.json["quantization_config"]`` for the quantized modules ``schemes`` (None = left in float)."""
    ignored = sorted(set(non_layer_linears) | {n for n, s in schemes.items() if s is None})
    default = config.default_scheme
    if fmt == "native":
        qc = {"quant_method": "vllm_plugins", "format_version": 1, "scheme": default.spec.formats["native"]}
        if default.spec.grouped:
            qc["group_size"] = default.group_size
            qc["act_order"] = config.act_order
        qc["ignore"] = ignored
        overrides = {n: s.as_dict() for n, s in sorted(schemes.items()) if s is not None and s != default}
        if overrides:
            qc["overrides"] = overrides
        return qc
    if fmt == "gptq":
        if any(s is not None and s != default for s in schemes.values()) or any(s is None for s in schemes.values()):
            raise ValueError("the gptq format needs one scheme for every decoder-layer linear")
        # desc_act stays false with --act-order: GPTQ ran in activation order, but with static groups
        # the stored g_idx is the natural arange // group_size, which is what desc_act false means
        # to loaders (vLLM 0.32 refuses desc_act true).
        return {
            "quant_method": "gptq", "checkpoint_format": default.spec.formats["gptq"], "bits": default.spec.bits,
            "group_size": default.group_size, "desc_act": False, "static_groups": config.act_order,
            "sym": default.spec.symmetric, "true_sequential": True, "damp_percent": config.damp_percent,
            "lm_head": False,
        }
    if fmt == "compressed-tensors":
        return _compressed_tensors_config(default, schemes, ignored)
    raise ValueError(f"unknown format {fmt}")


def write_format_files(fmt: str, out_dir, qc: dict) -> None:
    """Files a format's own loaders read besides ``config.json``: for ``gptq``, AutoGPTQ's
    ``quantize_config.json`` (it reads that file, not ``config.json``), as GPTQModel writes it."""
    import json
    from pathlib import Path

    if fmt == "gptq":
        content = {**qc, "model_name_or_path": None, "model_file_base_name": None}
        (Path(out_dir) / "quantize_config.json").write_text(json.dumps(content, indent=2) + "\n")


def _ct_args(num_bits: int, strategy: str, group_size: int | None = None, dynamic: bool = False,
             observer: str | None = "memoryless_minmax", symmetric: bool = True) -> dict:
    """compressed-tensors ``QuantizationArgs`` as its ``model_dump(mode="json")`` writes them (integer)."""
    return {"num_bits": num_bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None, "scale_dtype": None,
            "zp_dtype": None, "observer": observer, "observer_kwargs": {}}


def _ct_scheme(s: LayerScheme, targets: list[str]) -> dict:
    """compressed-tensors ``QuantizationScheme.model_dump(mode="json")`` of one scheme, without the library."""
    spec: Scheme = s.spec
    per_channel = not spec.grouped or s.group_size == -1
    weights = _ct_args(spec.bits, "channel" if per_channel else "group", None if per_channel else s.group_size,
                       symmetric=spec.symmetric)
    inputs = None
    if spec.act_bits is not None:  # dynamic per-token symmetric integer activations
        inputs = _ct_args(spec.act_bits, "token", dynamic=True, observer=None)
    return {"targets": targets, "weights": weights, "input_activations": inputs, "output_activations": None,
            "format": spec.formats["compressed-tensors"]}


def _compressed_tensors_config(default: LayerScheme, schemes: dict[str, LayerScheme | None],
                               ignored: list[str]) -> dict:
    """The ``quantization_config`` that compressed-tensors' ``QuantizationConfig.model_dump(mode="json")`` gives,
    written without importing the library (its import pulls in torch.compile and inductor: seconds and
    ~100 MiB); tests compare it with the library's."""
    # The default scheme targets every Linear; each other scheme lists its modules by exact name,
    # which compressed-tensors and vLLM match before class names.
    groups = {"group_0": _ct_scheme(default, ["Linear"])}
    others: dict[LayerScheme, list[str]] = {}
    for name, s in sorted(schemes.items()):
        if s is not None and s != default:
            others.setdefault(s, []).append(name)
    for i, (s, names) in enumerate(others.items(), 1):
        groups[f"group_{i}"] = _ct_scheme(s, names)
    formats = {g["format"] for g in groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    return {"config_groups": groups, "quant_method": "compressed-tensors", "kv_cache_scheme": None, "format": fmt,
            "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ignored}
