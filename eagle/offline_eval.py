"""Offline evaluation of a trained drafter on a vision-language target, in
plain PyTorch: the same prompts ``scripts/bench_spec_mm.py`` serves, the
target's greedy answers, and the drafter's training-time-test unroll
(:meth:`eagle.torch_drafter.TorchEagle3Drafter.ttt_forward`) on the target's
features. It separates training from serving: a drafter that is good here
and bad in vLLM points to a train/serve mismatch, one that is bad here to a
training problem.

Two figures per task family:

- top-1 agreement with the target per draft step, over every answer
  position (step ``i`` at row ``k`` predicts token ``k + 2 + i``);
- a simulated greedy speculative decode with ``k`` draft tokens: the first
  draft comes from the last prompt row (the row vLLM's drafter prefill ends
  on), each draft is accepted up to its first disagreement and the next one
  starts after the accepted tokens plus the target's bonus token, as vLLM's
  EAGLE proposer does. Mean acceptance length = 1 + accepted / drafts.

    python -m eagle.offline_eval --target VLM --data VLM/heldout.jsonl \\
        --drafter DIR [--drafter DIR ...] [--num-prompts 40] [--k 3]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eagle.layouts import read_drafter
from eagle.torch_drafter import TorchEagle3Drafter
from eagle.vlm_inputs import Example, VLMInputs, collate, vlm_features


def load_torch_drafter(path: Path, target) -> tuple[TorchEagle3Drafter, dict]:
    """A drafter checkpoint as :class:`TorchEagle3Drafter`; embeddings and a
    full-vocabulary lm_head the checkpoint leaves out come from the target,
    as vLLM's proposer shares them."""
    _, flat, state = read_drafter(path)
    n_aux = len(flat["eagle_aux_hidden_state_layer_ids"])
    drafter = TorchEagle3Drafter(flat, n_aux).eval()
    state = dict(state)
    state.setdefault("embed_tokens.weight", target.get_input_embeddings().weight.detach())
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = target.get_output_embeddings().weight.detach()
    if "d2t" not in state:  # full vocabulary: identity
        state["d2t"] = torch.zeros(flat["draft_vocab_size"], dtype=torch.long)
        state["t2d"] = torch.ones(flat["vocab_size"], dtype=torch.bool)
    drafter.load_state_dict(state)
    return drafter, flat


@dataclass
class Served:
    """One held-out prompt as served, with the target's greedy answer."""

    example: Example  # prompt + answer ids
    prompt_len: int
    task: str


@dataclass
class FamilyStats:
    agree: list[int] = field(default_factory=list)  # per step
    total: list[int] = field(default_factory=list)
    drafts: int = 0
    accepted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def mal(self) -> float:
        return 1 + self.accepted / self.drafts if self.drafts else float("nan")


@torch.no_grad()
def served_rows(vlm: VLMInputs, tokenizer, convs, data: Path, tasks: list[str],
                max_tokens: int = 64) -> list[Served]:
    """The prompts as the benchmark builds them and the target's greedy
    answers, up to and including EOS (at most ``max_tokens``)."""
    from eagle.mm_data import load_image

    eos = tokenizer.eos_token_id
    out = []
    for conv, task in zip(convs, tasks):
        pixels, n = vlm.pixels(load_image(data, conv))
        ids, start = vlm.prompt_ids(tokenizer, conv.prompt, n, f"{data} line {conv.line}")
        prompt = Example(ids, start, n, pixels, conv.line)
        new = vlm.target.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=pixels["pixel_values"], max_new_tokens=max_tokens, do_sample=False,
            pad_token_id=eos)[0, len(ids):].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        out.append(Served(Example(ids + new, start, n, pixels, conv.line), len(ids), task))
    return out


@torch.no_grad()
def evaluate(drafter: TorchEagle3Drafter, vlm: VLMInputs, rows: list[Served], aux_ids, k: int,
             image_inputs: str) -> dict[str, FamilyStats]:
    """Per-family :class:`FamilyStats` of ``drafter`` on ``rows``."""
    stats: dict[str, FamilyStats] = {}
    for row in rows:
        s = stats.setdefault(row.task, FamilyStats([0] * k, [0] * k, 0, 0, [0] * k))
        batch = collate([row.example], vlm.qwen, "cpu")
        feats, positions = vlm_features(vlm, batch, aux_ids, image_inputs)
        embeds = feats["embeds"]
        t = embeds.shape[1]
        shifted = torch.cat([embeds, embeds.new_zeros(1, k, embeds.shape[-1])], dim=1)
        outs = drafter.ttt_forward([shifted[:, 1 + i: 1 + i + t] for i in range(k)], feats["aux"],
                                   positions)
        preds = [drafter.target_logits(o)[0].argmax(-1).tolist() for o in outs]
        ids = row.example.ids
        last = len(ids) - 1
        # agreement: step i at row kk predicts ids[kk + 2 + i]; rows from the last prompt row
        for i in range(k):
            for kk in range(row.prompt_len - 1, last - 1 - i):
                s.total[i] += 1
                s.agree[i] += preds[i][kk] == ids[kk + 2 + i]
        for n in simulate_drafts(preds, ids, row.prompt_len, k):
            s.drafts += 1
            s.accepted += n
            for i in range(n):
                s.accepted_per_pos[i] += 1
    return stats


def served_inputs(flat: dict) -> str:
    """What the drafter reads at image positions when vLLM serves it: the
    image embeddings for this package's multimodal class, else (vLLM's stock
    class, which ``placeholder``- and ``none``-trained drafters name) the
    placeholder token's embedding."""
    return "embeds" if flat.get("architectures", [""])[0] == "Eagle3MultimodalLlamaForCausalLM" else "placeholder"


def trained_inputs(path: Path) -> str | None:
    """``train-drafter --image-inputs`` of the checkpoint, when it says."""
    import json

    saved = path / "train_drafter.json"
    return json.loads(saved.read_text()).get("image_inputs") if saved.is_file() else None


def simulate_drafts(preds: list[list[int]], ids: list[int], prompt_len: int, k: int) -> list[int]:
    """Accepted tokens of each draft of a greedy speculative decode of
    ``ids`` (prompt, then the target's answer): ``preds[i][row]`` is the
    drafter's step-``i`` guess at ``row`` (for token ``row + 2 + i``). The
    first draft starts at the last prompt row; after ``n`` accepted tokens
    the target adds its bonus token and the next draft starts ``n + 1``
    rows on. Drafting stops when no token is left to draft."""
    last = len(ids) - 1
    row, out = prompt_len - 1, []
    while row + 2 <= last:
        n = 0
        while n < k and row + 2 + n <= last and preds[n][row] == ids[row + 2 + n]:
            n += 1
        out.append(n)
        row += n + 1
    return out


def table(results: dict[str, dict[str, FamilyStats]], k: int) -> str:
    fams = sorted({f for r in results.values() for f in r})
    lines = ["| drafter | family | " + " | ".join(f"top-1 step {i}" for i in range(k))
             + " | sim. acceptance | " + " | ".join(f"acc. pos {i}" for i in range(k)) + " |",
             "|---" * (3 + 2 * k) + "|"]
    for name, res in results.items():
        means = []
        for f in fams:
            s = res[f]
            means.append(s.mal())
            lines.append(f"| {name} | {f} | " + " | ".join(
                f"{a / n:.3f}" if n else "nan" for a, n in zip(s.agree, s.total))
                + f" | {s.mal():.2f} | " + " | ".join(
                f"{a / s.drafts:.2f}" if s.drafts else "nan" for a in s.accepted_per_pos) + " |")
        lines.append(f"| {name} | mean over families | " + " | ".join("" for _ in range(k))
                     + f" | {sum(means) / len(means):.2f} | " + " | ".join("" for _ in range(k)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import json

    from transformers import AutoTokenizer

    from eagle.mm_data import read_conversations
    from eagle.train import load_target

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="held-out jsonl (with a \"task\" per row)")
    p.add_argument("--drafter", type=Path, action="append", required=True)
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    target = load_target(args.target)
    tok = AutoTokenizer.from_pretrained(args.target)
    vlm = VLMInputs(target, args.target)
    convs = read_conversations(args.data)[: args.num_prompts]
    raw = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    tasks = [r.get("task", "all") for r in raw][: len(convs)]
    rows = served_rows(vlm, tok, convs, args.data, tasks, args.max_tokens)
    results = {}
    for path in args.drafter:
        drafter, flat = load_torch_drafter(path, target)
        mode = served_inputs(flat)
        trained = trained_inputs(path)
        label = mode if trained in (None, mode) else f"trained {trained}, served {mode}"
        results[f"{path.name} ({label})"] = evaluate(drafter, vlm, rows, flat["eagle_aux_hidden_state_layer_ids"],
                                                    args.k, mode)
    print(table(results, args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
