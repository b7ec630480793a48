"""Tiny LLaMA checkpoints built locally, with no download.

Used by the tests and by the README's main job. Everything is derived from a
seed: a synthetic story corpus, a byte-level BPE tokenizer trained on it, and
a random-weight ``LlamaForCausalLM`` saved as safetensors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

_NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Sue", "Tim", "Zoe"]
_THINGS = ["ball", "cat", "dog", "tree", "box", "cake", "kite", "boat", "bird", "hat"]
_ADJ = ["red", "big", "small", "happy", "old", "shiny", "soft", "blue", "funny", "sad"]
_VERBS = ["found", "saw", "liked", "lost", "made", "took", "wanted", "shared", "hid", "drew"]
_PLACES = ["park", "garden", "house", "school", "forest", "beach", "shop", "farm"]


def synthetic_corpus(num_stories: int = 400, seed: int = 0) -> list[str]:
    """Short templated stories, one string each; deterministic in ``seed``."""
    rng = random.Random(seed)
    stories = []
    for _ in range(num_stories):
        a, b = rng.sample(_NAMES, 2)
        sentences = [f"Once upon a time, {a} went to the {rng.choice(_PLACES)}."]
        # Every sentence is about the story's one thing, so its closing
        # word can be read off the story (a copy, not a guess).
        thing = rng.choice(_THINGS)
        first = None
        for _ in range(rng.randint(3, 7)):
            adj = rng.choice(_ADJ)
            first = first or adj
            sentences.append(
                f"{rng.choice([a, b])} {rng.choice(_VERBS)} a {adj} {thing} in the {rng.choice(_PLACES)}."
            )
        sentences.append(f"In the end, {a} gave {b} the {first} {thing}.")
        stories.append(" ".join(sentences))
    return stories


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, seed: int = 0,
                    texts: list[str] | None = None):
    """Train a byte-level BPE on ``texts`` (default :func:`synthetic_corpus`) and save it.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with a chat template)
    and ``special_tokens_map.json``; returns the transformers tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed) if texts is None else texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.add_bos_token = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    # transformers writes add_bos_token only for some tokenizer classes; make
    # the BOS behaviour explicit so HF and vLLM tokenize identically.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False, model_max_length=2048)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.2,
    torch_dtype: str = "float32",
    seed: int = 0,
    model_type: str = "llama",
    **config_overrides,
) -> Path:
    """Save a random-weight ``LlamaForCausalLM`` with a local tokenizer.

    ``model_type="llama_variant"`` saves the LLaMA variant instead
    (:mod:`models.llama_variant_hf`); its options go in ``config_overrides``
    (e.g. ``qk_norm=True``, ``partial_rotary_factor=0.5``).

    ``initializer_range`` defaults high (0.2) so that logits are peaked and
    greedy decoding is decisive, which makes token-exact comparisons stable.
    The head size is ``hidden_size // num_attention_heads`` unless given;
    vLLM's CPU attention needs it in {32, 64, 80, ...}.
    Returns ``out_dir``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_type == "llama":
        config_cls, model_cls = LlamaConfig, LlamaForCausalLM
    elif model_type == "llama_variant":
        from models.llama_variant_config import LlamaVariantConfig as config_cls
        from models.llama_variant_hf import LlamaVariantForCausalLM as model_cls
    else:
        raise ValueError(f"model_type must be 'llama' or 'llama_variant', got {model_type!r}")

    out = Path(out_dir)
    tokenizer = build_tokenizer(out, vocab_size=vocab_size, seed=seed)
    config = config_cls(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim or hidden_size // num_attention_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        **config_overrides,
    )
    torch.manual_seed(seed)
    if model_type != "llama":
        config.architectures = [model_cls.__name__]
    model = model_cls(config).to(getattr(torch, torch_dtype))
    with torch.no_grad():
        # Norm weights start at 1 and biases at 0; perturb them so that a
        # wrong norm or a dropped bias is visible.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out, safe_serialization=True)
    return out
