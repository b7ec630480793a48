"""The plugin's compiled CPU W4A16 GEMM (``csrc/``): build, load, pack, choose the ISA path, call.

One tile layout, three paths in one library (``csrc/int4_kernels.h``):
``avx512bf16`` (vdpbf16ps, bfloat16 activations), ``avx2`` (AVX2 + FMA, float32
arithmetic, bfloat16 or float32 activations) and ``portable`` (plain C++, the
reference). Each path is compiled with per-function target attributes and
runs only where the CPU reports its flags: :func:`selected_isa` takes the best
one, or the one ``VLLM_PLUGINS_INT4_ISA`` names (``avx512bf16``, ``avx2``,
``portable``; for tests and benchmarks on a machine that has more).
:mod:`.cpu_int4` uses the op where ``avx512bf16`` or ``avx2`` runs, and
PyTorch's int4 kernel elsewhere.

Opt-in, ``act="int8"`` (the plugin config's ``cpu_activations: "int8"``): the
activations are quantized per row and 32 inputs (d = max|x| / 127, round half to
even, as llama.cpp's Q8_0) and the AVX512-VNNI path (``vpdpbusd``, unsigned
nibbles x int8) runs on the same layout: W4A8 numerics; at one row both paths
run near the read bandwidth, from 4 rows on this one is 1.2-1.6x faster
(``scripts/bench_int4_cpu.py``). :func:`int8_supported` says whether the CPU has it.

The sources are compiled on first use with the system C++ compiler (``$CXX``
or ``c++``), against the installed torch, into a cache folder keyed by the
sources, torch and compiler (``$VLLM_PLUGINS_CACHE`` or
``~/.cache/vllm_plugins``). ``scripts/setup.sh`` builds it once up front.
Where no compiler is found or the build fails, :func:`load` says why once and
returns False; W4A16 then keeps PyTorch's int4 kernel.

Tile layout (the contract :func:`pack_tiles` builds and the C++ reads; see
``csrc/int4_kernels.h``): for stored nibbles ``u[N, K]`` (``q + 8``),
``N % 16 == 0``, ``K % 32 == 0``, groups of a multiple of 32 inputs::

    qw[t, c, 2*w : 2*w+2]  = little-endian uint16 word w = 2*n + e, whose nibble i is
                             u[16*t + n, 8*c + 2*i + e]        (n < 16, e < 2, i < 4)
    sc[t, g, n]            = float32 scale of output 16*t + n, group g

Outputs lie in vector lanes and input pairs in 32-bit lanes, so a group scale
costs one vector multiply per 16 outputs and an activation pair is broadcast.

Pages: at one activation row the kernel streams each tile's weights at the
rate one core reads memory. The hardware prefetchers stop at page boundaries,
and on 4 KiB pages a tile's stream crosses one every 64 blocks, so the layers
keep their packed weights on transparent huge pages (:func:`on_huge_pages`:
2 MiB aligned, ``MADV_HUGEPAGE``; THP ``madvise`` or ``always`` in
``/sys/kernel/mm/transparent_hugepage/enabled``). Here one core read a 4 KiB-page
buffer at 19-28 GB/s with one stream and a huge-page one at 30-33 GB/s; the
kernel's one-row pass rose by ~28% (19.7 to 25.3 GB/s, ``scripts/bench_int4_cpu.py --pages``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from vllm.logger import init_logger

logger = init_logger("vllm.plugins.vllm_plugins.cpu_ext")

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(CSRC / name for name in ("int4_ops.cpp", "int4_avx512.cpp", "int4_avx2.cpp", "int4_vnni.cpp"))
HEADERS = (CSRC / "int4_kernels.h",)
ISAS = ("avx512bf16", "avx2", "portable")  # best first
# The avx512bf16 path without its one AVX512-VBMI2 instruction, as AVX512-BF16 CPUs
# without VBMI2 (Cooper Lake) run it; "avx512bf16" takes VBMI2 where the CPU has it.
# For the tests (both must agree bit for bit); never chosen by selected_isa.
AVX512_NO_VBMI2 = "avx512bf16_novbmi2"
ISA_ENV = "VLLM_PLUGINS_INT4_ISA"
ACTIVATIONS = ("bf16", "int8")  # bf16: exact (W4A16, the default); int8: per-32 dynamic int8, AVX512-VNNI (opt-in)
TILE, BLOCK_K = 16, 8  # outputs per tile, inputs per 64-byte block
LIB_NAME = "vllm_plugins_cpu"
# Per path: from this many activation rows on, dequantizing to bfloat16 (plain
# C++) and running aten's bfloat16 GEMM beats the tile kernel. From
# scripts/bench_int4_cpu.py, one thread, 0.5B shapes: the AVX-512 tile kernel
# costs about 14 ms per row and step, the dequantization about 1.6 s plus
# about 5 ms per row (loaded machine), so the crossover is near 170 rows; the
# AVX2 path is taken to cross at the same place (not measured on an AVX2 CPU).
DEQUANT_MIN_ROWS = {"avx512bf16": 128, "avx2": 128, "portable": 1}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def library_path(cxx: str) -> Path:
    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.read_bytes())
    key.update(torch.__version__.encode())
    key.update(str(Path(torch.__file__).parent).encode())
    key.update(cxx.encode())
    root = Path(os.environ.get("VLLM_PLUGINS_CACHE") or Path.home() / ".cache" / "vllm_plugins")
    return root / f"{LIB_NAME}-{key.hexdigest()[:16]}.so"


def build(verbose: bool = False) -> Path:
    """Compile the library unless the cache has it; returns its path.

    Writes to a temporary file and renames it, so tensor-parallel ranks that
    build at once never load a half-written library."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++)")
    out = library_path(cxx)
    if out.exists():
        return out
    from torch.utils import cpp_extension

    out.parent.mkdir(parents=True, exist_ok=True)
    torch_lib = Path(torch.__file__).parent / "lib"
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-I{p}" for p in cpp_extension.include_paths()),
           *(str(src) for src in SOURCES), "-o", tmp,
           f"-L{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {', '.join(src.name for src in SOURCES)} failed:\n{done.stderr[-4000:]}")
        if verbose:
            print(" ".join(cmd))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def load() -> bool:
    """Build (if needed) and load the op library once per process."""
    if hasattr(torch.ops, "vllm_plugins_cpu") and hasattr(torch.ops.vllm_plugins_cpu, "int4_gemm"):
        return True
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError) as exc:
        logger.warning("CPU int4 GEMM extension unavailable, W4A16 keeps aten's int4 kernel: %s", exc)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (vLLM compiles the model on CPU)."""

    @torch.library.register_fake("vllm_plugins_cpu::int4_gemm")
    def _gemm(x, qw, sc, group_size, isa="auto", act="bf16"):
        return x.new_empty((x.shape[0], qw.shape[0] * TILE))

    @torch.library.register_fake("vllm_plugins_cpu::int4_linear")
    def _linear(x, qw, sc, group_size, dequant_min_rows, isa="auto", act="bf16"):
        return x.new_empty((x.shape[0], qw.shape[0] * TILE))

    @torch.library.register_fake("vllm_plugins_cpu::int4_dequant")
    def _dequant(qw, sc, group_size):
        return qw.new_empty((qw.shape[0] * TILE, qw.shape[1] * BLOCK_K), dtype=torch.bfloat16)


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The paths this CPU runs, best first (asked of the library once: CPU flags); () without the library."""
    if not load():
        return ()
    return tuple(isa for isa in ISAS if torch.ops.vllm_plugins_cpu.int4_isa_supported(isa))


def isa_supported(isa: str) -> bool:
    """Whether this CPU can run the ``isa`` path (False where the library is missing)."""
    return isa in supported_isas()


@torch.compiler.assume_constant_result  # torch.compile reads it once, at trace time
def selected_isa() -> str:
    """The path the layers run: ``$VLLM_PLUGINS_INT4_ISA`` if set, else the best this CPU runs.

    A forced path the CPU cannot run is an error naming the variable, never AVX-512 code on a
    CPU without it."""
    forced = os.environ.get(ISA_ENV, "").strip()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"{ISA_ENV}={forced!r}: expected one of {', '.join(ISAS)}")
        if not isa_supported(forced):
            raise ValueError(f"{ISA_ENV}={forced}: this CPU (or a missing extension) cannot run that path")
        return forced
    return (supported_isas() or ISAS[-1:])[0]


@functools.cache
def int8_supported() -> bool:
    """Whether this CPU runs the int8-activation path (AVX512-VNNI; False where the library is missing)."""
    return load() and bool(torch.ops.vllm_plugins_cpu.int4_int8_supported())


def has_fast_path() -> bool:
    """Whether a vectorized path (AVX512-BF16 or AVX2) runs here (False where the library is missing)."""
    return load() and selected_isa() != "portable"


def dequant_min_rows(isa: str) -> int:
    """From this many activation rows on, :func:`linear` dequantizes and runs a GEMM (see DEQUANT_MIN_ROWS)."""
    return DEQUANT_MIN_ROWS[isa]


def tile_problem(n: int, k: int, group_size: int) -> str | None:
    """Why the tile layout cannot hold an ``[N, K]`` weight in ``group_size`` groups, or None."""
    gs = k if group_size == -1 else group_size
    if n % TILE:
        return f"output size {n} is not a multiple of {TILE}"
    if k % 32:
        return f"input size {k} is not a multiple of 32"
    if gs % 32 or k % gs:
        return f"group size {group_size} is not a multiple of 32 dividing {k}"
    return None


def pack_tiles(u: torch.Tensor, scales_gn: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``u``: nibbles ``q + 8`` as integers ``[N, K]``; ``scales_gn``: ``[groups, N]``.

    Returns ``(qw, sc)`` in the tile layout of the module docstring."""
    n, k = u.shape
    problem = tile_problem(n, k, group_size)
    if problem is not None:
        raise ValueError(f"int4 tile layout: {problem}")
    groups = k // (k if group_size == -1 else group_size)
    if scales_gn.shape != (groups, n):
        raise ValueError(f"scales shape {tuple(scales_gn.shape)} is not ({groups}, {n})")
    u = u.to(torch.int32).reshape(n // TILE, TILE, k // BLOCK_K, 4, 2).permute(0, 2, 1, 4, 3)  # t c n e i
    words = (u << torch.tensor([0, 4, 8, 12], dtype=torch.int32)).sum(-1)  # [t, c, n, e] = word 2n + e
    qw = torch.stack([words & 0xFF, words >> 8], dim=-1).to(torch.uint8).reshape(n // TILE, k // BLOCK_K, 64)
    sc = scales_gn.to(torch.float32).t().reshape(n // TILE, TILE, groups).transpose(1, 2).contiguous()
    return qw.contiguous(), sc


def int4_gemm(x: torch.Tensor, qw: torch.Tensor, sc: torch.Tensor, group_size: int,
              isa: str | None = None, act: str = "bf16") -> torch.Tensor:
    """``x [M, K]`` (bfloat16, or float32 on the avx2/portable paths) times the packed weight;
    ``[M, N]`` in x's dtype. ``isa``: a path of :data:`ISAS` (default :func:`selected_isa`).
    ``act="int8"`` quantizes bfloat16 x per 32 inputs and runs the AVX512-VNNI path instead."""
    return torch.ops.vllm_plugins_cpu.int4_gemm(x, qw, sc, group_size, isa or selected_isa(), act)


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on transparent huge pages where the OS gives them (2 MiB aligned,
    ``MADV_HUGEPAGE``), else on ordinary pages; tensors under 2 MiB as they are. For the
    packed weights, at load time (see the module docstring)."""
    return torch.ops.vllm_plugins_cpu.int4_huge_pages(t)


def huge_page_bytes(tensors) -> tuple[int, int]:
    """``(bytes, huge)``: the bytes of ``tensors`` (each counted once) and how many of them lie on
    transparent huge pages, from ``AnonHugePages`` in ``/proc/self/smaps``: per mapping, the smaller
    of its huge bytes and its overlap with the tensors (exact where a mapping holds only them).
    ``(bytes, 0)`` where that file is missing."""
    spans = sorted({(t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors})
    total = sum(b - a for a, b in spans)
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return total, 0
    huge = 0
    for vma in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        lo, hi = (int(a, 16) for a in vma.split(" ", 1)[0].split("-"))
        overlap = sum(max(0, min(b, hi) - max(a, lo)) for a, b in spans)
        found = re.search(r"^AnonHugePages:\s+(\d+) kB", vma, re.M)
        if overlap and found:
            huge += min(overlap, int(found.group(1)) * 1024)
    return total, huge


def stream_read(buf: torch.Tensor) -> int:
    """A plain streaming read of every byte of ``buf`` (512-bit loads in four chains where the
    CPU has AVX512F); returns the OR of its 64-bit words. The bench's read reference."""
    return torch.ops.vllm_plugins_cpu.int4_stream_read(buf)


def dequantize(qw: torch.Tensor, sc: torch.Tensor, group_size: int) -> torch.Tensor:
    """The bfloat16 weight ``[N, K]`` of a packed one."""
    return torch.ops.vllm_plugins_cpu.int4_dequant(qw, sc, group_size)


def linear(x: torch.Tensor, qw: torch.Tensor, sc: torch.Tensor, group_size: int,
           bias: torch.Tensor | None = None, isa: str | None = None, act: str = "bf16") -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x [..., K]``: the tile kernel below :func:`dequant_min_rows`
    rows (with ``act`` activations), a bfloat16 GEMM on the dequantized weight from there on."""
    isa = isa or selected_isa()
    flat = x.dim() != 2  # vLLM passes [tokens, K]: no reshapes then (each costs about 1 us per call)
    x2 = x.reshape(-1, x.shape[-1]) if flat else x
    out = torch.ops.vllm_plugins_cpu.int4_linear(x2, qw, sc, group_size, dequant_min_rows(isa), isa, act)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1]) if flat else out


if __name__ == "__main__":
    if not load():
        raise SystemExit("[setup] CPU int4 GEMM extension unavailable; W4A16 on CPU uses aten's int4 kernel")
    print(f"[setup] CPU int4 GEMM extension: {build()} "
          f"(path: {selected_isa()}{'' if has_fast_path() else ', so aten int4 serves W4A16'})")
