"""The compiled CPU int4 GEMM (``vllm_plugins/quantization/csrc/``: int4_ops.cpp, int4_avx512.cpp, int4_avx2.cpp).

``avx512bf16_novbmi2`` is the AVX-512 path as CPUs without AVX512-VBMI2 run it; it must
match ``avx512bf16`` bit for bit (on a CPU without VBMI2 the two are the same code).

Ladder: the tile layout as a contract (decoded here with the docstring's
formula, independently of the packer), the choice of path from the CPU flags
and ``VLLM_PLUGINS_INT4_ISA``, then the op against float64
``x @ ((u - 8) * s).T`` on every path this CPU runs (``avx512bf16``, ``avx2``,
``portable``; a path whose flags the CPU lacks is skipped, never run), for
1..33 activation rows (every register-block size and remainder) and group sizes
32, 64, 128, 256 and per-channel.

Tolerance: max |out - ref| / max |ref| <= 6e-3. The op takes bfloat16
activations exactly (the reference uses the same bfloat16 values), multiplies
and accumulates in float32 and rounds the result to bfloat16 (relative step
2^-8, so at most 2^-9 = 2e-3 of max |ref|). A wrong nibble, group or scale
moves outputs by far more (a single flipped nibble of weight ~1/16 of a row's
terms). The dequantize-then-GEMM path (from ``DEQUANT_MIN_ROWS`` rows) also
rounds each weight to bfloat16: 1.2e-2 there. Adding a bfloat16 bias rounds
once more: + 2^-8 (``TOL_BIAS``). float32 activations (avx2, portable) keep
float32 throughout: 1e-5.

int8 activations (``act="int8"``, opt-in, AVX512-VNNI): the reference quantizes x the
way the path documents it (per row and 32 inputs, d = max|x| / 127 in float32,
round half to even) and multiplies in float64; integer sums are exact there, so
the tolerance is the exact path's. A test with activations that int8 rounds to
zero checks that the path really quantizes (the exact result is far from it).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_plugins.quantization import cpu_ext as ext

TOL_GEMV, TOL_DEQUANT, TOL_BIAS = 6e-3, 1.2e-2, 2.0**-8
SHAPES = [  # N, K, group size: 1..7 tiles (the AVX-512 path takes 4 at a time, 2 for one row), groups 32..-1
    (64, 256, 32), (96, 256, 64), (112, 512, 128), (32, 1024, 256), (16, 384, -1), (48, 96, 96), (80, 640, 128),
]


@pytest.fixture(scope="module")
def loaded():
    assert ext.load(), "the CPU int4 extension must build here (a C++ compiler is part of the set-up)"


def _weights(n, k, gs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if gs == -1 else k // gs
    u = torch.randint(0, 16, (n, k), generator=gen)
    s = (torch.rand(groups, n, generator=gen) * 0.1 + 0.01).to(torch.bfloat16).float()
    w = (u.double() - 8) * s.double().t().repeat_interleave(k // groups, dim=1)
    return u, s, w


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def test_tile_layout_contract():
    """Decode qw and sc with the module docstring's formula, independently of pack_tiles."""
    n, k, gs = 32, 384, 64
    u, s, _ = _weights(n, k, gs)
    qw, sc = ext.pack_tiles(u, s, gs)
    assert qw.dtype == torch.uint8 and qw.shape == (n // 16, k // 8, 64)
    assert sc.dtype == torch.float32 and sc.shape == (n // 16, k // gs, 16)
    q = qw.numpy().astype(np.uint32)
    words = q[..., 0::2] | (q[..., 1::2] << 8)  # [t, c, w]
    decoded = np.zeros((n, k), dtype=np.int64)
    for t in range(n // 16):
        for c in range(k // 8):
            for nn in range(16):
                for e in range(2):
                    for i in range(4):
                        decoded[16 * t + nn, 8 * c + 2 * i + e] = (words[t, c, 2 * nn + e] >> (4 * i)) & 15
    np.testing.assert_array_equal(decoded, u.numpy())
    for t in range(n // 16):
        for nn in range(16):
            np.testing.assert_array_equal(sc[t, :, nn].numpy(), s[:, 16 * t + nn].numpy())


@pytest.mark.parametrize("n, k, gs, why", [
    (24, 128, 128, "multiple of 16"), (16, 200, 40, "multiple of 32"), (16, 256, 96, "group size 96"),
    (16, 384, 256, "group size 256"), (16, 256, 16, "group size 16"),
])
def test_tile_problem_names_the_shape(n, k, gs, why):
    assert why in ext.tile_problem(n, k, gs)
    with pytest.raises(ValueError, match="int4 tile layout"):
        ext.pack_tiles(torch.zeros(n, k, dtype=torch.int32), torch.ones(max(1, k // abs(gs)), n), gs)


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


ISA_FLAGS = {"avx512bf16": {"avx512f", "avx512bw", "avx512_bf16"}, "avx2": {"avx2", "fma"}, "portable": set()}
ISA_FLAGS[ext.AVX512_NO_VBMI2] = ISA_FLAGS["avx512bf16"]
TILE_ISAS = (*ext.ISAS, ext.AVX512_NO_VBMI2)  # every path the op takes
INT8_FLAGS = {"avx512f", "avx512bw", "avx512_vnni"}


def _need(isa):
    """The ISA tests run only where the CPU has the flags (never AVX-512 code on an AVX2-only CPU)."""
    if not ISA_FLAGS[isa] <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(ISA_FLAGS[isa] - _cpu_flags())}")


def test_paths_follow_cpu_flags(loaded):
    """The library's choice comes from the CPU flags; best first; the op refuses a path the CPU lacks."""
    flags = _cpu_flags()
    expected = tuple(isa for isa in ext.ISAS if ISA_FLAGS[isa] <= flags)
    assert ext.supported_isas() == expected
    assert ext.has_fast_path() == (expected[0] != "portable")
    u, s, _ = _weights(16, 128, 128)
    qw, sc = ext.pack_tiles(u, s, 128)
    for isa in set(ext.ISAS) - set(expected):
        with pytest.raises(RuntimeError, match=f"cannot run the {isa} path"):
            ext.int4_gemm(torch.zeros(1, 128, dtype=torch.bfloat16), qw, sc, 128, isa)
    assert ext.int8_supported() == (INT8_FLAGS <= flags)
    if not ext.int8_supported():
        with pytest.raises(RuntimeError, match="cannot run int8 activations"):
            ext.int4_gemm(torch.zeros(1, 128, dtype=torch.bfloat16), qw, sc, 128, act="int8")


def test_isa_env_var_forces_and_validates(loaded, monkeypatch):
    monkeypatch.delenv(ext.ISA_ENV, raising=False)
    assert ext.selected_isa() == ext.supported_isas()[0]
    for isa in ext.supported_isas():
        monkeypatch.setenv(ext.ISA_ENV, isa)
        assert ext.selected_isa() == isa
    monkeypatch.setenv(ext.ISA_ENV, "avx9000")
    with pytest.raises(ValueError, match=f"{ext.ISA_ENV}='avx9000': expected one of avx512bf16, avx2, portable"):
        ext.selected_isa()
    monkeypatch.setenv(ext.ISA_ENV, ext.AVX512_NO_VBMI2)  # the op takes it; the layers' choice does not
    with pytest.raises(ValueError, match="expected one of"):
        ext.selected_isa()


ROWS_ALL = tuple(range(1, 34))
ROWS_SOME = (1, 2, 3, 4, 5, 7, 8, 16, 33)


@pytest.mark.parametrize("isa", TILE_ISAS)
@pytest.mark.parametrize("n, k, gs", SHAPES)
def test_int4_gemm_vs_float64(loaded, n, k, gs, isa):
    """Every path, every row count of a register block and its remainders (1..33 on two shapes)."""
    _need(isa)
    u, s, w = _weights(n, k, gs)
    qw, sc = ext.pack_tiles(u, s, gs)
    for m in ROWS_ALL if (n, k, gs) in SHAPES[:3] else ROWS_SOME:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        out = ext.int4_gemm(x, qw, sc, gs, isa)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        err = _rel_err(out, x.double() @ w.t())
        assert err <= TOL_GEMV, (m, err)


@pytest.mark.parametrize("isa", TILE_ISAS)
def test_threads_split_tiles_exactly(loaded, isa):
    """at::parallel_for splits output tiles; every output is computed by one thread the same way."""
    _need(isa)
    u, s, _ = _weights(16 * 13, 256, 64)
    qw, sc = ext.pack_tiles(u, s, 64)
    before = torch.get_num_threads()
    try:
        for m in (1, 5):
            x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            torch.set_num_threads(1)
            one = ext.int4_gemm(x, qw, sc, 64, isa)
            torch.set_num_threads(2)
            assert torch.equal(ext.int4_gemm(x, qw, sc, 64, isa), one)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ["avx2", "portable", "avx512bf16"])
def test_float32_activations_vs_float64(loaded, isa):
    """float32 x: exact float32 arithmetic on avx2/portable (avx512bf16 hands it to avx2); float32 out."""
    _need(isa)
    for n, k, gs in SHAPES[:5]:
        u, s, w = _weights(n, k, gs)
        qw, sc = ext.pack_tiles(u, s, gs)
        for m in (1, 2, 5, 9):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            out = ext.int4_gemm(x, qw, sc, gs, isa)
            assert out.dtype == torch.float32 and out.shape == (m, n)
            assert _rel_err(out, x.double() @ w.t()) <= 1e-5, (n, k, gs, m)


@pytest.mark.parametrize("isa", ext.ISAS)
@pytest.mark.parametrize("n, k, gs", SHAPES[:3])
def test_linear_both_paths_vs_float64(loaded, n, k, gs, isa):
    """``linear`` with bias, with and without leading dims: tile kernel below the crossover, dequantized GEMM from it."""
    _need(isa)
    u, s, w = _weights(n, k, gs)
    qw, sc = ext.pack_tiles(u, s, gs)
    assert torch.equal(ext.dequantize(qw, sc, gs), w.to(torch.bfloat16))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    cross = ext.dequant_min_rows(isa)
    for rows, tol in ((cross - 1, TOL_GEMV), (cross, TOL_DEQUANT)):
        if rows < 1:
            continue
        x = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        out = ext.linear(x, qw, sc, gs, bias, isa)
        assert out.shape == (1, rows, n)
        assert _rel_err(out, x.double() @ w.t() + bias.double()) <= tol + TOL_BIAS
        flat = ext.linear(x[0], qw, sc, gs, bias, isa)  # 2-D input (what vLLM passes) skips the reshapes
        assert flat.shape == (rows, n) and torch.equal(flat, out[0])


def test_vbmi2_unpack_matches_the_plain_one(loaded):
    """The VBMI2 instruction (vpshrdw, fourth nibble) gives the same bits as the seven-instruction
    unpack, on every register-block shape (rows 1..9, 1..4 tiles) and group size."""
    _need("avx512bf16")
    for n, k, gs in SHAPES:
        u, s, _ = _weights(n, k, gs, seed=5)
        qw, sc = ext.pack_tiles(u, s, gs)
        for m in range(1, 10):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            assert torch.equal(ext.int4_gemm(x, qw, sc, gs, "avx512bf16"),
                               ext.int4_gemm(x, qw, sc, gs, ext.AVX512_NO_VBMI2)), (n, k, gs, m)


def _vma_flags(t: torch.Tensor) -> list[str]:
    """VmFlags of the /proc/self/smaps mapping that holds t's first byte."""
    addr = t.data_ptr()
    for vma in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        lo, hi = (int(a, 16) for a in vma.split(" ", 1)[0].split("-"))
        if lo <= addr < hi:
            return re.search(r"^VmFlags:(.*)$", vma, re.M).group(1).split()
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_on_huge_pages_copies_and_advises(loaded):
    """The copy equals the original, starts on a 2 MiB boundary and is advised MADV_HUGEPAGE (VmFlags
    "hg") where the kernel has THP; the op runs on it; small tensors come back as they are."""
    n, k, gs = 16 * 320, 1024, 128  # 2.6 MB of nibbles
    u, s, w = _weights(n, k, gs)
    qw, sc = ext.pack_tiles(u, s, gs)
    big = ext.on_huge_pages(qw)
    assert big.data_ptr() != qw.data_ptr() and torch.equal(big, qw) and big.stride() == qw.stride()
    assert big.data_ptr() % (2 << 20) == 0
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() and Path("/proc/self/smaps").exists():
        assert "hg" in _vma_flags(big)
        total, huge = ext.huge_page_bytes([big, big])
        assert total == big.nbytes and 0 <= huge <= total
    assert ext.on_huge_pages(sc) is sc or ext.on_huge_pages(sc).data_ptr() == sc.data_ptr()
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(ext.int4_gemm(x, big, sc, gs), ext.int4_gemm(x, qw, sc, gs))
    del qw
    assert _rel_err(ext.int4_gemm(x, big, sc, gs), x.double() @ w.t()) <= TOL_GEMV


def test_stream_read_reads_every_word():
    """The bench's read reference returns the OR of every 64-bit word: one bit set anywhere shows."""
    assert ext.load()
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    assert ext.stream_read(buf) == 0
    for at in (0, 9, 4096 + 130, (1 << 16) - 1):
        buf.zero_()
        buf[at] = 0x10
        assert ext.stream_read(buf) == 0x10 << (8 * (at % 8)), at


def test_linear_under_torch_compile(loaded):
    """vLLM compiles the model on CPU by default: the op traces with a dynamic batch size."""
    n, k, gs = 64, 256, 64
    u, s, _ = _weights(n, k, gs)
    qw, sc = ext.pack_tiles(u, s, gs)
    compiled = torch.compile(lambda x: ext.linear(x, qw, sc, gs) * 2, fullgraph=True, dynamic=True)
    for rows in (1, 3, ext.dequant_min_rows(ext.selected_isa()) + 1):
        x = torch.randn(rows, k).to(torch.bfloat16)
        assert torch.equal(compiled(x), ext.linear(x, qw, sc, gs) * 2)


def test_bad_arguments_are_clear_errors(loaded):
    u, s, _ = _weights(16, 256, 64)
    qw, sc = ext.pack_tiles(u, s, 64)
    x = torch.randn(1, 256).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="x must be 2-D bfloat16 or float32"):
        ext.int4_gemm(x.half(), qw, sc, 64)
    with pytest.raises(RuntimeError, match="x has 128 inputs"):
        ext.int4_gemm(x[:, :128], qw, sc, 64)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        ext.int4_gemm(x, qw, sc, 128)
    with pytest.raises(RuntimeError, match="group size 48"):
        ext.int4_gemm(x, qw, sc, 48)
    with pytest.raises(RuntimeError, match="unknown ISA 'sse'"):
        ext.int4_gemm(x, qw, sc, 64, "sse")


def _need_int8():
    if not INT8_FLAGS <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(INT8_FLAGS - _cpu_flags())}")


def _int8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float64 ``xq * d @ w.T`` with x quantized as the int8 path documents (per row and 32 inputs)."""
    m, k = x.shape
    xf = x.float().reshape(m, k // 32, 32)
    d = xf.abs().amax(-1, keepdim=True) / 127  # float32, as in the kernel
    q = torch.where(d > 0, torch.round(xf / torch.where(d > 0, d, 1)), 0)  # torch.round: half to even
    assert q.abs().max() <= 127
    return (q.double() * d.double()).reshape(m, k) @ w.t()


@pytest.mark.parametrize("n, k, gs", SHAPES)
def test_int8_activations_vs_float64(loaded, n, k, gs):
    """act="int8": every row count of a register block (1..33 on two shapes), every group size."""
    _need_int8()
    u, s, w = _weights(n, k, gs)
    qw, sc = ext.pack_tiles(u, s, gs)
    for m in ROWS_ALL if (n, k, gs) in SHAPES[:2] else ROWS_SOME:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        x[0, :32] = 0  # a chunk of zeros: d = 0
        out = ext.int4_gemm(x, qw, sc, gs, act="int8")
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        err = _rel_err(out, _int8_reference(x, w))
        assert err <= TOL_GEMV, (m, err)


def test_int8_activations_really_quantize(loaded):
    """Per 32 inputs one activation of 15.875 (d = 1/8) and 31 below d/2: int8 rounds those to 0.
    Where the big one meets a zero weight (u = 8), the int8 result is exactly 0; the exact one is not."""
    _need_int8()
    n, k, gs = 32, 256, 64
    u, s, w = _weights(n, k, gs)
    u[:, ::32] = 8
    w[:, ::32] = 0
    qw, sc = ext.pack_tiles(u, s, gs)
    x = (torch.rand(3, k, generator=torch.Generator().manual_seed(3)) * 0.12 - 0.06).to(torch.bfloat16)
    x[:, ::32] = 15.875
    out = ext.int4_gemm(x, qw, sc, gs, act="int8")
    exact = ext.int4_gemm(x, qw, sc, gs, act="bf16")
    assert _rel_err(exact, x.double() @ w.t()) <= TOL_GEMV
    assert out.abs().max().item() == 0.0 and exact.abs().max().item() > 0.05


def test_int8_activations_threads_and_linear(loaded):
    """Threads split tiles exactly; ``linear`` passes act on below the crossover and keeps the exact
    bfloat16 GEMM from it; bad act values and float32 x are clear errors."""
    _need_int8()
    n, k, gs = 16 * 13, 256, 64
    u, s, w = _weights(n, k, gs)
    qw, sc = ext.pack_tiles(u, s, gs)
    before = torch.get_num_threads()
    try:
        for m in (1, 5):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            torch.set_num_threads(1)
            one = ext.int4_gemm(x, qw, sc, gs, act="int8")
            torch.set_num_threads(2)
            assert torch.equal(ext.int4_gemm(x, qw, sc, gs, act="int8"), one)
    finally:
        torch.set_num_threads(before)
    cross = ext.dequant_min_rows(ext.selected_isa())
    x = torch.randn(cross, k, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    assert torch.equal(ext.linear(x[:3], qw, sc, gs, act="int8"), ext.int4_gemm(x[:3], qw, sc, gs, act="int8"))
    assert torch.equal(ext.linear(x, qw, sc, gs, act="int8"), ext.linear(x, qw, sc, gs))
    with pytest.raises(RuntimeError, match="unknown activations 'int4'"):
        ext.int4_gemm(x[:1], qw, sc, gs, act="int4")
    with pytest.raises(RuntimeError, match="int8 activations take bfloat16 x"):
        ext.int4_gemm(x[:1].float(), qw, sc, gs, act="int8")
