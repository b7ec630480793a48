"""The main job's default model: a small Llama trained here, in seconds.

``vllm-plugins demo-model --out DIR`` builds a Llama with
:func:`models.tiny.build_tiny_llama` (head size 64, which vLLM's CPU
attention supports; sizes divisible by 128 so every W4A16 group size works),
trains it briefly on :func:`models.tiny.synthetic_corpus` (each story's
closing word is its one thing, named in every sentence, so the main job's
last-word accuracy measures something: 1.000 on ``heldout.txt`` after the
default 200 steps, 0.125 with the earlier corpus), and writes next to
the checkpoint two text files from the same generator with other seeds:
``calib.txt`` (calibration) and ``heldout.txt`` (evaluation). Nothing is
downloaded and nothing is read from ``../shared``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    vocab_size: int = 512
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError("steps >= 0, batch_size >= 1 and seq_len >= 8 are required")


def _token_stream(tokenizer, texts: list[str]):
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text).input_ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def build_demo_model(out_dir: str | Path, config: DemoConfig = DemoConfig(), progress: bool = True) -> Path:
    """Build, train and save the demo model atomically into ``out_dir``."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    from models.tiny import build_tiny_llama, synthetic_corpus
    from models.training import optimizer_step
    from quant.outdir import is_taken, staged_output_dir

    out = Path(out_dir)
    if is_taken(out):
        raise FileExistsError(f"{out} already exists")
    with staged_output_dir(out) as tmp:
        build_tiny_llama(
            tmp,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            vocab_size=config.vocab_size,
            initializer_range=0.02,
            seed=config.seed,
        )
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        stream = _token_stream(tokenizer, synthetic_corpus(2000, seed=config.seed))
        gen = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(config.steps, 1))
        model.train()
        bar = tqdm(range(config.steps), desc="train demo model", disable=not progress)
        for _ in bar:
            starts = torch.randint(0, len(stream) - config.seq_len - 1, (config.batch_size,), generator=gen)
            batch = torch.stack([stream[s : s + config.seq_len] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            optimizer_step(loss, opt, sched)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "calib.txt").write_text("\n\n".join(synthetic_corpus(256, seed=config.seed + 1)) + "\n")
        (tmp / "heldout.txt").write_text("\n\n".join(synthetic_corpus(128, seed=config.seed + 2)) + "\n")
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    defaults = DemoConfig()
    p = subparsers.add_parser(
        "demo-model",
        help="build and briefly train the main job's default Llama (no download)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed (default %(default)s)")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from quant.errors import CLIError
    from quant.outdir import is_taken

    if is_taken(args.out):
        raise CLIError(f"--out {args.out} already exists")
    try:
        config = DemoConfig(**{**asdict(DemoConfig()), "steps": args.steps, "seed": args.seed})
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    start = time.monotonic()
    build_demo_model(args.out, config)
    print(f"demo model written to {args.out} in {time.monotonic() - start:.0f}s")
    return 0
