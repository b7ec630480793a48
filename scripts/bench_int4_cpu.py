"""CPU int4 GEMM microbenchmark: the linears of one decode step, bf16 vs aten int4 vs the plugin's tile kernel.

Random weights shaped like a Llama's linears (qkv, o, gate_up, down) for
``--layers`` layers; each step runs all of them in turn, so the weights come
from memory as in decode, not from cache. Kinds:

- ``bf16``: ``F.linear`` (aten, oneDNN) on the bfloat16 weight;
- ``bf16 vLLM``: vLLM's CPU bf16 GEMM (``onednn_mm`` on a prepacked weight),
  what ``vllm serve`` runs for an unquantized checkpoint on this CPU;
- ``aten int4``: ``aten._weight_int4pack_mm_for_cpu``;
- ``tile <isa>``: the plugin's op (``cpu_ext.linear``) on each ``--isa`` path, exact
  bfloat16 activations (W4A16);
- ``tile int8``: the same op with ``act="int8"`` (opt-in ``cpu_activations: "int8"``:
  activations quantized per 32 inputs, AVX512-VNNI; W4A8 numerics), where the CPU has
  VNNI (``--int8 no`` leaves it out). Its GEMV error against float64 is printed next to the
  exact path's.

Kinds take turns within each repeat (so the load of a shared machine falls on
all of them alike) and the table shows the fastest repeat, in ms per step, and
each kind's speed-up over ``bf16 vLLM`` (``bf16`` where vLLM's op is missing).

The tile weights sit on transparent huge pages, as the layers keep them
(``cpu_ext.on_huge_pages``; ``--pages small`` leaves them on torch's 4 KiB pages); the
bench prints how much of their mappings the OS really gave as huge pages.

At 1 row it also prints this core's streaming read bandwidth and each tile
path's weight bytes per second (packed nibbles + float32 scales: every byte the
kernel reads besides the activations) as a share of it. The reference is the
fastest of six plain streaming reads over ``--stream-mib`` (far beyond the L3), on the
same threads: ``torch.sum``, ``torch.amax`` (aten's vectorized reductions) and a
plain C++ AVX-512 OR loop (``cpu_ext.stream_read``), each over a buffer on 4 KiB
pages and over one on huge pages. On this VM one core reads huge pages ~1.6x
faster, so the reference never gains from the pages the weights sit on. The
reads take turns with the kinds inside the 1-row repeats, so both see the same
machine (its bandwidth varied by 20% between minutes on the shared VM), and the
fastest pass counts, like the kinds'; the median of the per-repeat shares (kind
and reads back to back) is printed too, and the target line takes the lower.

With ``--threads N`` (N > 1) the 1-row repeats also time ``bf16 vLLM`` and the tile
paths on one thread, and the thread line compares the tile kernel's speed-up over
``bf16 vLLM`` at N threads with the one at 1 thread (target: within 10%).

    python scripts/bench_int4_cpu.py [--threads 1] [--isa avx512bf16,avx2] [--rows 1,2,4,8,16,32] [--pages huge]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vllm_onednn():
    """vLLM's CPU bf16 GEMM (create_onednn_mm / onednn_mm), or None where this build lacks it."""
    try:
        from vllm import _custom_ops as ops
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        if not (getattr(ops, "_supports_onednn", False) and hasattr(torch.ops._C, "onednn_mm")):
            return None
    except (ImportError, AttributeError, RuntimeError):
        return None
    return ops


def build(hidden: int, intermediate: int, layers: int, group_size: int, ops, huge: bool):
    from vllm_plugins.quantization import cpu_ext
    from vllm_plugins.quantization.cpu_int4 import pack_for_cpu

    shapes = [(3 * hidden, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate)]
    gen = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(layers):
        for n, k in shapes:
            u = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
            s = (torch.rand(k // group_size, n, generator=gen) * 0.01).to(torch.bfloat16)
            packed, g, sz = pack_for_cpu(u, s, group_size, torch.bfloat16)
            qw, sc = cpu_ext.pack_tiles(u, s.float(), group_size)
            if huge:  # as TileInt4CPULinearKernel keeps them
                qw, sc = cpu_ext.on_huge_pages(qw), cpu_ext.on_huge_pages(sc)
            bf16 = ((u - 8).to(torch.bfloat16) * 0.01).contiguous()
            w = {"k": k, "bf16": bf16, "aten": (packed, g, sz), "tile": (qw, sc)}
            if ops is not None:
                w["onednn"] = ops.create_onednn_mm(bf16.t(), 32)
            weights.append(w)
    return weights


def step(weights, xs, kind: str, group_size: int, ops) -> None:
    from vllm_plugins.quantization import cpu_ext

    for w in weights:
        x = xs[w["k"]]
        if kind == "bf16":
            torch.nn.functional.linear(x, w["bf16"])
        elif kind == "bf16 vLLM":
            ops.onednn_mm(w["onednn"], x, None)
        elif kind == "aten int4":
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, *w["aten"])
        elif kind == "tile int8":
            cpu_ext.linear(x, *w["tile"], group_size, act="int8")
        else:
            cpu_ext.linear(x, *w["tile"], group_size, isa=kind.split()[-1])


READERS = {"sum": torch.sum, "amax": torch.amax, "C++ AVX-512": None}  # None: cpu_ext.stream_read


def stream_reads(bufs: dict) -> dict:
    """Seconds of one plain streaming read of each buffer by each reader, keyed "reader, pages"."""
    from vllm_plugins.quantization import cpu_ext

    took = {}
    for pages, buf in bufs.items():
        for name, reduce in READERS.items():
            t0 = time.perf_counter()
            reduce(buf) if reduce is not None else cpu_ext.stream_read(buf)
            took[f"{name}, {pages}"] = time.perf_counter() - t0
    return took


def pages_line(what: str, tensors) -> str:
    from vllm_plugins.quantization import cpu_ext

    total, huge = cpu_ext.huge_page_bytes(tensors)
    return f"{what}: {huge / 2**20:.0f} of {total / 2**20:.0f} MiB on huge pages"


def print_int8_error(weights, group_size: int, isa: str) -> None:
    """GEMV error of the exact and the int8-activation path on one layer's linears, against the
    portable path on float32 x (float32 arithmetic on the same bfloat16 activations: exact to ~1e-7)."""
    from vllm_plugins.quantization import cpu_ext

    gen = torch.Generator().manual_seed(1)
    errs = {"exact": [], "int8": []}
    for w in weights:
        qw, sc = w["tile"]
        x = torch.randn(1, w["k"], generator=gen).to(torch.bfloat16)
        ref = cpu_ext.int4_gemm(x.float(), qw, sc, group_size, "portable").double()
        for name, act, path in (("exact", "bf16", isa), ("int8", "int8", None)):
            out = cpu_ext.int4_gemm(x, qw, sc, group_size, path, act).double()
            errs[name].append(((out - ref).norm() / ref.norm()).item())
    print("GEMV relative error (||out - ref|| / ||ref||, one layer's linears, x ~ N(0, 1), bfloat16 out): "
          + ", ".join(f"{name} {sum(e) / len(e):.2e}" for name, e in errs.items()))


def main() -> int:
    from vllm_plugins.quantization import cpu_ext

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (vLLM's CPU engine uses one here)")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rows", default="1,2,4,8,16,32", help="batch sizes (activation rows)")
    p.add_argument("--isa", default=None,
                   help=f"tile kernel paths, comma-separated, of {', '.join(cpu_ext.ISAS)} "
                        f"(default: the one the layers run, ${cpu_ext.ISA_ENV} or the best)")
    p.add_argument("--int8", choices=("auto", "no"), default="auto",
                   help="auto: add the int8-activation path where the CPU has AVX512-VNNI")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--stream-mib", type=int, default=512,
                   help="each of the two read buffers (4 KiB pages, huge pages), MiB (0: skip)")
    p.add_argument("--pages", choices=("huge", "small"), default="huge",
                   help="tile weights on transparent huge pages (as the layers keep them) or torch's own pages")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_ext.load():
        print("the CPU int4 extension did not build; see the warning above")
        return 1
    isas = args.isa.split(",") if args.isa else [cpu_ext.selected_isa()]
    for isa in isas:
        if not cpu_ext.isa_supported(isa):
            print(f"--isa {isa}: this CPU cannot run that path (it runs {', '.join(cpu_ext.supported_isas())})")
            return 2
    ops = vllm_onednn()
    weights = build(args.hidden, args.intermediate, args.layers, args.group_size, ops, args.pages == "huge")
    n_params = sum(w["bf16"].numel() for w in weights)
    tile_bytes = sum(w["tile"][0].numel() + w["tile"][1].numel() * 4 for w in weights)
    base = "bf16 vLLM" if ops is not None else "bf16"
    with_int8 = args.int8 == "auto" and cpu_ext.int8_supported()
    tiles = [f"tile {isa}" for isa in isas] + (["tile int8"] if with_int8 else [])
    kinds = ["bf16", *([base] if ops is not None else []), "aten int4", *tiles]
    print(f"\nLinears of one step: {n_params / 1e6:.0f}M weights ({args.layers} layers, hidden {args.hidden}, "
          f"intermediate {args.intermediate}), group {args.group_size}, {args.threads} thread(s); "
          f"fastest of {args.repeats}, ms per step; speed-up = {base} time / kind time")
    print(pages_line(f"tile weights and scales (--pages {args.pages})", [t for w in weights for t in w["tile"]]))
    print("| rows | " + " | ".join(kinds) + " | " + " | ".join(f"{k} vs {base}" for k in kinds if k != base) + " |")
    print("|---" * (2 * len(kinds)) + "|")
    one_row = {}
    bufs = {}
    if args.stream_mib:
        small = torch.ones(args.stream_mib * 2**20 // 4, dtype=torch.float32)
        bufs = {"4 KiB pages": small, "huge pages": cpu_ext.on_huge_pages(small)}
    one_thread = [base, *tiles] if args.threads > 1 else []  # also timed on 1 thread at 1 row
    passes = {}  # 1 row: seconds of each repeat, per kind (and "kind @1") and per read
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in (args.hidden, args.intermediate)}
        best = {kind: float("inf") for kind in kinds}
        for kind in kinds:
            step(weights, xs, kind, args.group_size, ops)  # warm-up
        for _ in range(args.repeats):
            for kind in kinds:
                t0 = time.perf_counter()
                step(weights, xs, kind, args.group_size, ops)
                took = time.perf_counter() - t0
                best[kind] = min(best[kind], took)
                if rows == 1:
                    passes.setdefault(kind, []).append(took)
            if rows == 1:
                for name, took in stream_reads(bufs).items():
                    passes.setdefault(name, []).append(took)
                if one_thread:
                    torch.set_num_threads(1)
                    for kind in one_thread:
                        t0 = time.perf_counter()
                        step(weights, xs, kind, args.group_size, ops)
                        passes.setdefault(f"{kind} @1", []).append(time.perf_counter() - t0)
                    torch.set_num_threads(args.threads)
        if rows == 1:
            one_row = best
        print(f"| {rows} | " + " | ".join(f"{best[k] * 1e3:.1f}" for k in kinds) + " | "
              + " | ".join(f"{best[base] / best[k]:.2f}x" for k in kinds if k != base) + " |")
    if one_row and bufs:
        stream_bytes = args.stream_mib * 2**20
        print(f"\nStreaming reads, {args.threads} thread(s), {args.stream_mib} MiB float32 each (fastest pass):")
        print(pages_line("  read buffers", bufs.values()))
        reads = [f"{name}, {pages}" for pages in bufs for name in READERS]
        for name in reads:
            print(f"  {name}: {stream_bytes / min(passes[name]) / 1e9:.1f} GB/s")
        bw = max(stream_bytes / min(passes[name]) for name in reads)
        per_repeat = [max(stream_bytes / t for t in ts) for ts in zip(*(passes[name] for name in reads))]
        print(f"Reference (the fastest of them): {bw / 1e9:.1f} GB/s")
        for kind in tiles:
            got = tile_bytes / one_row[kind]
            # The same share per repeat (kind and reads back to back), median: less moved by the
            # machine's bandwidth swings than the ratio of two fastest passes.
            paired = statistics.median(tile_bytes / t / r for t, r in zip(passes[kind], per_repeat))
            print(f"{kind} at 1 row: {tile_bytes / 1e6:.0f} MB of weights+scales per step, "
                  f"{got / 1e9:.1f} GB/s = {100 * got / bw:.0f}% of the streaming read "
                  f"(fastest passes); median of the per-repeat shares {100 * paired:.0f}%")
            if kind in ("tile avx512bf16", "tile int8"):
                share = min(got / bw, paired)
                print(f"target {kind} >= 90% of the streaming read at 1 row (lower of the two): {100 * share:.0f}% "
                      f"({'met' if share >= 0.9 else 'NOT met'})")
    for kind in tiles if one_thread else []:
        at_n = min(passes[base]) / min(passes[kind])
        at_1 = min(passes[f"{base} @1"]) / min(passes[f"{kind} @1"])
        print(f"threads: {kind} at 1 row {at_n:.2f}x {base} at {args.threads} threads, {at_1:.2f}x at 1 thread "
              f"(same run): {100 * (at_n / at_1 - 1):+.0f}%; target within 10% "
              f"({'met' if at_n >= 0.9 * at_1 else 'NOT met'})")
    if "tile int8" in tiles:
        print_int8_error(weights[:4], args.group_size, isas[0])
    if one_row and "avx2" in isas:
        got, aten = one_row[base] / one_row["tile avx2"], one_row[base] / one_row["aten int4"]
        ok = got >= 2.5 and got > aten
        print(f"target tile avx2 >= 2.5x {base} at 1 row and above aten int4 ({aten:.2f}x): {got:.2f}x "
              f"({'met' if ok else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
