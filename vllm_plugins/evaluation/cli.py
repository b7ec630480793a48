"""``vllm-plugins eval``: lm-eval accuracy of fp and quantized checkpoints, one table.

    vllm-plugins eval --model fp=OUT/fp --model w4a16-gptq=OUT/w4 --model w8a8-rtn=OUT/w8 \\
        [--backend server|offline] [--limit 200] [--tasks tinystories_lastword,wikitext2_ppl]
    vllm-plugins eval --base-url http://127.0.0.1:8000 --model fp=OUT/fp     # a running vllm serve

The first ``--model`` is the baseline of the recovery columns.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from quant.errors import CLIError
from vllm_plugins.evaluation.runner import BACKENDS, TASKS, TEXT_TASKS, EvalSettings

_DEFAULTS = {f.name: f.default for f in fields(EvalSettings) if not callable(f.default)}


def add_parser(subparsers):
    p = subparsers.add_parser("eval", help="lm-eval accuracy/perplexity of served checkpoints, with recovery vs fp",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="LABEL=DIR",
                   help="checkpoint to evaluate (repeat); the first is the baseline")
    p.add_argument("--backend", choices=BACKENDS, default=_DEFAULTS["backend"],
                   help="server: lm-eval local-completions against vllm serve; offline: lm-eval's vllm backend")
    p.add_argument("--base-url", help="evaluate this running vllm serve instead of starting one (one --model)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated, from {', '.join(TASKS + TEXT_TASKS)} "
                        f"(default: {','.join(TASKS)}, or {','.join(TEXT_TASKS)} with --text)")
    p.add_argument("--text", type=Path, default=None,
                   help="a local text file (blank-line separated documents) for the text_* tasks")
    p.add_argument("--limit", type=int, default=_DEFAULTS["limit"], help="documents per task (default: all)")
    p.add_argument("--dtype", default=_DEFAULTS["dtype"])
    p.add_argument("--max-model-len", type=int, default=_DEFAULTS["max_model_len"])
    p.add_argument("--hf-overrides", type=json.loads, default=None, metavar="JSON",
                   help='passed to vLLM, e.g. \'{"architectures": ["LlamaVariantForCausalLM"]}\' for head size 16')
    p.add_argument("--shared-dir", type=Path, default=None, help="the project's ../shared (data/ inside)")
    p.add_argument("--output", type=Path, help="also write the results as JSON here")
    p.set_defaults(func=run)
    return p


def _parse_models(specs: list[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise CLIError(f"--model {spec!r}: expected LABEL=DIR")
        if label in models:
            raise CLIError(f"--model {spec!r}: label {label!r} given twice")
        if not (Path(path) / "config.json").is_file():
            raise CLIError(f"--model {spec!r}: {path} has no config.json")
        models[label] = Path(path)
    return models


def run(args) -> int:
    models = _parse_models(args.model)
    if args.tasks is None:
        args.tasks = ",".join(TEXT_TASKS if args.text else TASKS)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in tasks if t not in TASKS + TEXT_TASKS]
    if unknown or not tasks:
        raise CLIError(f"--tasks: unknown {unknown or tasks}; choose from {', '.join(TASKS + TEXT_TASKS)}")
    if args.text is not None and not args.text.is_file():
        raise CLIError(f"--text: {args.text} not found")
    if args.text is None and any(t in TEXT_TASKS for t in tasks):
        raise CLIError(f"--tasks {args.tasks}: the text_* tasks need --text FILE")
    if args.base_url and (len(models) != 1 or args.backend != "server"):
        raise CLIError("--base-url evaluates one running server: give exactly one --model and --backend server")
    settings = EvalSettings(backend=args.backend, tasks=tasks, limit=args.limit, dtype=args.dtype,
                            max_model_len=args.max_model_len, hf_overrides=args.hf_overrides,
                            text_file=args.text)
    if args.shared_dir is not None:
        settings.shared_dir = args.shared_dir
    needed = {"tinystories_lastword": "tinystories_val.txt", "wikitext2_ppl": "wikitext2_test.txt"}
    for name in (needed[t] for t in tasks if t in needed):
        if not (Path(settings.shared_dir) / "data" / name).is_file():
            raise CLIError(f"--shared-dir: {settings.shared_dir}/data/{name} not found")

    from vllm_plugins.evaluation import runner

    results = {}
    for label, path in models.items():
        if args.base_url:
            results[label] = runner.evaluate_server(args.base_url, _served_name(args.base_url), path, settings)
        elif args.backend == "offline" and len(models) > 1:
            results[label] = _offline_in_subprocess(args, label, path)
        else:
            results[label] = runner.evaluate_model(path, settings)
    table = runner.recovery_table(results, next(iter(models)))
    print(table)
    if args.output:
        args.output.write_text(json.dumps({"backend": args.backend, "limit": args.limit, "results": results,
                                           "table": table}, indent=2))
    return 0


def _served_name(base_url: str) -> str:
    import requests

    try:
        data = requests.get(base_url.rstrip("/") + "/v1/models", timeout=10).json()["data"]
    except (requests.RequestException, KeyError, ValueError) as exc:
        raise CLIError(f"--base-url {base_url}: cannot list served models ({exc})") from None
    return data[0]["id"]


def _offline_in_subprocess(args, label: str, path: Path) -> dict:
    """One in-process vLLM engine per process: each model gets its own ``eval`` run."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "vllm_plugins.cli", "eval", "--backend", "offline", "--model", f"{label}={path}",
                "--tasks", args.tasks, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                "--output", str(out)]
        if args.limit is not None:
            argv += ["--limit", str(args.limit)]
        if args.hf_overrides:
            argv += ["--hf-overrides", json.dumps(args.hf_overrides)]
        if args.shared_dir is not None:
            argv += ["--shared-dir", str(args.shared_dir)]
        if args.text is not None:
            argv += ["--text", str(args.text)]
        proc = subprocess.run(argv, env=os.environ.copy())
        if proc.returncode != 0 or not out.exists():
            raise CLIError(f"--model {label}={path}: offline evaluation failed (exit {proc.returncode})")
        return json.loads(out.read_text())["results"][label]
