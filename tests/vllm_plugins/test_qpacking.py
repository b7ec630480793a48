"""The ``native`` layout and config contract, plus the test-side RTN exporter.

``rtn_w4`` / ``rtn_w8`` / ``export_native`` are written from the briefing's
contract with numpy bit arithmetic, independently of
``vllm_plugins.quantization.packing``; the other test modules import them
(``from test_qpacking import ...``) to build checkpoints and references.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_plugins.quantization import packing
from vllm_plugins.quantization.schema import LayerScheme, NativeQuantConfig, QuantConfigError

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


# --------------------------------------------------------------------- exporter
def rtn_w4(w: torch.Tensor, group_size: int, g_idx: np.ndarray | None = None):
    """Round-to-nearest symmetric int4 of ``w [out, in]`` in the native layout.

    Returns ``(qweight int32 [out, ceil(in/8)], scales float16 [out, n_groups],
    dequantized float64 [out, in])``.
    """
    w64 = w.double().numpy()
    out_f, in_f = w64.shape
    if g_idx is None:
        g_idx = np.zeros(in_f, np.int64) if group_size == -1 else np.arange(in_f) // group_size
    n_groups = int(g_idx.max()) + 1
    amax = np.zeros((out_f, n_groups))
    for g in range(n_groups):
        amax[:, g] = np.abs(w64[:, g_idx == g]).max(axis=1)
    scales = (np.maximum(amax, 1e-8) * 2 / 15).astype(np.float16)  # GPTQ's sym grid: [-8, 7]
    s_full = scales.astype(np.float64)[:, g_idx]
    q = np.clip(np.rint(w64 / s_full), -8, 7).astype(np.int64)
    words = math.ceil(in_f / 8)
    nib = np.full((out_f, words * 8), 8, np.uint64)
    nib[:, :in_f] = (q + 8).astype(np.uint64)
    packed = np.zeros((out_f, words), np.uint64)
    for j in range(8):
        packed |= nib[:, j::8] << np.uint64(4 * j)
    qweight = torch.from_numpy(packed.astype(np.uint32).view(np.int32).copy())
    return qweight, torch.from_numpy(scales), torch.from_numpy(q * s_full)


def rtn_w8(w: torch.Tensor):
    """Per-channel symmetric int8: ``(qweight int8, scales float32 [out, 1], dequantized float64)``."""
    w64 = w.double().numpy()
    scales = (np.maximum(np.abs(w64).max(axis=1, keepdims=True), 1e-8) / 127).astype(np.float32)
    q = np.clip(np.rint(w64 / scales.astype(np.float64)), -127, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(scales), torch.from_numpy(q.astype(np.float64) * scales)


def act_order_g_idx(in_f: int, group_size: int, seed: int = 0) -> np.ndarray:
    """A GPTQ-style act_order ``g_idx``: groups of ``group_size`` over a random input order."""
    perm = np.random.default_rng(seed).permutation(in_f)
    g_idx = np.empty(in_f, np.int64)
    g_idx[perm] = np.arange(in_f) // group_size
    return g_idx


def export_native(src: Path, out: Path, qcfg: dict, shards: int = 2) -> dict[str, torch.Tensor]:
    """RTN-export HF checkpoint ``src`` to ``out`` per ``qcfg``; returns the dequantized
    float64 weights of the quantized modules, by HF module name."""
    from safetensors.torch import load_file, save_file

    native = NativeQuantConfig.from_dict(qcfg)
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    tensors, deq = {}, {}
    for name, t in state.items():
        module, _, leaf = name.rpartition(".")
        scheme = native.layer(module) if module.endswith(LINEAR_SUFFIXES) and leaf == "weight" else None
        if scheme is None:
            tensors[name] = t
        elif scheme.scheme == "w8a8":
            tensors[f"{module}.qweight"], tensors[f"{module}.scales"], deq[module] = rtn_w8(t)
        else:
            g_idx = act_order_g_idx(t.shape[1], scheme.group_size) if scheme.act_order and scheme.group_size != -1 else None
            tensors[f"{module}.qweight"], tensors[f"{module}.scales"], deq[module] = rtn_w4(t, scheme.group_size, g_idx)
            if scheme.act_order:
                gi = g_idx if g_idx is not None else np.zeros(t.shape[1], np.int64)
                tensors[f"{module}.g_idx"] = torch.from_numpy(gi.astype(np.int32))
    out.mkdir(parents=True, exist_ok=False)
    names = sorted(tensors)
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja", ".txt", ".model") and f.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return deq


def read_native(export: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(quantization_config, {module: float64 dequantized weight})`` of any native
    export, read with numpy from the contract alone (an independent reader)."""
    from safetensors.numpy import load_file

    qcfg = json.loads((export / "config.json").read_text())["quantization_config"]
    native = NativeQuantConfig.from_dict(qcfg)
    tensors = {}
    for f in sorted(export.glob("*.safetensors")):
        tensors.update(load_file(f))
    deq = {}
    for name in [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]:
        qweight, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"].astype(np.float64)
        scheme = native.layer(name)
        assert scheme is not None, f"{name} is quantized but ignored in the config"
        if scheme.scheme == "w8a8":
            assert qweight.dtype == np.int8 and scales.shape == (qweight.shape[0], 1)
            deq[name] = torch.from_numpy(qweight.astype(np.float64) * scales)
            continue
        assert qweight.dtype == np.int32
        words = qweight.view(np.uint32)
        in_f = tensors[f"{name}.g_idx"].shape[0] if f"{name}.g_idx" in tensors else words.shape[1] * 8
        q = np.stack([(words[:, i // 8] >> np.uint32(4 * (i % 8))) & np.uint32(15) for i in range(in_f)], 1)
        q = q.astype(np.int64) - 8
        if f"{name}.g_idx" in tensors:
            g = tensors[f"{name}.g_idx"].astype(np.int64)
        elif scheme.group_size == -1:
            g = np.zeros(in_f, np.int64)
        else:
            g = np.arange(in_f) // scheme.group_size
        deq[name] = torch.from_numpy(q * scales[:, g])
    return qcfg, deq


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("in_f", [8, 64, 172])
def test_pack_matches_independent_packer_and_round_trips(in_f):
    torch.manual_seed(in_f)
    w = torch.randn(24, in_f)
    qweight, scales, deq = rtn_w4(w, 32)
    q = torch.round(deq / scales.double()[:, torch.arange(in_f) // 32]).to(torch.int8)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(packing.pack_int4(q), qweight)
    assert torch.equal(packing.unpack_int4(qweight, in_f), q)
    assert torch.equal(packing.dequantize_w4(qweight, scales, in_f, 32), deq)


def test_layout_is_vllm_uint4b8_packed_along_input():
    """The kernels vLLM chooses read our qweight with packed_dim=1 as q + 8."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    u = unpack_quantized_values_into_int32(packing.pack_int4(q), scalar_types.uint4b8, 1)
    assert torch.equal(u - 8, q.to(torch.int32))


def test_independent_reader_round_trips_the_test_exporter(tiny_llama, tmp_path):
    qcfg = {"quant_method": "vllm_plugins", "scheme": "w4a16", "group_size": 32, "act_order": True,
            "ignore": ["lm_head"], "overrides": {"model.layers.0.mlp.up_proj": {"scheme": "w8a8"}}}
    deq = export_native(tiny_llama(), tmp_path / "x", qcfg)
    read_cfg, read = read_native(tmp_path / "x")
    assert read_cfg == qcfg and read.keys() == deq.keys()
    for name in deq:
        assert torch.equal(read[name], deq[name]), name


def test_w8_dequantize_and_act_order_g_idx():
    qweight, scales, deq = rtn_w8(torch.randn(8, 40))
    assert torch.equal(packing.dequantize_w8(qweight, scales), deq)
    g_idx = act_order_g_idx(64, 32)
    assert np.bincount(g_idx).tolist() == [32, 32]


def test_config_defaults_overrides_and_round_trip():
    cfg = NativeQuantConfig.from_dict({
        "quant_method": "vllm_plugins", "format_version": 1, "scheme": "w4a16", "group_size": 64,
        "ignore": ["lm_head"],
        "overrides": {"a.q_proj": {"scheme": "w8a8"}, "a.down_proj": {"group_size": 32, "act_order": True}},
    })
    assert cfg.layer("lm_head") is None
    assert cfg.layer("a.q_proj") == LayerScheme("w8a8")
    assert cfg.layer("a.down_proj") == LayerScheme("w4a16", 32, True)
    assert cfg.layer("b.up_proj") == LayerScheme("w4a16", 64, False)
    assert NativeQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert NativeQuantConfig.from_dict({}).default_layer == LayerScheme("w4a16", 128, False)
    assert NativeQuantConfig.from_dict({}).cpu_activations == "bf16"  # int8 activations only when asked for
    assert "cpu_activations" not in cfg.to_dict()
    int8 = NativeQuantConfig.from_dict({"cpu_activations": "int8"})
    assert int8.to_dict()["cpu_activations"] == "int8" and NativeQuantConfig.from_dict(int8.to_dict()) == int8


@pytest.mark.parametrize("bad, message", [
    ({"scheme": "w4a16", "bits": 4}, "unknown quantization_config keys"),
    ({"scheme": "w3a16"}, "scheme must be one of"),
    ({"scheme": "w4a16", "group_size": 48}, "group_size must be one of"),
    ({"scheme": "w8a8", "group_size": 128}, "scheme is w8a8"),
    ({"format_version": 2}, "format_version 2"),
    ({"quant_method": "gptq"}, "quant_method must be"),
    ({"overrides": {"x.q_proj": {"scheme": "w8a8", "group_size": 32}}}, "x.q_proj"),
    ({"overrides": {"x.q_proj": {"bits": 8}}}, "unknown keys"),
    ({"ignore": ["x.q_proj"], "overrides": {"x.q_proj": {"scheme": "w8a8"}}}, "both ignored and overridden"),
    ({"ignore": "lm_head"}, "ignore must be a list"),
    ({"act_order": "yes"}, "act_order must be"),
    ({"cpu_activations": "fp8"}, "cpu_activations must be one of"),
])
def test_config_rejects_bad_input(bad, message):
    with pytest.raises(QuantConfigError, match=message):
        NativeQuantConfig.from_dict(bad)


def test_vllm_config_resolves_fused_layers_and_rejects_mixed_fusions():
    from vllm_plugins.quantization.config import VllmPluginsQuantConfig

    cfg = VllmPluginsQuantConfig.from_config({
        "quant_method": "vllm_plugins", "scheme": "w4a16", "group_size": 32, "ignore": ["lm_head"],
        "overrides": {"m.layers.0.self_attn.q_proj": {"scheme": "w8a8"}}})
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert cfg.layer_scheme("m.layers.1.mlp.gate_up_proj") == LayerScheme("w4a16", 32)
    assert cfg.layer_scheme("lm_head") is None
    with pytest.raises(QuantConfigError, match="must be quantized alike"):
        cfg.layer_scheme("m.layers.0.self_attn.qkv_proj")
    with pytest.raises(QuantConfigError, match="unknown quantization_config keys"):
        VllmPluginsQuantConfig.from_config({"quant_method": "vllm_plugins", "sym": True})


# -------------------------------------------------------------------- reference
class _FakeW8A8Linear(torch.nn.Module):
    """Per-token int8 activations (float64 emulation) times a dequantized weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 127
        xq = torch.clamp(torch.round(x / s), -127, 127) * s
        return torch.nn.functional.linear(xq, self.weight, self.bias)


def dequantized_reference(src: Path, qcfg: dict, deq: dict[str, torch.Tensor]):
    """HF model of ``src`` in float64 with every quantized linear replaced by its
    dequantized weight (and per-token int8 activations where the scheme is w8a8)."""
    from transformers import AutoModelForCausalLM

    native = NativeQuantConfig.from_dict(qcfg)
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float64).eval()
    for name, w in deq.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, leaf)
        if native.layer(name).scheme == "w8a8":
            setattr(owner, leaf, _FakeW8A8Linear(w.double(), old.bias))
        else:
            old.weight.data = w.double()
    return model


def greedy_reference(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                               pad_token_id=0, eos_token_id=None)
            outs.append(y[0, len(ids):].tolist())
    return outs


def greedy_gaps(model, prompts: list[list[int]], generated: list[list[int]]) -> list[float]:
    """Teacher-force ``generated`` through the reference; for each step, how far the
    chosen token's logit is below the reference's best (0 where greedy agrees)."""
    gaps = []
    with torch.no_grad():
        for ids, gen in zip(prompts, generated):
            logits = model(torch.tensor([ids + gen])).logits[0, len(ids) - 1:-1]
            chosen = logits.gather(1, torch.tensor(gen).unsqueeze(1))[:, 0]
            gaps.extend((logits.max(dim=1).values - chosen).tolist())
    return gaps


def test_plugin_reads_the_scheme_table():
    """Every scheme of quant.schemes the native format holds has a serving kernel, and the schema's
    validation follows the table (group sizes, per-channel schemes)."""
    from quant.schemes import SCHEMES as TABLE
    from vllm_plugins.quantization.config import LINEAR_METHODS
    from vllm_plugins.quantization.schema import SCHEMES

    native = {s.formats["native"] for s in TABLE.values() if "native" in s.formats}
    assert set(SCHEMES) == native == set(LINEAR_METHODS)
    for spec in TABLE.values():
        for g in spec.group_sizes:
            assert LayerScheme(spec.name, g).spec is spec
        if not spec.grouped:
            with pytest.raises(QuantConfigError, match="per-channel"):
                LayerScheme(spec.name, 128)
