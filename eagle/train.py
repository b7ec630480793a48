"""Train an EAGLE-3 drafter for a target and export a checkpoint vLLM loads.

Pipeline: read local text, tokenise it with the target's tokenizer, hold out
the tail, pick the draft vocabulary from token frequencies (``d2t``/``t2d``),
then for each batch run the frozen Hugging Face target for its features
(:mod:`eagle.features`) and train :class:`TorchEagle3Drafter` with the
training-time-test unroll, step ``i`` weighted ``loss_decay ** i``, against
the target's own next-token distribution restricted to the draft vocabulary.

A vision-language target trains from a LLaVA-format jsonl of image
conversations instead (:mod:`eagle.mm_data`, :mod:`eagle.vlm_inputs`):
responses the target writes given the image, placeholder positions out of
the loss, and at those positions the drafter reads the target's image
embeddings (``--image-inputs embeds``, what
:class:`eagle.drafter.Eagle3MultimodalLlamaForCausalLM` is fed at serve time)
or the placeholder token's embedding (``placeholder``, the baseline that
vLLM's stock drafter class serves). ``none`` trains on text only, as public
drafters are: the same self-distilled responses, but each row's prompt is the
human turn's text without the image (no placeholders, no pixels, the target's
features computed on the text alone); it is served by the stock class too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from eagle.checks import DrafterError, check_aux_layer_ids, check_finite, check_target_checkpoint, check_vocab
from eagle.features import decoder_stack, default_aux_layer_ids, target_features
from eagle.layouts import DRAFTER_ARCH, LAYOUTS, STOCK_ARCH, write_drafter
from eagle.mm_data import is_jsonl, read_conversations
from eagle.torch_drafter import TorchEagle3Drafter
from eagle.vlm_inputs import IMAGE_INPUTS, VLMInputs, build_examples, collate, label_mask, vlm_features
from models.training import optimizer_step, warmup_cosine
from quant.outdir import is_taken, staged_output_dir


DEVICES = ("auto", "cpu", "cuda")
STOCK_IMAGE_INPUTS = ("placeholder", "none")  # exported for vLLM's stock Eagle3LlamaForCausalLM


@dataclass
class TrainDrafterConfig:
    """Every default of ``train-drafter``; the CLI reads them from here."""

    target: Path
    data: Path
    out: Path
    aux_layer_ids: tuple[int, ...] | None = None  # None: vLLM's default, or spread for shallow targets
    draft_vocab_size: int | None = None  # None: min(target vocab, 1024)
    ttt_steps: int = 3
    loss_decay: float = 0.8
    target_temperature: float = 0.1  # softmax temperature of the target's labels
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 1600  # 800 gave mean acceptance 2.00, 1600 gave 2.14 (TinyStories-656K, K=3)
    lr: float = 1e-2
    # None: steps // 8. 20 steps of warmup at lr 1e-2 let the drafter's attention lock onto wrong
    # image rows early on (grid read-out acceptance 1.72 vs 4.00 with 200, same seed; issue 12).
    warmup_steps: int | None = None
    head_dim: int = 32
    num_attention_heads: int | None = None  # None: hidden_size // head_dim
    intermediate_size: int | None = None  # None: the target's
    holdout_fraction: float = 0.1
    self_distill_sequences: int = 4096  # training sequences the target writes itself (greedy)
    self_distill_prompt_len: int = 16
    natural_text: bool = False  # also train on the text itself, not only on self-distilled sequences
    max_text_chars: int | None = None
    layout: str = "specforge"
    input_embeds_norm: bool = False
    fused_hidden_norm: bool = False
    seed: int = 0
    # torch threads of training: 1 by default, as training's small matmuls gain little from more
    # and slow down up to 40x when another process shares the cores (issue 15).
    threads: int = 1
    progress: bool = True
    image_inputs: str = "embeds"  # drafter input at image placeholders: embeds | placeholder | none (text only)
    device: str = "auto"  # auto | cpu | cuda (bf16 autocast on CUDA)

    def validate(self) -> None:
        """Raise :class:`DrafterError` naming the option at fault."""
        if not (self.target / "config.json").is_file():
            raise DrafterError(f"--target {self.target}: no config.json")
        check_target_checkpoint(self.target)
        if not self.data.is_file():
            raise DrafterError(f"--data {self.data}: no such file")
        if is_taken(self.out):
            raise DrafterError(f"--out {self.out}: exists and is not empty")
        if self.layout not in LAYOUTS:
            raise DrafterError(f"--layout {self.layout!r}: expected one of {LAYOUTS}")
        if self.image_inputs not in IMAGE_INPUTS:
            raise DrafterError(f"--image-inputs {self.image_inputs!r}: expected one of {IMAGE_INPUTS}")
        if self.device not in DEVICES:
            raise DrafterError(f"--device {self.device!r}: expected one of {DEVICES}")
        if self.image_inputs in STOCK_IMAGE_INPUTS and (self.input_embeds_norm or self.fused_hidden_norm):
            raise DrafterError(f"--image-inputs {self.image_inputs} exports for vLLM's stock drafter class, "
                               "which has no --input-embeds-norm / --fused-hidden-norm")
        for flag, value, low in (
            ("--ttt-steps", self.ttt_steps, 1), ("--seq-len", self.seq_len, 8),
            ("--batch-size", self.batch_size, 1), ("--steps", self.steps, 1),
            ("--head-dim", self.head_dim, 8), ("--threads", self.threads, 1),
        ):
            if value < low:
                raise DrafterError(f"{flag} {value}: must be at least {low}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise DrafterError(f"--warmup-steps {self.warmup_steps}: must be at least 0")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise DrafterError(f"--draft-vocab-size {self.draft_vocab_size}: must be at least 1")
        if not 0 < self.target_temperature < math.inf:
            raise DrafterError(f"--target-temperature {self.target_temperature}: must be positive "
                               "(the target's labels are softmax(logits / temperature))")
        if not 0 < self.loss_decay <= 1:
            raise DrafterError(f"--loss-decay {self.loss_decay}: must be in (0, 1]")
        if not 0 < self.holdout_fraction < 1:
            raise DrafterError(f"--holdout-fraction {self.holdout_fraction}: must be in (0, 1)")


def text_config(config) -> object:
    return getattr(config, "text_config", None) or config


def split_text(path: Path, holdout_fraction: float, max_chars: int | None = None):
    """Blank-line separated passages: ``(train, held_out)``, the held-out
    part being the tail of the file."""
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise DrafterError(f"--data {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if max_chars:
        text = text[:max_chars]
    passages = [p.strip() for p in text.split("\n\n") if p.strip()]
    cut = int(len(passages) * (1 - holdout_fraction))
    return passages[:cut], passages[cut:]


def token_stream(tokenizer, passages: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for p in passages:
        ids.extend(tokenizer(p)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def draft_vocab(tokens: torch.Tensor, vocab_size: int, draft_vocab_size: int):
    """The ``draft_vocab_size`` most frequent target ids (ties: lower id
    first), ascending; returns ``(ids, d2t, t2d)``."""
    counts = torch.bincount(tokens, minlength=vocab_size).double()
    # Stable ranking: frequency first, then the lower id.
    order = sorted(range(vocab_size), key=lambda i: (-counts[i].item(), i))
    ids = torch.tensor(sorted(order[:draft_vocab_size]), dtype=torch.long)
    d2t = ids - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return ids, d2t, t2d


def drafter_config(cfg: TrainDrafterConfig, target_cfg, aux_ids, draft_vocab_size: int) -> dict:
    tc = text_config(target_cfg)
    hidden = tc.hidden_size
    if hidden % cfg.head_dim and not cfg.num_attention_heads:
        raise DrafterError(f"--head-dim {cfg.head_dim}: does not divide hidden size {hidden}")
    heads = cfg.num_attention_heads or hidden // cfg.head_dim
    # Same number of KV heads as the target where possible: equal KV-cache
    # page sizes for target and drafter layers.
    kv = tc.num_key_value_heads if heads % tc.num_key_value_heads == 0 else heads
    rope = getattr(tc, "rope_parameters", None) or {}
    section = rope.get("mrope_section")
    if section and 2 * sum(section) != cfg.head_dim:
        raise DrafterError(f"--head-dim {cfg.head_dim}: the target's M-RoPE sections {list(section)} "
                           f"need head dim {2 * sum(section)}")
    return {
        "hidden_size": hidden,
        "intermediate_size": cfg.intermediate_size or tc.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": tc.rms_norm_eps,
        "vocab_size": tc.vocab_size,
        "draft_vocab_size": draft_vocab_size,
        "max_position_embeddings": tc.max_position_embeddings,
        "rope_theta": rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0)),
        "rope_parameters": rope or None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": tc.bos_token_id,
        "eos_token_id": tc.eos_token_id,
        "target_hidden_size": hidden,
        "eagle_aux_hidden_state_layer_ids": list(aux_ids),
        "input_embeds_norm": cfg.input_embeds_norm,
        "fused_hidden_norm": cfg.fused_hidden_norm,
        "torch_dtype": "float32",
    }


def init_drafter(dcfg: dict, target, ids: torch.Tensor, num_aux: int) -> TorchEagle3Drafter:
    """Random layer; embeddings, final norm and lm_head rows from the target."""
    drafter = TorchEagle3Drafter(dcfg, num_aux)
    for name, p in drafter.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    _, norm = decoder_stack(target)
    hidden = dcfg["hidden_size"]
    with torch.no_grad():
        # Start from "the deepest aux state is the answer": the right logit
        # scale from step one (the deepest id is last in vLLM's order).
        drafter.fc.weight[:, -hidden:] += torch.eye(hidden)
        drafter.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        drafter.lm_head.weight.copy_(target.get_output_embeddings().weight[ids])
        drafter.norm.weight.copy_(norm.weight)
        drafter.d2t.copy_(ids - torch.arange(ids.numel()))
        drafter.t2d[ids] = True
    return drafter


def ttt_loss(drafter, feats, ids: torch.Tensor, steps: int, decay: float,
             temperature: float = 1.0, positions: torch.Tensor | None = None,
             mask: torch.Tensor | None = None):
    """Sum over steps of ``decay**i`` times the soft cross-entropy between the
    draft at index ``k`` of step ``i`` and the target's distribution for
    position ``k + 1 + i`` (restricted to the draft vocabulary); also
    returns step-0 top-1 agreement. ``temperature`` below 1 sharpens the
    target's distribution towards its argmax (what greedy decoding accepts).
    ``positions``: ``[B, T]`` or M-RoPE ``[3, B, T]`` (default ``0..T-1``);
    ``mask`` ``[B, T]``: positions whose token is a training label (default all)."""
    embeds, aux, logits = feats["embeds"], feats["aux"], feats["logits"]
    b, t, _ = embeds.shape
    pad = embeds.new_zeros(b, steps, embeds.shape[-1])
    shifted = torch.cat([embeds, pad], dim=1)
    inputs = [shifted[:, 1 + i: 1 + i + t] for i in range(steps)]
    if positions is None:
        positions = torch.arange(t, device=embeds.device).expand(b, t)
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=embeds.device)
    outs = drafter.ttt_forward(inputs, aux, positions)
    target_probs = torch.softmax(logits[..., ids].float() / temperature, dim=-1)
    total, acc = 0.0, 0.0
    for i, out in enumerate(outs):
        valid = t - 1 - i
        tp = target_probs[:, 1 + i: 1 + i + valid]
        m = mask[:, 1 + i: 1 + i + valid]
        if not m.any():
            continue
        logp = F.log_softmax(out[:, :valid].float(), dim=-1)
        total = total + decay ** i * -(tp * logp).sum(-1)[m].mean()
        if i == 0:
            acc = (out[:, :valid].argmax(-1) == tp.argmax(-1))[m].float().mean().item()
    return total, acc


def is_vlm(target) -> bool:
    return getattr(target.config, "vision_config", None) is not None


@torch.no_grad()
def self_distill(target, tokenizer, passages: list[str], cfg: TrainDrafterConfig) -> torch.Tensor:
    """Sequences of ``seq_len`` tokens: a passage's first tokens, then the
    target's greedy continuation, which is what a drafter sees at serving."""
    from tqdm import tqdm

    plen = cfg.self_distill_prompt_len
    prompts = []
    for p in passages:
        ids = tokenizer(p)["input_ids"]
        if len(ids) >= plen:
            prompts.append(ids[:plen])
        if len(prompts) == cfg.self_distill_sequences:
            break
    out = []
    batch = 128
    for start in tqdm(range(0, len(prompts), batch), desc="self-distill", disable=not cfg.progress):
        x = torch.tensor(prompts[start: start + batch], device=target.device)
        g = target.generate(x, max_new_tokens=cfg.seq_len - plen, min_new_tokens=cfg.seq_len - plen,
                            do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(g[:, : cfg.seq_len])
    return torch.cat(out)


def load_target(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    model, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise DrafterError(f"--target {path}: the checkpoint has no weights for {len(missing)} of the model's "
                           f"tensors (e.g. {missing[0]}); a drafter needs the float target")
    return model.eval().requires_grad_(False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DrafterError("--device cuda: no CUDA device is available")
    return torch.device(name)


def text_batches(target, tokenizer, cfg: TrainDrafterConfig, device):
    """``(training tokens, draw(gen) -> (feats, positions, mask))`` for a text target."""
    train_passages, _ = split_text(cfg.data, cfg.holdout_fraction, cfg.max_text_chars)
    tokens = token_stream(tokenizer, train_passages)
    n_chunks = tokens.numel() // cfg.seq_len
    if n_chunks < cfg.batch_size:
        raise DrafterError(f"--data {cfg.data}: too little text for one batch")
    chunks = tokens[: n_chunks * cfg.seq_len].view(n_chunks, cfg.seq_len)
    if cfg.self_distill_sequences:
        distilled = self_distill(target, tokenizer, train_passages, cfg).cpu()
        chunks = torch.cat([chunks, distilled]) if cfg.natural_text else distilled

    def draw(aux_ids, gen):
        batch = chunks[torch.randint(0, chunks.shape[0], (cfg.batch_size,), generator=gen)]
        return target_features(target, batch.to(device), aux_ids), None, None

    return tokens, draw


def image_batches(target, tokenizer, cfg: TrainDrafterConfig, device):
    """The same for a vision-language target and a jsonl of image conversations."""
    if not is_jsonl(cfg.data):
        raise DrafterError(f"--data {cfg.data}: a vision-language target trains from a .jsonl of "
                           "image conversations (LLaVA format)")
    vlm = VLMInputs(target, cfg.target)
    convs = read_conversations(cfg.data)
    rows = build_examples(vlm, tokenizer, convs, cfg.data, seq_len=cfg.seq_len,
                          distill=cfg.self_distill_sequences, natural_text=cfg.natural_text,
                          progress=cfg.progress, text_only=cfg.image_inputs == "none")
    tokens = torch.tensor([t for r in rows for t in r.text_ids()], dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def draw(aux_ids, gen):
        picked = torch.randint(0, len(rows), (cfg.batch_size,), generator=gen).tolist()
        batch = collate([rows[i] for i in picked], vlm.qwen, device, pad)
        feats, positions = vlm_features(vlm, batch, aux_ids, cfg.image_inputs)
        return feats, positions, label_mask(batch, vlm.image_token_id)

    return tokens, draw


def train_drafter(cfg: TrainDrafterConfig) -> Path:
    """Train and export; returns ``cfg.out``. Writes nothing on bad input."""
    cfg.validate()
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or 1)
    try:
        return _train(cfg, device)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainDrafterConfig, device: torch.device) -> Path:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    torch.manual_seed(cfg.seed)
    target = load_target(cfg.target)
    tc = text_config(target.config)
    layers, _ = decoder_stack(target)
    aux_ids = tuple(cfg.aux_layer_ids) if cfg.aux_layer_ids else default_aux_layer_ids(len(layers))
    check_aux_layer_ids(aux_ids, len(layers), "--aux-layer-ids")
    if len(aux_ids) != 3:
        raise DrafterError(f"--aux-layer-ids {list(aux_ids)}: EAGLE-3 fuses exactly 3 layers")
    dvs = cfg.draft_vocab_size if cfg.draft_vocab_size is not None else min(tc.vocab_size, 1024)
    check_vocab(dvs, tc.vocab_size, "--draft-vocab-size")
    dcfg = drafter_config(cfg, target.config, aux_ids, dvs)  # checks --head-dim early
    target.to(device)

    tokenizer = AutoTokenizer.from_pretrained(cfg.target)
    if not is_vlm(target) and is_jsonl(cfg.data):
        raise DrafterError(f"--data {cfg.data}: image conversations need a vision-language --target")
    batches = image_batches if is_vlm(target) else text_batches
    tokens, draw = batches(target, tokenizer, cfg, device)
    ids, _, _ = draft_vocab(tokens, tc.vocab_size, dvs)

    drafter = init_drafter(dcfg, target, ids, len(aux_ids)).to(device)
    ids = ids.to(device)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 8

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, cfg.steps, floor=0.05))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="train-drafter", disable=not cfg.progress, unit="step")
    for _ in bar:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats, positions, mask = draw(aux_ids, gen)
            loss, acc = ttt_loss(drafter, feats, ids, cfg.ttt_steps, cfg.loss_decay,
                                 cfg.target_temperature, positions, mask)
        optimizer_step(loss, opt, sched, params, max_grad_norm=1.0)
        bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{acc:.2f}")
    return export(drafter.cpu(), dcfg, cfg, tokenizer)


def export(drafter: TorchEagle3Drafter, dcfg: dict, cfg: TrainDrafterConfig, tokenizer) -> Path:
    """Write atomically: a temporary sibling directory renamed into place.

    A full-vocabulary drafter is written without ``d2t``/``t2d`` (the
    identity), which is how vLLM's stock ``Eagle3LlamaForCausalLM`` expects
    it (``draft_vocab_size == vocab_size``, no mapping tensor). A
    ``placeholder``- or ``none``-trained drafter names vLLM's stock class,
    which reads the placeholder token's embedding at image positions."""
    state = {k: v.detach().clone() for k, v in drafter.state_dict().items()}
    check_finite(state, f"training diverged; nothing was written to --out {cfg.out}")
    if dcfg["draft_vocab_size"] == dcfg["vocab_size"]:
        state.pop("d2t")
        state.pop("t2d")
    arch = STOCK_ARCH if cfg.image_inputs in STOCK_IMAGE_INPUTS else DRAFTER_ARCH
    with staged_output_dir(cfg.out) as tmp:
        write_drafter(tmp, state, dcfg, cfg.layout, architecture=arch, verifier=str(cfg.target),
                      speculative_tokens=cfg.ttt_steps)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_drafter.json").write_text(json.dumps(
            {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
            indent=2) + "\n")
    return cfg.out
