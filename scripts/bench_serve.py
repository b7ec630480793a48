"""Serving throughput of bf16 vs W4A16 vs W8A8 ``native`` exports, measured by vLLM's own ``vllm bench serve``.

Builds (or reuses) the random ~0.5B Llama of ``bench_decode.py`` and its RTN
exports, serves each checkpoint in turn with ``vllm serve`` (vLLM's CPU
defaults: ``torch.compile``, auto thread binding) and runs ``vllm bench serve``
against it: random dataset, fixed input and output lengths (``--ignore-eos``),
at each ``--concurrency``. Prints output tokens/s per checkpoint and
concurrency and the ratio to bf16; the raw JSON results are kept in ``--work``.

    python scripts/bench_serve.py [--work runs/bench-decode] [--concurrency 1,4,16]
        [--input-len 128 --output-len 128 --prompts-per-client 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_decode import add_model_args, build_model, export  # noqa: E402  (the same model and exports)


def bench_serve(server, ckpt: Path, concurrency: int, args, out_dir: Path) -> dict:
    """One ``vllm bench serve`` run against a running server; its saved JSON result."""
    from vllm_plugins.serving import vllm_executable

    name = f"{ckpt.name}-c{concurrency}.json"
    cmd = [vllm_executable(), "bench", "serve", "--backend", "vllm", "--base-url", server.base_url,
           "--model", server.model, "--tokenizer", str(ckpt), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(concurrency * args.prompts_per_client), "--max-concurrency", str(concurrency),
           "--ignore-eos", "--seed", "0", "--disable-tqdm",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((out_dir / name).read_text())


def main() -> int:
    from vllm_plugins.serving import VllmServer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-per-client", type=int, default=4, help="num-prompts = concurrency x this")
    p.add_argument("--schemes", default="bf16,w4a16,w8a8")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for one vllm bench serve run")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    src = build_model(args.work, args.layers, args.hidden, args.intermediate)
    ckpts = {s: (src if s == "bf16" else export(src, s)) for s in args.schemes.split(",")}
    out_dir = args.work / "bench-serve"
    out_dir.mkdir(exist_ok=True)

    tput: dict[str, dict[int, float]] = {}
    for scheme, ckpt in ckpts.items():
        serve_args = ["--dtype", "bfloat16", "--max-model-len", str(2 * (args.input_len + args.output_len)),
                      "--max-num-seqs", str(max(levels))]
        t0 = time.perf_counter()
        with VllmServer(ckpt, *serve_args) as server:
            print(f"[bench_serve] {scheme}: server up in {time.perf_counter() - t0:.0f} s", flush=True)
            tput[scheme] = {}
            for c in levels:
                result = bench_serve(server, ckpt, c, args, out_dir)
                tput[scheme][c] = result["output_throughput"]
                print(f"[bench_serve] {scheme} concurrency {c}: {tput[scheme][c]:.1f} output tok/s", flush=True)

    print(f"\nOutput tokens/s, `vllm bench serve` random dataset, input {args.input_len}, output "
          f"{args.output_len} tokens (ignore EOS), {args.prompts_per_client} prompts per client, "
          f"{os.cpu_count()} CPUs, vLLM CPU defaults (torch.compile, auto binding)")
    print("| checkpoint | " + " | ".join(f"c={c} tok/s | vs bf16" for c in levels) + " |")
    print("|---|" + "---|---|" * len(levels))
    for scheme, rates in tput.items():
        cells = [scheme]
        for c in levels:
            base = tput.get("bf16", {}).get(c)
            cells += [f"{rates[c]:.1f}", f"{rates[c] / base:.2f}x" if base else "-"]
        print("| " + " | ".join(cells) + " |")
    (out_dir / "summary.json").write_text(json.dumps(tput, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
