"""The compiled CPU W8A8 GEMM (``vllm_plugins/quantization/csrc/int8_gemv.cpp``).

Reference: :func:`vllm_plugins.quantization.packing.w8a8_reference` in
float64 (per-token int8 activations, exact integer products). The op
quantizes the activations with the same float32 operations, so the integers
agree exactly and only the final scaling differs:

- float32 outputs: max |out - ref| / max |ref| <= 1e-6 (float32 scaling);
- bfloat16 outputs: 4e-3 (the result is rounded to bfloat16, step 2^-8).

The VNNI path and the portable path sum the same integers, so their outputs
are compared for equality. A wrong offset (128 * row sum) or a dropped block
of 64 inputs moves outputs by far more than these tolerances.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_plugins.quantization import cpu_ext
from vllm_plugins.quantization.packing import w8a8_reference

TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
SHAPES = [(64, 256), (96, 640), (4, 64), (128, 1024)]


@pytest.fixture(scope="module")
def loaded():
    assert cpu_ext.load(), "the CPU GEMM extension must build here (a C++ compiler is part of the set-up)"


def _layer(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return w, w.sum(dim=1, dtype=torch.int32), torch.rand(n, generator=gen) * 0.01 + 1e-3


def test_fast_path_follows_cpu_flags(loaded):
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert cpu_ext.int8_has_fast_path() == ({"avx512f", "avx512bw", "avx512_vnni"} <= flags)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, k", SHAPES)
def test_int8_linear_vs_float64(loaded, n, k, dtype):
    w, wsum, scales = _layer(n, k)
    for rows in (1, 2, 3, 4, 5, 9, cpu_ext.INT8_GEMM_MIN_ROWS, 40):  # GEMV, then the int8 GEMM
        x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
        out = cpu_ext.int8_linear(x, w, wsum, scales)
        portable = cpu_ext.int8_linear(x, w, wsum, scales, portable=True)
        ref = w8a8_reference(x.double(), w, scales.double())
        assert out.dtype == dtype and out.shape == (rows, n)
        assert torch.equal(out, portable), rows
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= TOL[dtype], (rows, err)


def test_bias_and_leading_dims(loaded):
    w, wsum, scales = _layer(64, 128)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, generator=gen)
    bias = torch.randn(64, generator=gen)
    out = cpu_ext.int8_linear(x, w, wsum, scales, bias)
    ref = w8a8_reference(x.double(), w, scales.double(), bias.double())
    assert out.shape == (2, 3, 64)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= TOL[torch.float32]


def test_zero_rows_and_shape_errors(loaded):
    w, wsum, scales = _layer(8, 128)
    assert torch.equal(cpu_ext.int8_linear(torch.zeros(1, 128), w, wsum, scales), torch.zeros(1, 8))
    with pytest.raises(RuntimeError, match="x has 64 inputs"):
        cpu_ext.int8_linear(torch.zeros(1, 64), w, wsum, scales)
    with pytest.raises(RuntimeError, match="K % 64 == 0"):
        cpu_ext.int8_linear(torch.zeros(1, 96), w[:, :96].contiguous(), wsum, scales)
    with pytest.raises(RuntimeError, match="wsum must be int32"):
        cpu_ext.int8_linear(torch.zeros(1, 128), w, wsum.float(), scales)
    assert "multiple of 4" in cpu_ext.int8_problem(6, 128)
    assert "multiple of 64" in cpu_ext.int8_problem(8, 172)
    assert cpu_ext.int8_problem(8, 128) is None


def test_int8_linear_under_torch_compile(loaded):
    """vLLM compiles the model on CPU by default: the op traces with a dynamic batch size."""
    w, wsum, scales = _layer(64, 256)
    compiled = torch.compile(lambda x: cpu_ext.int8_linear(x, w, wsum, scales) * 2, fullgraph=True, dynamic=True)
    for rows in (1, 3, cpu_ext.INT8_GEMM_MIN_ROWS + 1):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        assert torch.equal(compiled(x), cpu_ext.int8_linear(x, w, wsum, scales) * 2)
