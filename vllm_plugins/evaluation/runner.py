"""Run the local lm-eval tasks against vLLM and tabulate accuracy and recovery vs fp.

Two backends, both lm-eval's own:
- ``server``: lm-eval ``local-completions`` against ``vllm serve`` (a running
  one at ``base_url``, or one started per model with
  :class:`vllm_plugins.serving.VllmServer`);
- ``offline``: lm-eval ``vllm`` (in-process ``vllm.LLM``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = ("tinystories_lastword", "wikitext2_ppl")
# The same two measures over any local text file (``--text``): used by the
# main job, whose held-out text is generated, not read from ../shared.
TEXT_TASKS = ("text_lastword", "text_ppl")
BACKENDS = ("server", "offline")

# (task, lm-eval metric, column title, higher is better)
COLUMNS = [
    ("tinystories_lastword", "acc", "lastword acc", True),
    ("tinystories_lastword", "perplexity", "lastword ppl", False),
    ("wikitext2_ppl", "word_perplexity", "wikitext2 word ppl", False),
    ("wikitext2_ppl", "bits_per_byte", "wikitext2 bits/byte", False),
    ("text_lastword", "acc", "text lastword acc", True),
    ("text_lastword", "perplexity", "text lastword ppl", False),
    ("text_ppl", "word_perplexity", "text word ppl", False),
]


@dataclass
class EvalSettings:
    """One evaluation run; the CLI's defaults come from here."""

    backend: str = "server"
    tasks: tuple[str, ...] = TASKS
    limit: int | None = None
    dtype: str = "float32"
    max_model_len: int = 512
    shared_dir: Path = field(default_factory=lambda: Path(os.environ.get("VLLM_PLUGINS_SHARED", "../shared")))
    num_concurrent: int = 8
    batch_size: int = 16
    hf_overrides: dict | None = None  # e.g. {"architectures": ["LlamaVariantForCausalLM"]}
    text_file: Path | None = None  # the data of TEXT_TASKS


def task_manager(settings: EvalSettings):
    from lm_eval.tasks import TaskManager

    metadata = {"shared_dir": str(Path(settings.shared_dir).resolve())}
    if settings.text_file is not None:
        metadata["text_file"] = str(Path(settings.text_file).resolve())
    return TaskManager(include_path=str(TASKS_DIR), metadata=metadata)


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in values.items()
                     if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
    return out


def evaluate_server(base_url: str, served_model: str, tokenizer: str | os.PathLike, settings: EvalSettings):
    """lm-eval ``local-completions`` against a running server; returns {task: {metric: value}}."""
    from lm_eval import simple_evaluate

    model_args = {
        "base_url": base_url.rstrip("/") + "/v1/completions", "model": served_model,
        "tokenizer_backend": "huggingface", "tokenizer": str(tokenizer),
        # Token ids, not text: with text the server adds BOS and re-tokenizes,
        # so lm-eval's context length no longer indexes the echoed logprobs.
        "tokenized_requests": True, "add_bos_token": True,
        "num_concurrent": settings.num_concurrent, "max_retries": 3,
        "max_length": settings.max_model_len - 1,  # + the one token each request generates
    }
    res = simple_evaluate(model="local-completions", model_args=model_args, tasks=list(settings.tasks),
                          task_manager=task_manager(settings), limit=settings.limit, batch_size=1)
    return _metrics(res)


def evaluate_offline(model_dir: str | os.PathLike, settings: EvalSettings):
    """lm-eval ``vllm`` backend (``vllm.LLM`` in this process)."""
    from lm_eval import simple_evaluate

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU: else vLLM reserves most of RAM
    model_args = {"pretrained": str(model_dir), "dtype": settings.dtype, "enforce_eager": True,
                  "max_model_len": settings.max_model_len, "add_bos_token": True}
    if settings.hf_overrides:
        model_args["hf_overrides"] = settings.hf_overrides
    res = simple_evaluate(model="vllm", model_args=model_args, tasks=list(settings.tasks),
                          task_manager=task_manager(settings), limit=settings.limit,
                          batch_size=settings.batch_size)
    return _metrics(res)


def evaluate_model(model_dir: str | os.PathLike, settings: EvalSettings):
    if settings.backend == "offline":
        return evaluate_offline(model_dir, settings)
    from vllm_plugins.serving import VllmServer

    args = ["--enforce-eager", "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len)]
    if settings.hf_overrides:
        args += ["--hf-overrides", json.dumps(settings.hf_overrides)]
    with VllmServer(model_dir, *args) as server:
        return evaluate_server(server.base_url, server.model, model_dir, settings)


def recovery_table(results: dict[str, dict[str, dict[str, float]]], baseline: str) -> str:
    """Markdown table: one row per model, each metric with its recovery % vs ``baseline``.

    Recovery is ``value / fp`` for accuracy and ``fp / value`` for perplexities
    and bits per byte, so 100 % means no loss and lower means worse.
    """
    cols = [c for c in COLUMNS if any(c[1] in r.get(c[0], {}) for r in results.values())]
    head = "| model | " + " | ".join(f"{title} | rec. %" for _, _, title, _ in cols) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(cols))]
    base = results[baseline]
    for label, res in results.items():
        cells = [label]
        for task, metric, _, higher in cols:
            value = res.get(task, {}).get(metric)
            ref = base.get(task, {}).get(metric)
            if value is None:
                cells += ["-", "-"]
                continue
            rec = None if not ref or not value else (value / ref if higher else ref / value) * 100
            cells += [f"{value:.4f}", "-" if rec is None else f"{rec:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
