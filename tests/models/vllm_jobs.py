"""Run several offline vLLM jobs in ONE process and write their results as JSON.

``python vllm_jobs.py JOBS.json OUT.json``. Each job is
``{"model": dir, "llm": {LLM kwargs}, "prompts": [[token ids], ...],
"max_tokens": int, "logprobs": int|null, "prompt_logprobs": int|null,
"env": {variables set before the engine starts}, "metrics": bool}``.
Engines are started one after another in this process (the imports and the
plugin registration are paid once), each shut down before the next. The
result per job is ``{"outputs": [{"token_ids", "logprobs", "prompt_logprobs"}],
"metrics": {counter or gauge name: value}}``
with logprobs as ``[{token_id: logprob}]`` per position, or ``{"error": str}``.
Used by the tests in this folder, which compare against HF transformers.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def _lp(entries):
    if entries is None:
        return None
    return [None if e is None else {str(t): v.logprob for t, v in e.items()} for e in entries]


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ.update(job.get("env", {}))
    kwargs = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "max_num_seqs": 8, "seed": 0}
    kwargs.update(job.get("llm", {}))
    if job.get("metrics"):
        kwargs["disable_log_stats"] = False  # llm.get_metrics() then has the counters
    if kwargs.get("tensor_parallel_size", 1) == 1:
        kwargs.setdefault("distributed_executor_backend", "uni")  # no worker process
    llm = LLM(job["model"], **kwargs)
    try:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=job.get("max_tokens", 32),
            ignore_eos=True,
            logprobs=job.get("logprobs"),
            prompt_logprobs=job.get("prompt_logprobs"),
        )
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params)
        metrics = {}
        if job.get("metrics"):
            metrics = {m.name: m.value for m in llm.get_metrics() if isinstance(getattr(m, "value", None), (int, float))}
        return {
            "metrics": metrics,
            "outputs": [
                {
                    "token_ids": list(o.outputs[0].token_ids),
                    "logprobs": _lp(o.outputs[0].logprobs),
                    "prompt_logprobs": _lp(o.prompt_logprobs),
                }
                for o in outs
            ]
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main(jobs_path: str, out_path: str) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The engine core runs in this process: a second engine starts in seconds.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    jobs = json.loads(open(jobs_path).read())
    results = []
    for job in jobs:
        try:
            results.append(run_job(job))
        except Exception as exc:  # reported per job; the test shows it  # noqa: BLE001
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
