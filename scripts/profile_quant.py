"""Where a default quantize run spends its time: wall and process CPU seconds per pipeline phase.

    python scripts/profile_quant.py [--model runs/bench_quant/llama-100m] [--samples runs/bench_quant/samples-100m-0.pt]

Runs ``quant.pipeline.quantize_checkpoint`` once with the defaults (w4a16 g128, compressed-tensors,
``lm_head`` ignored) on the model and calibration windows ``scripts/bench_quant.py`` made (run it
once first), with the pipeline's phases wrapped in timers. ``cpu/wall`` near the thread count means
the phase keeps every core busy, near 1 that it runs on one core. A phase that runs on the background
thread (the errors' jobs, ``output_error.OutputError``) is timed there, so the phases add up to more than the total.
Set ``OMP_NUM_THREADS`` (and ``OPENBLAS_NUM_THREADS``) to profile other thread counts.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = {  # module attribute -> phase
    "gptq.accumulate_hessian": "Hessian (ssyrk)",
    "pipeline._group_statistics": "calibration passes (with their Hessians)",
    "pipeline.prepare_hessian": "factorization (potrf + trtri)",
    "pipeline.gptq_quantize_shared": "GPTQ column loop",
    "clip.search_scales": "clipping search (in the loop)",
    "output_error.OutputError.energy_job": "error denominators tr(W H W^T)",
    "output_error.OutputError.finish": "error numerators (GPTQ's loss)",
    "pipeline._Background._close": "window end: wait for the job in hand",
    "pipeline._propagate": "output pass",
    "pipeline._discover_groups": "group discovery",
    "pipeline.DecoderSkeleton.load_layer": "layer load",
    "pipeline.DecoderSkeleton.capture_layer_inputs": "embedding + first inputs",
    "pipeline.ShardWriter.write_shard": "shard writing (packing)",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "runs" / "bench_quant" / "llama-100m"))
    ap.add_argument("--samples", default=str(REPO / "runs" / "bench_quant" / "samples-100m-0.pt"))
    args = ap.parse_args()

    from quant.imports import unused_modules_hidden

    with unused_modules_hidden():  # the imports of `python -m quant` (bench_quant.py's OURS_CHILD), untimed
        import torch
        import transformers.models.auto.modeling_auto  # noqa: F401 - what the pipeline imports when it runs

        from quant import clip, gptq, output_error, pipeline
        from quant.config import QuantConfig

    modules = {"gptq": gptq, "pipeline": pipeline, "clip": clip, "output_error": output_error}
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])

    def timed(phase, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                t = totals[phase]
                t[0] += time.perf_counter() - w0
                t[1] += time.process_time() - c0
                t[2] += 1
        return wrapper

    for path, phase in PHASES.items():
        *owner_path, attr = path.split(".")
        owner = modules[owner_path[0]]
        for part in owner_path[1:]:
            owner = getattr(owner, part)
        setattr(owner, attr, timed(phase, getattr(owner, attr)))
    pipeline.accumulate_hessian = gptq.accumulate_hessian  # the pipeline's own reference

    samples = torch.load(args.samples)
    cfg = QuantConfig(scheme="w4a16", group_size=128, format="compressed-tensors", num_samples=samples.shape[0],
                      seqlen=samples.shape[1], ignore=["lm_head"])
    w0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp, unused_modules_hidden():
        pipeline.quantize_checkpoint(args.model, Path(tmp) / "out", cfg, samples=samples, progress=False)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(f"{'phase':<44}{'calls':>6}{'wall s':>8}{'cpu s':>8}{'cpu/wall':>9}")
    for phase, (w, c, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"{phase:<44}{n:>6}{w:8.2f}{c:8.2f}{c / max(w, 1e-9):9.2f}")
    print(f"{'quantize_checkpoint':<44}{'':>6}{wall:8.2f}{cpu:8.2f}{cpu / wall:9.2f}")
    print(f"torch threads {torch.get_num_threads()}; cpu s = the whole process's CPU time while the phase ran "
          "(nested phases are counted in their callers too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
