"""Each linear method, inside real vLLM linear layers (TP=1, gloo), against float64.

The reference is ``x @ W_deq.T`` in float64, with ``W_deq`` from the test's own
RTN exporter (``test_qpacking``); for W8A8 the activations are first
quantized per token in float64 (round half to even, scale max|x|/127).

Tolerances (max abs error relative to max |reference|):
- W4A16, float32 activations: 1e-4 (kernels accumulate in float32);
- W4A16, bfloat16 activations: 3e-2 (bf16 weights/activations inside the GEMM);
- W8A8, float32: 2e-3 (a quantization step may round the other way in the
  kernel; one int8 step of one token moves the output by ~1/127 of one term);
- W8A8, bfloat16: 3e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_qpacking import act_order_g_idx, rtn_w4, rtn_w8

TOL = {("w4a16", torch.float32): 1e-4, ("w4a16", torch.bfloat16): 3e-2,
       ("w8a8", torch.float32): 2e-3, ("w8a8", torch.bfloat16): 3e-2}
MAPPING = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.fixture(scope="module")
def vllm_tp1(vllm_single_process):
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


def _quant_config(qcfg):
    from vllm_plugins.quantization.config import VllmPluginsQuantConfig

    cfg = VllmPluginsQuantConfig.from_config({"quant_method": "vllm_plugins", **qcfg})
    cfg.packed_modules_mapping = MAPPING
    return cfg


def _make_layer(kind, in_f, outs, cfg, dtype):
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                                   RowParallelLinear)

    if kind == "qkv":
        head = 32
        return QKVParallelLinear(in_f, head, outs[0] // head, outs[1] // head, bias=False, quant_config=cfg,
                                 prefix="model.layers.0.self_attn.qkv_proj", params_dtype=dtype), ["q", "k", "v"]
    if kind == "merged":
        return MergedColumnParallelLinear(in_f, outs, bias=False, quant_config=cfg,
                                          prefix="model.layers.0.mlp.gate_up_proj", params_dtype=dtype), [0, 1]
    return RowParallelLinear(in_f, outs[0], bias=True, quant_config=cfg,
                             prefix="model.layers.0.mlp.down_proj", params_dtype=dtype), [None]


def _run(kind, in_f, outs, qcfg, dtype, seed=0):
    """Build, load and run one layer; return (output, float64 reference, method)."""
    y, ref, layer = _run_layer(kind, in_f, outs, qcfg, dtype, seed)
    return y, ref, layer.quant_method


def _run_layer(kind, in_f, outs, qcfg, dtype, seed=0):
    """Build, load and run one layer; return (output, float64 reference, layer)."""
    torch.manual_seed(seed)
    cfg = _quant_config(qcfg)
    layer, shard_ids = _make_layer(kind, in_f, outs, cfg, dtype)
    scheme = cfg.layer_scheme(layer.prefix)
    deqs = []
    g_idx = act_order_g_idx(in_f, scheme.group_size, seed) if scheme.scheme == "w4a16" and scheme.act_order else None
    for sid, out_f in zip(shard_ids, outs):
        w = torch.randn(out_f, in_f) * 0.05
        if scheme.scheme == "w4a16":
            qweight, scales, deq = rtn_w4(w, scheme.group_size, g_idx)
            tensors = {"qweight": qweight, "scales": scales.to(dtype)}
            if g_idx is not None:
                tensors["g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        else:
            qweight, scales, deq = rtn_w8(w)
            tensors = {"qweight": qweight, "scales": scales}
        deqs.append(deq if scheme.scheme == "w8a8" else _w4_deq(tensors, in_f, scheme))
        for name, t in tensors.items():
            param = getattr(layer, name)
            if sid is None:
                param.weight_loader(param, t)
            else:
                param.weight_loader(param, t, sid)
    bias = None
    if getattr(layer, "bias", None) is not None:
        bias = torch.randn(layer.bias.shape) * 0.1
        layer.bias.weight_loader(layer.bias, bias.to(dtype))
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(7, in_f).to(dtype)
    with torch.no_grad():
        y = layer(x)[0]
    w_ref = torch.cat(deqs)
    x64 = x.double()
    if scheme.scheme == "w8a8":
        s = x64.abs().amax(-1, keepdim=True) / 127
        x64 = torch.clamp(torch.round(x64 / s), -127, 127) * s
    ref = x64 @ w_ref.t()
    if bias is not None:
        ref = ref + bias.to(dtype).double()
    return y, ref, layer


def _w4_deq(tensors, in_f, scheme):
    """W4 dequantized in float64 from the stored (dtype-rounded) scales, as the GEMM sees them."""
    q = torch.tensor(np.stack([(tensors["qweight"].numpy().view(np.uint32)[:, i // 8] >> (4 * (i % 8))) & 15
                               for i in range(in_f)], axis=1).astype(np.int64) - 8, dtype=torch.float64)
    if "g_idx" in tensors:
        g = tensors["g_idx"].long()
    else:
        g = torch.zeros(in_f, dtype=torch.long) if scheme.group_size == -1 else torch.arange(in_f) // scheme.group_size
    return q * tensors["scales"].double()[:, g]


def _check(y, ref, scheme, dtype):
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[(scheme, dtype)] * scale, f"max err {err:.3g} vs max |ref| {scale:.3g}"


W4_CASES = [  # kind, in, outs, group_size, act_order
    ("qkv", 128, [128, 64, 64], 32, False),
    ("qkv", 256, [128, 64, 64], 128, False),
    ("merged", 128, [256, 256], -1, False),
    ("merged", 128, [256, 256], 64, True),
    ("row", 256, [128], 128, False),
    ("row", 512, [64], -1, False),
    ("row", 256, [128], 32, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind, in_f, outs, gs, act_order", W4_CASES)
def test_w4a16_kernel_vs_float64(vllm_tp1, kind, in_f, outs, gs, act_order, dtype):
    y, ref, method = _run(kind, in_f, outs, {"scheme": "w4a16", "group_size": gs, "act_order": act_order}, dtype)
    assert method.kernel is not None, method.fallback_reason
    _check(y, ref, "w4a16", dtype)


@pytest.mark.parametrize("kind, in_f, outs", [("merged", 64, [172, 172]), ("row", 172, [64]), ("qkv", 64, [32, 32, 32])])
def test_w4a16_fallback_shapes_vs_float64(vllm_tp1, kind, in_f, outs):
    """stories260K's 172 (and 96 outputs with group 32 over 64 inputs run on a kernel)."""
    y, ref, method = _run(kind, in_f, outs, {"scheme": "w4a16", "group_size": 32}, torch.float32)
    if 172 in (in_f, *outs):
        assert method.kernel is None and method.fallback_reason
    _check(y, ref, "w4a16", torch.float32)


def _best_cpu_int4(dtype) -> str:
    """The plugin's CPU int4 kernel for a layer whose shapes the tile layout takes."""
    from vllm_plugins.quantization import cpu_ext

    fast = dtype == torch.bfloat16 and cpu_ext.has_fast_path()
    return "TileInt4CPULinearKernel" if fast else "TorchInt4CPULinearKernel"


def test_plugin_cpu_int4_kernel_preferred(vllm_tp1):
    """The native method runs our int4 kernels on CPU, also where vLLM would
    choose CPUWNA16 (bf16 on builds with cpu_gemm_wna16): the compiled tile
    kernel for bf16 on AVX512-BF16 or AVX2 CPUs, aten's int4 kernel otherwise."""
    for dtype in (torch.float32, torch.bfloat16):
        y, ref, method = _run("qkv", 128, [128, 64, 64], {"scheme": "w4a16", "group_size": 32}, dtype)
        assert method.kernel_name == _best_cpu_int4(dtype)
        _check(y, ref, "w4a16", dtype)


@pytest.mark.parametrize("kind, in_f, outs, gs, act_order", [W4_CASES[0], W4_CASES[3], W4_CASES[4]])
def test_tile_kernel_avx2_path_forced(vllm_tp1, monkeypatch, kind, in_f, outs, gs, act_order):
    """VLLM_PLUGINS_INT4_ISA=avx2: the tile kernel runs its AVX2 path (what an AVX2-only CPU gets)."""
    from vllm_plugins.quantization import cpu_ext

    if not cpu_ext.isa_supported("avx2"):
        pytest.skip("this CPU lacks AVX2 + FMA")
    monkeypatch.setenv(cpu_ext.ISA_ENV, "avx2")
    y, ref, method = _run(kind, in_f, outs, {"scheme": "w4a16", "group_size": gs, "act_order": act_order},
                          torch.bfloat16)
    assert method.kernel_name == "TileInt4CPULinearKernel"
    _check(y, ref, "w4a16", torch.bfloat16)


def test_tile_kernel_keeps_large_weights_on_huge_pages(vllm_tp1):
    """A layer whose packed weight is >= 2 MiB: the tile kernel moves it to a 2 MiB-aligned
    huge-page mapping at load (cpu_ext.on_huge_pages) and still computes x @ W.T exactly."""
    from vllm_plugins.quantization import cpu_ext

    if not cpu_ext.has_fast_path():
        pytest.skip("no vectorized tile path on this CPU")
    y, ref, layer = _run_layer("row", 1024, [4096], {"scheme": "w4a16", "group_size": 128}, torch.bfloat16)
    assert layer.quant_method.kernel_name == "TileInt4CPULinearKernel"
    qweight = layer.qweight
    assert qweight.dtype == torch.uint8 and qweight.nbytes == 4096 * 1024 // 2
    assert qweight.data_ptr() % (2 << 20) == 0
    _check(y, ref, "w4a16", torch.bfloat16)


def test_tile_kernel_int8_activations_only_when_asked(vllm_tp1):
    """cpu_activations: "int8" runs the int8-activation path (its outputs differ from the exact
    path's, still within the bf16 tolerance); without the key the layer stays exact."""
    from vllm_plugins.quantization import cpu_ext

    if not cpu_ext.int8_supported():
        pytest.skip("this CPU lacks AVX512-VNNI")
    qcfg = {"scheme": "w4a16", "group_size": 64, "act_order": True}
    ys = {}
    for act in (None, "bf16", "int8"):
        y, ref, method = _run("merged", 128, [256, 256], qcfg | ({"cpu_activations": act} if act else {}),
                              torch.bfloat16)
        assert method.kernel_name == "TileInt4CPULinearKernel"
        _check(y, ref, "w4a16", torch.bfloat16)
        ys[act] = y
    assert torch.equal(ys[None], ys["bf16"]) and not torch.equal(ys["int8"], ys["bf16"])


@pytest.mark.parametrize("kind, in_f, outs, gs, act_order", [W4_CASES[1], W4_CASES[3], W4_CASES[5]])
def test_aten_int4_kernel_bf16_when_tile_disabled(vllm_tp1, monkeypatch, kind, in_f, outs, gs, act_order):
    """VLLM_DISABLED_KERNELS=TileInt4CPULinearKernel: aten's int4 kernel, bf16 included."""
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", "TileInt4CPULinearKernel")
    y, ref, method = _run(kind, in_f, outs, {"scheme": "w4a16", "group_size": gs, "act_order": act_order},
                          torch.bfloat16)
    assert method.kernel_name == "TorchInt4CPULinearKernel"
    _check(y, ref, "w4a16", torch.bfloat16)


def test_cpuwna16_when_ours_disabled(vllm_tp1, monkeypatch):
    """Both of ours in VLLM_DISABLED_KERNELS gives vLLM's own CPU choice:
    CPUWNA16 where its op exists (bf16), else the logged torch fallback."""
    from vllm_plugins.quantization.cpu_int4 import cpu_gemm_wna16_available

    monkeypatch.setenv("VLLM_DISABLED_KERNELS", "TileInt4CPULinearKernel,TorchInt4CPULinearKernel")
    y, ref, method = _run("qkv", 128, [128, 64, 64], {"scheme": "w4a16", "group_size": 32}, torch.bfloat16)
    if cpu_gemm_wna16_available():
        assert method.kernel_name == "CPUWNA16LinearKernel"
    else:
        assert method.kernel is None and "cpu_gemm_wna16" in method.fallback_reason
    _check(y, ref, "w4a16", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind, in_f, outs", [("qkv", 128, [128, 64, 64]), ("merged", 128, [256, 256]),
                                               ("row", 256, [128]), ("merged", 64, [172, 172]), ("row", 172, [64])])
def test_w8a8_kernel_vs_float64(vllm_tp1, kind, in_f, outs, dtype):
    y, ref, method = _run(kind, in_f, outs, {"scheme": "w8a8"}, dtype)
    assert method.kernel is not None, method.fallback_reason
    _check(y, ref, "w8a8", dtype)


def test_w8a8_torch_fallback_vs_float64(vllm_tp1, monkeypatch):
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", "CPUInt8ScaledMMLinearKernel,ZentorchInt8ScaledMMLinearKernel")
    y, ref, method = _run("qkv", 128, [128, 64, 64], {"scheme": "w8a8"}, torch.float32)
    assert method.kernel is None and "CPUInt8ScaledMMLinearKernel" in method.fallback_reason
    _check(y, ref, "w8a8", torch.float32)


def test_vllm_kernel_choice_includes_cpu_int4(vllm_tp1):
    """After register(): fp32 layers (no CPUWNA16 path) and builds without
    cpu_gemm_wna16 get our kernel; otherwise vLLM's CPUWNA16 keeps them."""
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.scalar_type import scalar_types

    from vllm_plugins.quantization.cpu_int4 import cpu_gemm_wna16_available

    def chosen(dtype):
        return choose_mp_linear_kernel(MPLinearLayerConfig(
            full_weight_shape=(256, 128), partition_weight_shape=(256, 128), weight_type=scalar_types.uint4b8,
            act_type=dtype, group_size=128, zero_points=False)).__name__

    assert chosen(torch.float32) == "TorchInt4CPULinearKernel"
    assert chosen(torch.bfloat16) == ("CPUWNA16LinearKernel" if cpu_gemm_wna16_available()
                                      else _best_cpu_int4(torch.bfloat16))


def test_w4a16_fallback_reason_is_whole(vllm_tp1):
    """Row 19: stories260K's gate_up_proj (64 -> 2 x 172) logged why no kernel takes it cut
    mid-word ("...cannot implement due to: bfloa)"); the reason is vLLM's whole message."""
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.scalar_type import scalar_types

    _, _, method = _run("merged", 64, [172, 172], {"scheme": "w4a16", "group_size": 32}, torch.float32)
    with pytest.raises(ValueError) as info:
        choose_mp_linear_kernel(MPLinearLayerConfig(
            full_weight_shape=(64, 344), partition_weight_shape=(64, 344), weight_type=scalar_types.uint4b8,
            act_type=torch.float32, group_size=32, zero_points=False))
    expected = " ".join(str(info.value).split())
    assert len(expected) > 300  # longer than the old cut
    assert method.kernel is None and method.fallback_reason == expected


def test_readme_float32_claim_matches_vllm():
    """Row 22: the README said in-tree gptq layers run the plugin's kernels for float32
    activations; vLLM refuses float32 for gptq checkpoints before any kernel is picked."""
    from pathlib import Path

    from vllm.model_executor.layers.quantization import get_quantization_config

    assert torch.float32 not in get_quantization_config("gptq").get_supported_act_dtypes()
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert "vLLM rejects `--dtype float32` for any `gptq` checkpoint before it picks a kernel" in readme
    assert "vLLM's in-tree `gptq` and compressed-tensors W4A16 layers use them too" not in readme
