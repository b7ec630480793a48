"""Decode throughput of bf16 vs W4A16 vs W8A8 ``native`` exports served by vLLM.

Builds a random Llama of about 0.5B parameters (memory-bound on CPU), exports
it with the toolkit (RTN: speed does not depend on the rounding method) in
both schemes, serves each with ``vllm serve`` in turn and measures decode
tokens/s at batch 1 and batch 16. Prints one table.

Decode rate = extra tokens / extra time between requests of ``1`` and
``1 + N`` new tokens (prefill cancels out); batch 16 sends 16 such requests
at once.

    python scripts/bench_decode.py [--work DIR] [--layers 20] [--new-tokens 64]

Targets: W4A16 >= 3.0x bf16 at batch 1 and >= 1.0x at batch 16; W8A8 >= 1.5x bf16 at batch 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {("w4a16", 1): 3.0, ("w4a16", 16): 1.0, ("w8a8", 1): 1.5}  # (scheme, batch): x bf16


def build_model(work: Path, layers: int, hidden: int, intermediate: int) -> Path:
    """The bf16 random Llama of this shape, built once under ``work`` in a folder named by the shape (a
    model cached for other ``--layers/--hidden/--intermediate`` is never reused); its exports sit beside it."""
    from models.tiny import build_tiny_llama

    src = work / f"llama-l{layers}-h{hidden}-i{intermediate}" / "bf16"
    if not (src / "config.json").exists():
        build_tiny_llama(src, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                         vocab_size=512, max_position_embeddings=1024, torch_dtype="bfloat16",
                         initializer_range=0.02)
    return src


def export(src: Path, scheme: str) -> Path:
    """The ``scheme`` export of :func:`build_model`'s ``src``, next to it (built once)."""
    from quant.config import QuantConfig
    from quant.pipeline import quantize_checkpoint

    out = src.parent / scheme
    if not (out / "config.json").exists():
        cfg = QuantConfig(scheme=scheme, method="rtn", format="native", num_samples=1, seqlen=32)
        calib = src.parent / "calib.txt"
        calib.write_text("Once upon a time there was a little model.\n\nIt liked to run fast.\n")
        quantize_checkpoint(src, {"native": out}, cfg, calib, progress=False)
    return out


def _complete(url: str, model: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    r = requests.post(url, timeout=900, json={"model": model, "prompt": [1, 20, 30, 40, 50, 60, 70, 80],
                                              "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    assert r.json()["usage"]["completion_tokens"] == max_tokens
    return time.perf_counter() - t0


def _batch(url: str, model: str, batch: int, max_tokens: int) -> float:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(batch) as pool:
        list(pool.map(lambda _: _complete(url, model, max_tokens), range(batch)))
    return time.perf_counter() - t0


def decode_rate(url: str, model: str, batch: int, new_tokens: int, repeats: int) -> float:
    _batch(url, model, batch, 4)  # warm-up
    rates = []
    for _ in range(repeats):
        t_short = _batch(url, model, batch, 1)
        t_long = _batch(url, model, batch, 1 + new_tokens)
        rates.append(batch * new_tokens / max(t_long - t_short, 1e-9))
    return statistics.median(rates)


def measure(ckpt: Path, batches: list[int], new_tokens: int, repeats: int, env: dict | None = None,
            eager: bool = False) -> dict:
    from vllm_plugins.serving import VllmServer

    args = ["--dtype", "bfloat16", "--max-model-len", "1024", "--max-num-seqs", "16"]
    if eager:
        args.append("--enforce-eager")
    with VllmServer(ckpt, *args, env=env) as server:
        url = server.url("/v1/completions")
        return {b: decode_rate(url, server.model, b, new_tokens, repeats) for b in batches}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model's shape and checkpoint cache, shared with ``bench_serve.py``."""
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "bench-decode",
                   help="checkpoints are cached here (git-ignored runs/)")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--schemes", default="w4a16,w8a8",
                   help="quantized exports to serve besides bf16, comma-separated (w4a16, w8a8)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="serve without torch.compile (vLLM's CPU default compiles the model)")
    p.add_argument("--omp-bind", default=None, metavar="CPUS",
                   help="VLLM_CPU_OMP_THREADS_BIND for every server, e.g. 0-1 (default: vLLM's auto binding, "
                        "which keeps one core for the API server)")
    p.add_argument("--cpuwna16", action="store_true",
                   help="also run W4A16 on vLLM's CPUWNA16 kernel (this package's int4 kernels disabled)")
    p.add_argument("--aten-int4", action="store_true",
                   help="also run W4A16 on aten's int4 kernel (this package's compiled tile GEMV disabled)")
    args = p.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    for scheme in schemes:
        if scheme not in ("w4a16", "w8a8"):
            p.error(f"--schemes: unknown scheme {scheme!r} (w4a16, w8a8)")
    if (args.aten_int4 or args.cpuwna16) and "w4a16" not in schemes:
        p.error("--aten-int4 and --cpuwna16 need w4a16 in --schemes")
    args.work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]

    src = build_model(args.work, args.layers, args.hidden, args.intermediate)
    n_params = sum(math.prod(shape) for shape in _shapes(src))
    env = {"VLLM_CPU_OMP_THREADS_BIND": args.omp_bind} if args.omp_bind else {}
    runs = {"bf16": (src, env), **{s: (export(src, s), env) for s in schemes}}
    if args.aten_int4:
        runs["w4a16 (aten int4)"] = (runs["w4a16"][0], {**env, "VLLM_DISABLED_KERNELS": "TileInt4CPULinearKernel"})
    if args.cpuwna16:
        runs["w4a16 (vLLM CPUWNA16)"] = (runs["w4a16"][0], {
            **env, "VLLM_DISABLED_KERNELS": "TileInt4CPULinearKernel,TorchInt4CPULinearKernel"})
    results = {name: measure(ckpt, batches, args.new_tokens, args.repeats, env, args.enforce_eager) for name, (ckpt, env) in runs.items()}

    print(f"\nDecode tokens/s, random Llama {n_params / 1e9:.2f}B params, vLLM CPU, bf16 activations, "
          f"{os.cpu_count()} CPUs, {args.new_tokens} new tokens, median of {args.repeats}, "
          f"{'torch.compile' if not args.enforce_eager else 'eager'}, "
          f"OMP bind {args.omp_bind or 'auto (one core kept for the API server)'}")
    head = "| checkpoint | " + " | ".join(f"batch {b} tok/s | vs bf16" for b in batches) + " |"
    print(head + "\n|" + "---|" * (1 + 2 * len(batches)))
    for name, rates in results.items():
        cells = [name]
        for b in batches:
            cells += [f"{rates[b]:.1f}", f"{rates[b] / results['bf16'][b]:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    for (scheme, batch), target in TARGETS.items():
        if batch not in batches or scheme not in results:
            continue
        got = results[scheme][batch] / results["bf16"][batch]
        print(f"target {scheme} >= {target}x bf16 at batch {batch}: {got:.2f}x ({'met' if got >= target else 'NOT met'})")
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


def _shapes(src: Path):
    from safetensors import safe_open

    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                yield fh.get_slice(k).get_shape()


if __name__ == "__main__":
    sys.exit(main())
