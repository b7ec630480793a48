"""Greedy generation with vLLM, optionally with an EAGLE-3 drafter, in its
own process; prints one JSON object (outputs and spec-decode metrics).

``python -m eagle.spec_run --target DIR [--draft DIR] [--compare-target] --prompts FILE.json``

The mean acceptance length is vLLM's own definition over its counters:
``1 + num_accepted_tokens / num_drafts``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def spec_metrics(metrics) -> dict:
    """vLLM's ``vllm:spec_decode_*`` counters from ``LLM.get_metrics()``."""
    out: dict = {}
    for m in metrics:
        if not m.name.startswith("vllm:spec_decode_"):
            continue
        key = m.name[len("vllm:spec_decode_"):]
        if hasattr(m, "values"):
            prev = out.get(key) or [0] * len(m.values)
            out[key] = [a + b for a, b in zip(prev, m.values)]
        else:
            out[key] = out.get(key, 0) + m.value
    drafts = out.get("num_drafts", 0)
    if drafts:
        out["mean_acceptance_length"] = 1 + out.get("num_accepted_tokens", 0) / drafts
    return out


def _generate(args, prompts, speculative_config):
    import gc

    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs = {"hf_overrides": args.hf_overrides} if args.hf_overrides else {}
    if speculative_config:
        kwargs["speculative_config"] = speculative_config
    llm = LLM(
        model=args.target, dtype="float32", enforce_eager=True, max_model_len=args.max_model_len,
        disable_log_stats=False, seed=0, distributed_executor_backend="uni", **kwargs,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], spec_metrics(llm.get_metrics())
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def heldout_prompts(target: Path, data: Path, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of held-out passages of ``data``: the tail that
    ``train-drafter`` (default ``holdout_fraction``) never trains on."""
    from transformers import AutoTokenizer

    from eagle.train import TrainDrafterConfig, split_text

    tok = AutoTokenizer.from_pretrained(target)
    _, held = split_text(Path(data), TrainDrafterConfig.holdout_fraction)
    return [ids[:prompt_tokens] for ids in (tok(p)["input_ids"] for p in held)
            if len(ids) >= prompt_tokens][:num_prompts]


def run_subprocess(target: Path, draft: Path, prompts: list[list[int]], work: Path, *, max_tokens: int,
                   k: int = 3, hf_overrides: dict | None = None, compare_target: bool = False,
                   timeout: float = 1200) -> dict:
    """Run this module in a fresh process (vLLM engines do not share a process well) and
    return its result; raises ``RuntimeError`` with the log tail when it fails."""
    path = Path(work) / "prompts.json"
    path.write_text(json.dumps(prompts))
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "eagle.spec_run", "--target", str(target), "--draft", str(draft),
           "--prompts", str(path), "--max-tokens", str(max_tokens), "--k", str(k)]
    if hf_overrides:
        cmd += ["--hf-overrides", json.dumps(hf_overrides)]
    if compare_target:
        cmd.append("--compare-target")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SPEC_RUN_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"eagle.spec_run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--draft", default=None)
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--compare-target", action="store_true",
                   help="first generate with the target alone (outputs as target_outputs)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--hf-overrides", type=json.loads, default=None,
                   help='JSON for the target, e.g. {"architectures": ["LlamaVariantForCausalLM"]}')
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    # Engines run in this process, one after another: the second one
    # starts in seconds.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    prompts = json.loads(open(args.prompts).read())
    result: dict = {}
    if args.compare_target:
        result["target_outputs"] = _generate(args, prompts, None)[0]
    if args.draft:
        result["outputs"], result["spec"] = _generate(args, prompts, {
            "method": "eagle3", "model": args.draft, "num_speculative_tokens": args.k,
        })
    print("SPEC_RUN_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
