"""``vllm-plugins train-drafter``: train an EAGLE-3 drafter for a target."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from eagle.checks import DrafterError
from eagle.layouts import LAYOUTS
from eagle.train import DEVICES, TrainDrafterConfig, train_drafter
from eagle.vlm_inputs import IMAGE_INPUTS

_HELP = {
    "aux_layer_ids": "target layers whose residual streams the drafter fuses (vLLM ids: 0 = "
                     "embeddings, depth = last layer output); default: vLLM's default, or "
                     "spread over a shallow target",
    "draft_vocab_size": "reduced draft vocabulary (most frequent tokens); default min(vocab, 1024)",
    "ttt_steps": "training-time-test unroll steps K",
    "loss_decay": "loss weight of unroll step i is loss_decay**i",
    "holdout_fraction": "tail of the text kept out of training (for evaluation)",
    "max_text_chars": "read at most this many characters of --data",
    "layout": "checkpoint layout to export",
    "head_dim": "drafter attention head size (vLLM CPU needs 32, 64, ...)",
    "progress": "no progress bar",
    "natural_text": "also train on --data itself (default: only on sequences the target writes)",
    "self_distill_sequences": "sequences the target writes itself (greedy) for training",
    "target_temperature": "softmax temperature of the target's labels (<1 sharpens towards greedy)",
    "image_inputs": "drafter input at image placeholders: embeds, the target's image embeddings "
                    "(served by this package's drafter class); placeholder, the placeholder token's "
                    "embedding (served by vLLM's stock class); none, rows without the image "
                    "(the prompt's text only, as public drafters are trained; stock class)",
    "device": "where the target and the drafter run (auto: cuda if available; bf16 autocast on cuda)",
    "threads": "torch threads on CPU (default 1: fastest for these small matmuls on a shared machine)",
    "seq_len": "text tokens per training sequence (image placeholders come on top)",
    "warmup_steps": "linear learning-rate warmup steps (default: --steps // 8)",
}


_CHOICES = {"layout": LAYOUTS, "image_inputs": IMAGE_INPUTS, "device": DEVICES}


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-drafter",
        help="train an EAGLE-3 drafter for a target model and export it for vLLM",
        description=__doc__,
    )
    p.add_argument("--target", type=Path, required=True, help="target checkpoint directory")
    p.add_argument("--data", type=Path, required=True,
                   help="local text file (blank-line separated) for a text target; for a "
                        "vision-language target a .jsonl of LLaVA-format image conversations")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainDrafterConfig)}
    for field in dataclasses.fields(TrainDrafterConfig):
        name = field.name
        if name in ("target", "data", "out"):
            continue
        flag = "--" + name.replace("_", "-")
        default = defaults[name]
        if name == "aux_layer_ids":
            p.add_argument(flag, type=_ids, default=default, help=_HELP[name])
        elif name in _CHOICES:
            p.add_argument(flag, choices=_CHOICES[name], default=default, help=_HELP[name])
        elif isinstance(default, bool) and default:
            p.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                           help=_HELP.get(name, f"disable {name.replace('_', ' ')}"))
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=f"enable {name.replace('_', ' ')}")
        else:
            kind = float if isinstance(default, float) else int
            p.add_argument(flag, type=kind, default=default, help=_HELP.get(name, f"default {default}"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from quant.errors import CLIError

    names = {f.name for f in dataclasses.fields(TrainDrafterConfig)}
    cfg = TrainDrafterConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        out = train_drafter(cfg)
    except DrafterError as exc:
        raise CLIError(str(exc)) from None
    print(f"drafter written to {out}")
    return 0
