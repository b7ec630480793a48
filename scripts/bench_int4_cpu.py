"""CPU int4 GEMM microbenchmark: the linears of one decode step, bf16 vs aten int4 vs the plugin's tile GEMV.

Random weights shaped like a Llama's linears (qkv, o, gate_up, down) for
``--layers`` layers; each step runs all of them in turn, so the weights come
from memory as in decode, not from cache. Prints the median time per step and
the ratio to bf16 (oneDNN through ``F.linear``) for each batch size.

    python scripts/bench_int4_cpu.py [--threads 1] [--hidden 1536 --intermediate 4096 --layers 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(hidden: int, intermediate: int, layers: int, group_size: int):
    from vllm_plugins.quantization import cpu_ext
    from vllm_plugins.quantization.cpu_int4 import pack_for_cpu

    shapes = [(3 * hidden, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate)]
    gen = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(layers):
        for n, k in shapes:
            u = torch.randint(0, 16, (n, k), generator=gen)
            s = (torch.rand(k // group_size, n, generator=gen) * 0.01).to(torch.bfloat16)
            packed, g, sz = pack_for_cpu(u, s, group_size, torch.bfloat16)
            qw, sc = cpu_ext.pack_tiles(u, s.float(), group_size)
            bf16 = ((u - 8).to(torch.bfloat16) * 0.01).contiguous()
            weights.append({"k": k, "bf16": bf16, "aten": (packed, g, sz), "tile": (qw, sc)})
    return weights


def step(weights, xs, kind: str, group_size: int) -> None:
    from vllm_plugins.quantization import cpu_ext

    for w in weights:
        x = xs[w["k"]]
        if kind == "bf16":
            torch.nn.functional.linear(x, w["bf16"])
        elif kind == "aten int4":
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, *w["aten"])
        else:
            cpu_ext.linear(x, *w["tile"], group_size)


def main() -> int:
    from vllm_plugins.quantization import cpu_ext

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (vLLM's CPU engine uses one here)")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rows", default="1,2,4,16,32,128", help="batch sizes (activation rows)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_ext.load():
        print("the CPU int4 extension did not build; see the warning above")
        return 1
    weights = build(args.hidden, args.intermediate, args.layers, args.group_size)
    n_params = sum(w["bf16"].numel() for w in weights)
    kinds = ["bf16", "aten int4", "tile int4"]
    print(f"\nLinears of one step: {n_params / 1e6:.0f}M weights ({args.layers} layers, hidden {args.hidden}, "
          f"intermediate {args.intermediate}), group {args.group_size}, {args.threads} thread(s), "
          f"tile AVX512-BF16 path: {'yes' if cpu_ext.has_fast_path() else 'no (portable C++)'}; "
          f"median of {args.repeats}, ms per step")
    print("| rows | " + " | ".join(kinds) + " | aten vs bf16 | tile vs bf16 | tile vs aten |")
    print("|---" * (len(kinds) + 4) + "|")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in (args.hidden, args.intermediate)}
        ms = {}
        for kind in kinds:
            step(weights, xs, kind, args.group_size)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step(weights, xs, kind, args.group_size)
                times.append(time.perf_counter() - t0)
            ms[kind] = statistics.median(times) * 1e3
        print(f"| {rows} | " + " | ".join(f"{ms[k]:.1f}" for k in kinds)
              + f" | {ms['bf16'] / ms['aten int4']:.2f}x | {ms['bf16'] / ms['tile int4']:.2f}x"
              f" | {ms['aten int4'] / ms['tile int4']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
