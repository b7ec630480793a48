"""Benchmark of record for vision-aware EAGLE-3 drafting: the trained tiny VLM
(``vllm-plugins demo-vlm``) served in vLLM three ways, greedy, on held-out
images:

- ``target``: no drafter;
- ``vision``: the drafter trained with ``--image-inputs embeds``, served by this
  package's ``Eagle3MultimodalLlamaForCausalLM`` (it reads the target's image
  embeddings at the placeholders);
- ``text``: the drafter trained with ``--image-inputs placeholder`` (same
  batches, same seed), served by vLLM's stock ``Eagle3LlamaForCausalLM``
  (architecture ``LlamaForCausalLMEagle3``: it reads the placeholder token's
  embedding);
- ``textonly`` (optional, not in the default set): the drafter trained with
  ``--image-inputs none``, on the same answers but without the image (the
  prompt's text only), as public multimodal drafters are; served by the stock
  class like ``text``.

Acceptance comes from vLLM's own spec-decode counters (``LLM.get_metrics()``:
``vllm:spec_decode_num_drafts``, ``..._num_accepted_tokens`` and
``..._num_accepted_tokens_per_pos``), read before and after each task
family's requests; mean acceptance length = 1 + accepted / drafts.
Each configuration runs in its own process. The last line is
``acceptance vision=X text=Y lossless=Z%``: X and Y the mean acceptance
lengths averaged over the task families, Z the share of prompts whose
tokens equal the no-drafter run in both drafter runs. With ``textonly`` the
line before it is ``acceptance textonly=W``.

    python scripts/bench_spec_mm.py [--work runs/bench-spec-mm] [--vlm DIR]
        [--vision-drafter DIR --text-drafter DIR] [--train-steps N]
        [--configs target,vision,text,textonly --textonly-drafter DIR]

``python -m eagle.offline_eval`` replays the same prompts in torch (no vLLM)
and reproduces these acceptance figures; use it to tell a training problem
from a serving one.

Missing pieces are built into ``--work``: the VLM with ``demo-vlm``, the
drafters with ``train-drafter --data VLM/train.jsonl``. Run it under
``flock /tmp/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("target", "vision", "text")  # the default set; the last line reports vision and text
EXTRA_CONFIGS = ("textonly",)  # run on request, reported on the line before the last
TRAINED_WITH = {"vision": "embeds", "text": "placeholder", "textonly": "none"}  # --image-inputs
STOCK_ARCH = "LlamaForCausalLMEagle3"  # vLLM maps it to Eagle3LlamaForCausalLM


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "vllm_plugins.cli", *args]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _stock_copy(drafter: Path, work: Path, name: str) -> Path:
    """A copy of ``drafter`` whose config names vLLM's stock EAGLE-3 class."""
    out = work / f"{name}-drafter-stock"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(drafter, out)
    cfg = json.loads((out / "config.json").read_text())
    if "speculators_model_type" not in cfg:  # speculators configs map to the stock class anyway
        cfg["architectures"] = [STOCK_ARCH]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


# --------------------------------------------------------------- worker side
def _delta(after: dict, before: dict) -> dict:
    out = {}
    for k, v in after.items():
        b = before.get(k, [0] * len(v) if isinstance(v, list) else 0)
        out[k] = [x - y for x, y in zip(v, b)] if isinstance(v, list) else v - b
    return out


def _drafter_class(llm) -> str | None:
    """The class name of the engine's drafter model (in-process engine)."""
    try:
        core = llm.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        return type(runner.drafter.model).__name__
    except AttributeError:
        return None


def worker(args) -> int:
    from PIL import Image
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from eagle.spec_run import spec_metrics
    from models.vlm_train import prompt_ids

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    rows = rows[: args.num_prompts] if args.num_prompts else rows
    tok = AutoTokenizer.from_pretrained(args.vlm)
    kwargs = {}
    if args.draft:
        kwargs["speculative_config"] = {"method": "eagle3", "model": str(args.draft),
                                        "num_speculative_tokens": args.k}
    llm = LLM(model=str(args.vlm), dtype="float32", enforce_eager=True, max_model_len=512,
              disable_log_stats=False, seed=0, distributed_executor_backend="uni",
              limit_mm_per_prompt={"image": 1}, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    families = sorted({r["task"] for r in rows})
    result = {"drafter_class": _drafter_class(llm), "families": {}, "outputs": {}}
    for fam in families:
        idx = [i for i, r in enumerate(rows) if r["task"] == fam]
        prompts = []
        for i in idx:
            question = rows[i]["conversations"][0]["value"].split("\n", 1)[1]
            image = Image.open(args.data.parent / rows[i]["image"]).convert("RGB")
            prompts.append({"prompt_token_ids": prompt_ids(tok, question),
                            "multi_modal_data": {"image": image}})
        before = spec_metrics(llm.get_metrics())
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        spec = _delta(spec_metrics(llm.get_metrics()), before)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        texts = [o.outputs[0].text.strip() for o in outs]
        exact = sum(t == rows[i]["conversations"][1]["value"] for t, i in zip(texts, idx))
        result["families"][fam] = {"spec": spec, "seconds": elapsed, "prompts": len(idx),
                                   "tokens": sum(map(len, tokens)), "exact": exact}
        result["outputs"].update({str(i): t for i, t in zip(idx, tokens)})
    args.result.write_text(json.dumps(result))
    llm.llm_engine.engine_core.shutdown()
    return 0


# --------------------------------------------------------------- parent side
def _run_config(name: str, draft: Path | None, args) -> dict:
    out = args.work / f"result-{name}.json"
    cmd = [sys.executable, __file__, "--worker", "--vlm", str(args.vlm), "--data", str(args.data),
           "--result", str(out), "--k", str(args.k), "--max-tokens", str(args.max_tokens),
           "--num-prompts", str(args.num_prompts)]
    if draft:
        cmd += ["--draft", str(draft)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"[bench] serving {name} ...", flush=True)
    log = args.work / f"serve-{name}.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"bench_spec_mm: the {name} run failed (exit {rc}); see {log}")
    return json.loads(out.read_text())


def _mal(spec: dict) -> float:
    drafts = spec.get("num_drafts", 0)
    return 1 + spec.get("num_accepted_tokens", 0) / drafts if drafts else float("nan")


def report(results: dict, k: int) -> str:
    """The table; its last line is ``acceptance ...`` (see the module doc)."""
    fams = sorted(results["target"]["families"])
    lines = ["| run | drafter class | " + " | ".join(fams) + " | mean over families | overall | "
             + " | ".join(f"accepted at pos {i}" for i in range(k)) + " | tok/s |",
             "|---" * (5 + len(fams) + k) + "|"]
    means = {}
    for name, r in results.items():
        specs = [r["families"][f]["spec"] for f in fams]
        tok_s = sum(r["families"][f]["tokens"] for f in fams) / sum(r["families"][f]["seconds"] for f in fams)
        if name == "target":
            dash = " | ".join("–" for _ in range(len(fams) + 2 + k))
            lines.append(f"| target | – | {dash} | {tok_s:.1f} |")
            continue
        per_fam = [_mal(s) for s in specs]
        means[name] = sum(per_fam) / len(per_fam)
        drafts = sum(s.get("num_drafts", 0) for s in specs)
        accepted = sum(s.get("num_accepted_tokens", 0) for s in specs)
        per_pos = [sum((s.get("num_accepted_tokens_per_pos") or [0] * k)[i] for s in specs) for i in range(k)]
        pos = " | ".join(f"{p / drafts:.2f}" if drafts else "nan" for p in per_pos)
        lines.append(f"| {name} | {r['drafter_class']} | " + " | ".join(f"{m:.2f}" for m in per_fam)
                     + f" | {means[name]:.2f} | {_mal({'num_drafts': drafts, 'num_accepted_tokens': accepted}):.2f}"
                     f" | {pos} | {tok_s:.1f} |")
    base = results["target"]["outputs"]
    drafted = [n for n in results if n != "target"]
    record = [d for d in drafted if d not in EXTRA_CONFIGS]
    extra = [d for d in drafted if d in EXTRA_CONFIGS]
    n = len(base)
    exact = sum(results["target"]["families"][f]["exact"] for f in fams)
    same = {d: sum(results[d]["outputs"][i] == base[i] for i in base) for d in drafted}
    over = record or drafted  # textonly alone: its own losslessness
    lossless = 100.0 * sum(all(results[d]["outputs"][i] == base[i] for d in over) for i in base) / n
    lines += ["", f"prompts: {n}; no-drafter answers equal to the reference: {exact}/{n}; "
              "identical to the no-drafter run: " + ", ".join(f"{d} {same[d]}/{n}" for d in drafted)]
    if extra:
        lines.append("acceptance " + " ".join(f"{d}={means[d]:.2f}" for d in extra))
    lines.append("acceptance " + " ".join(f"{d}={means[d]:.2f}" for d in record) + f" lossless={lossless:.0f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-spec-mm")
    p.add_argument("--vlm", type=Path, default=None, help="demo-vlm checkpoint (default: built in --work)")
    p.add_argument("--data", type=Path, default=None, help="held-out jsonl (default: VLM/heldout.jsonl)")
    p.add_argument("--vision-drafter", type=Path, default=None)
    p.add_argument("--text-drafter", type=Path, default=None)
    p.add_argument("--textonly-drafter", type=Path, default=None,
                   help="drafter trained with --image-inputs none (for the textonly config)")
    p.add_argument("--train-steps", type=int, default=None, help="train-drafter --steps (default: its own)")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=0, help="first N held-out rows (0: all)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated subset of target,vision,text,textonly (target is always "
                        "run; textonly is not in the default set)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--draft", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    asked = args.configs.split(",")
    unknown = sorted(set(asked) - set(CONFIGS + EXTRA_CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)} (expected a subset of "
                f"{','.join(CONFIGS + EXTRA_CONFIGS)})")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.vlm is None:
        args.vlm = args.work / "vlm"
        if not args.vlm.exists():
            _cli("demo-vlm", "--out", str(args.vlm))
    args.data = args.data or args.vlm / "heldout.jsonl"
    configs = ["target"] + [c for c in CONFIGS[1:] + EXTRA_CONFIGS if c in asked]
    steps = ["--steps", str(args.train_steps)] if args.train_steps else []
    for name, mode in TRAINED_WITH.items():
        attr = f"{name}_drafter"
        if name in configs and getattr(args, attr) is None:
            setattr(args, attr, args.work / f"drafter-{mode}")
            if not getattr(args, attr).exists():
                _cli("train-drafter", "--target", str(args.vlm), "--data", str(args.vlm / "train.jsonl"),
                     "--out", str(getattr(args, attr)), "--image-inputs", mode, *steps)
    drafts = {"target": None, "vision": args.vision_drafter}
    for name in ("text", "textonly"):
        drafts[name] = _stock_copy(getattr(args, f"{name}_drafter"), args.work, name) if name in configs else None
    results = {name: _run_config(name, drafts[name], args) for name in configs}
    table = report(results, args.k)
    (args.work / "report.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
