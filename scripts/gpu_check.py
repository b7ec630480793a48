"""GPU check: GPTQ W4A16 g128 of a random Llama-3-8B-shaped model on one CUDA device, against the CPU.

    python scripts/gpu_check.py                      # 3 layers of 8B shape on cuda (about 4 GB of disk)
    python scripts/gpu_check.py --device cpu --hidden 128 --intermediate 256 --heads 4 --kv-heads 2 \\
        --vocab 512 --samples 8 --seqlen 64 --compare-samples 4    # CPU smoke test at tiny size

Needs torch, transformers and this repository; no vLLM, no network. It

1. writes a random Llama (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
   vocab 128256 by default; ``--layers N``) as bf16 safetensors, one shard per
   decoder layer, in a child process (its memory is not counted below);
2. quantizes it W4A16 g128 GPTQ (true-sequential, the toolkit's defaults) with
   ``--samples`` x ``--seqlen`` random calibration tokens (128 x 2048) on
   ``--device``, and prints the time of every layer, the extrapolation to 32
   layers (the fixed cost plus 32 times the mean steady layer, i.e. every layer
   after the first, which pays the CUDA start-up), the peak device memory and the
   peak RSS of this process;
3. quantizes the first ``--compare-layers`` layers (2) again, on ``--device``
   and on the CPU with the same ``--compare-samples`` samples (fewer than in
   step 2, to keep the CPU run short; forward passes in ``--compare-dtype``,
   float32 by default, as CPUs without bfloat16 units are slow in bfloat16), and checks that the relative
   reconstruction error of every linear agrees within ``--tolerance`` (2%)
   between the two. With ``--device cpu`` the first of the two runs takes every
   device branch of the pipeline and the torch.linalg factorization on the CPU.

Exit status 1 when the check fails. ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FULL_DEPTH = 32  # Llama-3-8B


def _generate(out: Path, spec: dict) -> None:
    """Child process: write the random checkpoint (scripts/bench_quant.py's generator, one shard per layer)."""
    path = REPO / "scripts" / "bench_quant.py"
    module_spec = importlib.util.spec_from_file_location("bench_quant", path)
    bench_quant = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench_quant)
    bench_quant.generate_llama(out, spec)


def generate(out: Path, spec: dict) -> Path:
    if not (out / "config.json").exists():
        child = multiprocessing.get_context("spawn").Process(target=_generate, args=(out, spec))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"gpu_check: writing the random model into {out} failed (exit {child.exitcode})")
    return out


def first_layers_view(model: Path, out: Path, n: int) -> Path:
    """A checkpoint directory of the first ``n`` decoder layers of ``model`` (links to its shards)."""
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {k: v for k, v in index.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.suffix == ".safetensors" and f.name not in set(keep.values()):
            continue
        if f.name not in ("config.json", "model.safetensors.index.json") and not (out / f.name).exists():
            os.symlink(f.resolve(), out / f.name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = n
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def quantize(model: Path, out: Path, samples, device: str, group_size: int, placement=None, calib_dtype="auto"):
    from quant.config import QuantConfig
    from quant.pipeline import quantize_checkpoint

    cfg = QuantConfig(scheme="w4a16", group_size=group_size, method="gptq", format="native", device=device,
                      num_samples=int(samples.shape[0]), seqlen=int(samples.shape[1]), calib_dtype=calib_dtype)
    return quantize_checkpoint(model, out, cfg, samples=samples, force=True, progress=False, placement=placement)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke test)")
    ap.add_argument("--layers", type=int, default=3, help="decoder layers of the timed model (default 3)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=128, help="calibration samples of the timed run")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--compare-layers", type=int, default=2, help="layers quantized on both the device and the CPU")
    ap.add_argument("--compare-samples", type=int, default=8, help="calibration samples of the device/CPU check")
    ap.add_argument("--compare-dtype", default="float32", choices=("auto", "float32", "bfloat16"),
                    help="calibration dtype of the device/CPU check (default float32)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="relative difference allowed between the errors")
    ap.add_argument("--workdir", type=Path, default=None, help="where the model and exports go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)

    import torch

    from quant.device import Placement, resolve_device
    from quant.pipeline import peak_rss_mb

    device = resolve_device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    spec = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab)
    t0 = time.perf_counter()
    model = generate(workdir / "model", spec)
    t_generate = time.perf_counter() - t0
    size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    print(f"model: {model} ({size_gb:.2f} GB bf16, {args.layers} layers, hidden {args.hidden}, intermediate "
          f"{args.intermediate}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}; "
          f"written in {t_generate:.1f} s)")
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, args.vocab, (args.samples, args.seqlen), generator=g)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report = quantize(model, workdir / "out", samples, str(device), args.group_size)
    layer_s = [s.seconds for s in report.layers]
    steady = layer_s[1:] or layer_s
    per_layer = sum(steady) / len(steady)
    fixed = report.seconds - sum(layer_s)
    extrapolated = fixed + FULL_DEPTH * per_layer
    rss = peak_rss_mb()
    print(f"\nW4A16 g{args.group_size} GPTQ on {device}, {args.samples} x {args.seqlen} calibration tokens, "
          f"forward passes in {str(report.calib_dtype).removeprefix('torch.')}")
    print(f"{'layer':>5}  {'time s':>7}  {'mean rel. err':>13}  {'max rel. err':>12}")
    for s in report.layers:
        print(f"{s.index:>5}  {s.seconds:>7.2f}  {s.mean_error:>13.3e}  {s.max_error:>12.3e}")
    print(f"total {report.seconds:.1f} s = fixed {fixed:.1f} s (inputs of layer 0, embeddings and head) "
          f"+ layers {sum(layer_s):.1f} s")
    print(f"extrapolated to {FULL_DEPTH} layers: {extrapolated:.0f} s "
          f"({fixed:.1f} s + {FULL_DEPTH} x {per_layer:.2f} s, the mean of layers {len(layer_s) - len(steady)}.."
          f"{len(layer_s) - 1})")
    peak_dev = report.peak_device_mb
    print(f"peak {device} memory: {'n/a' if peak_dev is None else f'{peak_dev:.0f} MiB'}; peak RSS: {rss:.0f} MiB")

    # Device vs CPU on the first layers, the same samples.
    n = min(args.compare_layers, args.layers)
    view = first_layers_view(model, workdir / f"first-{n}", n)
    few = samples[:args.compare_samples]
    # On the CPU the "device" run takes every device branch and the torch.linalg factorization.
    forced = Placement(device, activations_on_device=False, lapack=False) \
        if device.type == "cpu" else None
    t1 = time.perf_counter()
    dev = quantize(view, workdir / "cmp-device", few, str(device), args.group_size, forced, args.compare_dtype)
    t2 = time.perf_counter()
    cpu = quantize(view, workdir / "cmp-cpu", few, "cpu", args.group_size, None, args.compare_dtype)
    t3 = time.perf_counter()
    print(f"\n{device} vs cpu on {n} layers, {few.shape[0]} x {args.seqlen} tokens, {args.compare_dtype} "
          f"({t2 - t1:.1f} s on {device}, {t3 - t2:.1f} s on cpu): relative reconstruction error per linear")
    print(f"{'linear':<40}  {'device':>10}  {'cpu':>10}  {'rel. diff':>9}")
    rows, worst = [], 0.0
    for a, b in zip(dev.layers, cpu.layers):
        for name in b.errors:
            e_dev, e_cpu = a.errors[name], b.errors[name]
            diff = abs(e_dev - e_cpu) / e_cpu if e_cpu > 0 else abs(e_dev)
            worst = max(worst, diff)
            rows.append({"linear": name, "device": e_dev, "cpu": e_cpu, "rel_diff": diff})
            print(f"{name:<40}  {e_dev:>10.4e}  {e_cpu:>10.4e}  {diff:>8.2%}")
    ok = worst <= args.tolerance
    print(f"largest difference {worst:.2%} ({'within' if ok else 'OUTSIDE'} {args.tolerance:.0%}); "
          f"whole check {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "device": str(device), "layers": args.layers, "layer_seconds": layer_s, "total_seconds": report.seconds,
            "fixed_seconds": fixed, "per_layer_seconds": per_layer, "extrapolated_seconds": extrapolated,
            "peak_device_mb": peak_dev, "peak_rss_mb": rss, "compare": rows, "worst_rel_diff": worst, "ok": ok,
            "check_seconds": time.perf_counter() - t0}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
