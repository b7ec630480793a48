"""Where does the W8A8-vs-bf16 decode ratio vary: within a process, between processes, by core binding, by oneDNN's kernel?

Runs ``--processes`` fresh child processes for each ``--bind`` setting. Each
child builds the linears of ``--layers`` layers of the ~0.5B Llama of
``bench_decode.py`` (random weights, same seed), exactly as vLLM's CPU path
runs them at batch 1: bf16 through ``onednn_mm`` on a prepacked weight, W8A8
through ``onednn_scaled_int8_quant`` (dynamic per-token) + ``onednn_scaled_mm``
(per-channel int8 weights) -- and times one step of each, alternating, for
``--repeats`` rounds. ``ONEDNN_VERBOSE=profile_create`` records which oneDNN
implementation each process picked for each op.

The table shows, per process: bf16 and W8A8 median ms per step, the ratio of
the medians, the spread of the per-round ratio inside the process, and the
oneDNN implementations. The summary compares the ratio's spread within
processes with its spread between processes and between bindings.

    python scripts/bench_w8a8_variance.py [--processes 5] [--bind none,0,1] [--layers 8] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(args) -> int:
    import torch

    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    torch.set_num_threads(1)
    if args.bind != "none":
        os.sched_setaffinity(0, {int(args.bind)})
    h, inter = args.hidden, args.intermediate
    shapes = [(3 * h, h), (h, h), (2 * inter, h), (h, inter)]
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(args.layers):
        for n, k in shapes:
            w_int8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            w_scale = (torch.rand(n, 1, generator=gen) * 1e-3 + 1e-4).float()
            bf16 = (w_int8.float() * w_scale).to(torch.bfloat16)
            layers.append({
                "k": k, "n": n,
                "bf16": ops.create_onednn_mm(bf16.t(), 32),
                "w8a8": ops.create_onednn_scaled_mm(w_int8.t(), w_scale, torch.bfloat16, True, False, 32),
            })
    xs = {k: torch.randn(1, k).to(torch.bfloat16) for k in (h, inter)}

    def step(kind: str) -> float:
        t0 = time.perf_counter()
        for layer in layers:
            x = xs[layer["k"]]
            if kind == "bf16":
                ops.onednn_mm(layer["bf16"], x, None)
            else:
                x_q, x_s, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
                out = torch.empty((1, layer["n"]), dtype=x.dtype)
                ops.onednn_scaled_mm(layer["w8a8"], x_q, out, x_s, None, None, None)
        return time.perf_counter() - t0

    step("bf16"), step("w8a8")  # warm-up: creates the primitives
    times = {"bf16": [], "w8a8": []}
    for _ in range(args.repeats):
        for kind in times:
            times[kind].append(step(kind))
    print("RESULT " + json.dumps({**times, "cpu": os.sched_getaffinity(0).__repr__()}), flush=True)
    return 0


def impls(log: str) -> str:
    """oneDNN implementation names from ONEDNN_VERBOSE=profile_create lines."""
    found = set()
    for line in log.splitlines():
        parts = line.split(",")
        if line.startswith("onednn_verbose") and "create" in line and len(parts) > 6:
            found.add(parts[6] if parts[4] == "cpu" else parts[5])
    return " ".join(sorted(found)) or "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--bind", default="none,0,1", help="per group: 'none' or a core id for the child")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    rows = []
    for bind in args.bind.split(","):
        for i in range(args.processes):
            cmd = [sys.executable, __file__, "--child", "--bind", bind, "--layers", str(args.layers),
                   "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                   "--repeats", str(args.repeats)]
            env = {**os.environ, "ONEDNN_VERBOSE": "profile_create", "OMP_NUM_THREADS": "1"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                print(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
                return 1
            res = json.loads(line[len("RESULT "):])
            per_round = [b / w for b, w in zip(res["bf16"], res["w8a8"])]
            rows.append({"bind": bind, "proc": i, "bf16": statistics.median(res["bf16"]) * 1e3,
                         "w8a8": statistics.median(res["w8a8"]) * 1e3, "rounds": per_round,
                         "impl": impls(done.stdout)})
            r = rows[-1]
            print(f"[w8a8-variance] bind {bind} process {i}: ratio {r['bf16'] / r['w8a8']:.2f}x", flush=True)

    print(f"\nbf16 (onednn_mm) vs W8A8 (onednn int8 quant + scaled_mm) at batch 1, linears of {args.layers} layers "
          f"(hidden {args.hidden}, intermediate {args.intermediate}), one thread, {args.repeats} alternating rounds "
          f"per process; ms per step = median")
    print("| bind | process | bf16 ms | W8A8 ms | ratio | per-round ratio min-max | oneDNN implementations |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bind']} | {r['proc']} | {r['bf16']:.1f} | {r['w8a8']:.1f} | {r['bf16'] / r['w8a8']:.2f}x | "
              f"{min(r['rounds']):.2f}-{max(r['rounds']):.2f} | {r['impl']} |")
    within = statistics.mean(statistics.stdev(r["rounds"]) for r in rows)
    ratios = [r["bf16"] / r["w8a8"] for r in rows]
    print(f"\nratio sd within a process (mean over processes): {within:.3f}; "
          f"between processes (all): {statistics.stdev(ratios):.3f}")
    for bind in args.bind.split(","):
        group = [r["bf16"] / r["w8a8"] for r in rows if r["bind"] == bind]
        print(f"bind {bind}: ratio mean {statistics.mean(group):.2f}x, sd between processes "
              f"{statistics.stdev(group) if len(group) > 1 else 0:.3f}")
    print(f"distinct oneDNN implementation sets: {len({r['impl'] for r in rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
