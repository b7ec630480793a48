"""``vllm-plugins convert SRC OUT``: make a LLaMA-variant checkpoint.

- ``SRC`` a Hugging Face Llama directory (``model_type`` ``llama``): OUT is a
  copy whose ``config.json`` alone is rewritten (``model_type``
  ``llama_variant``, architecture ``LlamaVariantForCausalLM``); the weights
  are copied byte for byte.
- ``SRC`` a llama2.c ``.bin`` checkpoint: OUT is a variant checkpoint in
  safetensors with interleaved-RoPE wq/wk rows permuted to transformers'
  layout, plus a ``tokenizer.json`` built from the llama2.c tokenizer
  (``--tokenizer``, default: the single ``tok*.bin`` next to SRC).

OUT must not exist (or be an empty directory); it is written to a
temporary sibling and renamed at the end, so a failure leaves no partial
directory. SRC is never modified.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from models.llama_variant_config import ARCHITECTURE, MODEL_TYPE
from quant.errors import CLIError
from quant.outdir import is_taken, staged_output_dir


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "convert",
        help="convert a HF Llama directory or a llama2.c .bin to a LLaMA-variant checkpoint",
        description=__doc__,
    )
    parser.add_argument("source", type=Path, help="HF Llama checkpoint directory or llama2.c .bin file")
    parser.add_argument("output", type=Path, help="new checkpoint directory (must not exist or be empty)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="llama2.c tokenizer .bin (llama2.c sources only; default: the tok*.bin next to SOURCE)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    source, output = args.source, args.output
    if is_taken(output):
        raise CLIError(f"output {output} already exists")
    if source.is_dir():
        if args.tokenizer is not None:
            raise CLIError("--tokenizer applies to llama2.c .bin sources only")
        with staged_output_dir(output) as tmp:
            convert_hf_llama(source, tmp)
            _check_finite(tmp, source, output)
    elif source.is_file():
        tokenizer = args.tokenizer or _find_llama2c_tokenizer(source)
        if not tokenizer.is_file():
            raise CLIError(f"tokenizer {tokenizer} not found")
        with staged_output_dir(output) as tmp:
            convert_llama2c(source, tokenizer, tmp)
            _check_finite(tmp, source, output)
    else:
        raise CLIError(f"source {source} not found")
    print(f"wrote {output}")
    return 0


def _check_finite(staged: Path, source: Path, output: Path) -> None:
    """No NaN or Inf in the converted weights, before ``output`` is published."""
    from quant.checkpoint import find_non_finite
    from quant.errors import QuantInputError

    try:
        bad = find_non_finite(staged)
    except QuantInputError as exc:
        raise CLIError(str(exc).replace(str(staged), str(source))) from None
    if bad is not None:
        raise CLIError(f"{source}: tensor {bad[1]} has NaN or Inf values; {output} was not written")


def _find_llama2c_tokenizer(checkpoint: Path) -> Path:
    found = sorted(checkpoint.parent.glob("tok*.bin"))
    if len(found) != 1:
        raise CLIError(
            f"pass --tokenizer: expected one tok*.bin next to {checkpoint}, found {[p.name for p in found]}"
        )
    return found[0]


def convert_hf_llama(source: Path, out: Path) -> None:
    """Copy a HF Llama checkpoint into ``out`` with only config.json rewritten."""
    from models.llama_variant_config import LlamaVariantConfig

    config_path = source / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"{config_path}: cannot read a JSON config ({exc})") from exc
    if config.get("model_type") != "llama":
        raise CLIError(f"{config_path}: model_type is {config.get('model_type')!r}, expected 'llama'")
    config.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE])
    try:
        LlamaVariantConfig.from_dict(dict(config))  # validates the variant's options
    except (ValueError, TypeError) as exc:
        raise CLIError(f"{config_path}: not a valid llama_variant config: {exc}") from exc
    for item in source.iterdir():
        if item.name == "config.json":
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def convert_llama2c(checkpoint: Path, tokenizer: Path, out: Path) -> None:
    """Write a llama_variant safetensors checkpoint and tokenizer from llama2.c files."""
    import torch

    from models import llama2c
    from models.llama_variant_config import LlamaVariantConfig
    from models.llama_variant_hf import LlamaVariantForCausalLM

    try:
        header, tensors = llama2c.read_tensors(checkpoint)
        theta = llama2c.rope_theta(header, tensors)
        pieces = llama2c.read_tokenizer(tokenizer, header.vocab_size)
        hf_tokenizer = llama2c.build_tokenizer(pieces, model_max_length=header.seq_len)
    except llama2c.Llama2cError as exc:
        raise CLIError(str(exc)) from exc

    config = LlamaVariantConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_size,
        max_position_embeddings=header.seq_len,
        rms_norm_eps=llama2c.NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        architectures=[ARCHITECTURE],
        dtype="float32",
    )
    with torch.device("meta"):
        model = LlamaVariantForCausalLM(config)
    state = {k: torch.from_numpy(v.copy()) for k, v in llama2c.hf_state_dict(header, tensors).items()}
    model.load_state_dict(state, strict=True, assign=True)
    if header.shared_classifier:
        model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer.save_pretrained(out)
