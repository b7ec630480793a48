"""``vllm-plugins quantize``: the command line of the GPTQ toolkit.

Every default comes from :class:`quant.config.QuantConfig`; the flags only
override its fields, and the config validates the result.
"""

from __future__ import annotations

import argparse
import dataclasses

from quant.config import CALIB_DTYPES, DEVICES, FORMATS, METHODS, SCHEMES, QuantConfig, parse_override
from quant.errors import CLIError, QuantInputError, run_command
from quant.schemes import GROUP_SIZES, names

_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(QuantConfig)}


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = subparsers.add_parser(
        "quantize", help="GPTQ/RTN-quantize a Hugging Face checkpoint and export it for vLLM",
        description="Calibrate one decoder layer at a time and export a gptq, compressed-tensors or native checkpoint.")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--calib", required=True, help="calibration text: .txt (blank-line separated) or .jsonl ('text')")
    p.add_argument("--scheme", choices=SCHEMES, default=d["scheme"], help=f"default {d['scheme']}")
    p.add_argument("--format", choices=FORMATS, default=d["format"], help=f"default {d['format']}")
    p.add_argument("--method", choices=METHODS, default=d["method"], help=f"default {d['method']}")
    p.add_argument("--group-size", type=int, default=d["group_size"], help=f"{'/'.join(names(lambda s: s.grouped))}: {', '.join(map(str, GROUP_SIZES))} "
                        f"(-1: per channel; default {d['group_size']})")
    p.add_argument("--act-order", action="store_true", default=d["act_order"], help=f"{'/'.join(names(lambda s: s.act_order))}: act-order with static groups")
    p.add_argument("--num-samples", type=int, default=d["num_samples"], help=f"default {d['num_samples']}")
    p.add_argument("--seqlen", type=int, default=d["seqlen"], help=f"default {d['seqlen']}")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"default {d['seed']}")
    p.add_argument("--damp-percent", type=float, default=d["damp_percent"], help=f"default {d['damp_percent']}")
    p.add_argument("--block-size", type=int, default=d["block_size"], help=f"GPTQ lazy block (default {d['block_size']})")
    p.add_argument("--calib-dtype", choices=CALIB_DTYPES, default=d["calib_dtype"],
                   help="dtype of the calibration forward passes; auto: bfloat16 for a bfloat16 checkpoint, "
                        f"else float32 (default {d['calib_dtype']})")
    p.add_argument("--device", default=d["device"], metavar="|".join(DEVICES),
                   help="where layers are calibrated and GPTQ runs; auto: CUDA when available, else the CPU "
                        f"(default {d['device']})")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=d["true_sequential"],
                   help="true-sequential order inside each layer (each input group's Hessian from a pass through "
                        "the already-quantized earlier groups); --no-true-sequential takes every Hessian of a layer "
                        f"from one pass over the unquantized layer (fewer forward passes; default {d['true_sequential']})")
    p.add_argument("--replay-cache-mb", type=float, default=d["replay_cache_mb"], metavar="MIB",
                   help="true-sequential: memory for group inputs kept to replay the finished modules of a layer "
                        "in its later passes instead of recomputing them (same export; 0 turns it off; "
                        f"default {d['replay_cache_mb']:g})")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=d["clip_search"],
                   help="gptq: search each group's scale among ratio x amax (1.0 down to --clip-min-ratio, steps of "
                        f"0.01) for the least diag(H)-weighted rounding error (default {d['clip_search']})")
    p.add_argument("--clip-min-ratio", type=float, default=d["clip_min_ratio"],
                   help=f"smallest clipping ratio searched (default {d['clip_min_ratio']})")
    p.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=d["gptaq"],
                   help="gptq: asymmetric calibration (GPTAQ): fit each linear to the float model's output on "
                        "the quantized model's input; keeps a float copy of the calibration activations "
                        f"(default {d['gptaq']})")
    p.add_argument("--gptaq-alpha", type=float, default=d["gptaq_alpha"],
                   help=f"GPTAQ: share of the correction toward the float outputs, in (0, 1] (default {d['gptaq_alpha']})")
    p.add_argument("--smoothquant", type=float, default=d["smoothquant"], metavar="ALPHA",
                   help=f"{'/'.join(names(lambda s: s.act_bits is not None))}: SmoothQuant with this alpha, "
                        "folded into the preceding norms")
    p.add_argument("--ignore", action="append", default=None, metavar="PATTERN",
                   help=f"HF module-name glob left unquantized (repeatable; default {list(d['ignore'])})")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=SCHEME",
                   help="per-module scheme: 'GLOB=w8a8', 'GLOB=w4a16' or 'GLOB={\"scheme\": \"w4a16\", \"group_size\": 64}' (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    overrides = dict(parse_override(text) for text in args.override)
    return QuantConfig(
        scheme=args.scheme, group_size=args.group_size, method=args.method, format=args.format,
        act_order=args.act_order, damp_percent=args.damp_percent, block_size=args.block_size,
        num_samples=args.num_samples, seqlen=args.seqlen, seed=args.seed, smoothquant=args.smoothquant,
        calib_dtype=args.calib_dtype, true_sequential=args.true_sequential, device=args.device,
        clip_search=args.clip_search, clip_min_ratio=args.clip_min_ratio, replay_cache_mb=args.replay_cache_mb,
        gptaq=args.gptaq, gptaq_alpha=args.gptaq_alpha,
        ignore=tuple(args.ignore) if args.ignore is not None else _DEFAULTS["ignore"], overrides=overrides,
    )


def run(args: argparse.Namespace) -> int:
    from quant.gptq import HessianError
    from quant.imports import unused_modules_hidden

    try:
        config = config_from_args(args)
        with unused_modules_hidden():  # transformers would import sklearn and pandas (quant.imports)
            from quant.pipeline import quantize_checkpoint

            report = quantize_checkpoint(args.model, args.out, config, args.calib, force=args.force,
                                         progress=not args.no_progress)
    except (QuantInputError, HessianError, OverflowError) as exc:  # OverflowError: a scale past its dtype
        raise CLIError(str(exc)) from None
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m quant``: the quantize subcommand as a program of its own (no vLLM import)."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m quant")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    quantize = add_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    args = quantize.parse_args(argv[1:] if argv[:1] == ["quantize"] else argv)
    return run_command("python -m quant", run, args)
