"""Calibration samples from a local ``.txt`` or ``.jsonl`` file.

``.txt``: documents separated by blank lines. ``.jsonl``: one JSON object per
line with a ``text`` field (or a bare JSON string). Documents are tokenized,
joined with the EOS token and ``num_samples`` windows of ``seqlen`` tokens
are drawn at seeded random offsets (as GPTQ samples C4); a file shorter than
``num_samples * seqlen`` tokens gives fewer, non-overlapping windows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from quant.errors import QuantInputError


def read_documents(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        raise QuantInputError(f"--calib {path}: is a directory; expected a .txt or .jsonl file")
    if not path.is_file():
        raise QuantInputError(f"--calib {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantInputError(f"--calib {path}:{lineno}: invalid JSON ({exc.msg})") from None
            doc = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(doc, str):
                raise QuantInputError(f"--calib {path}:{lineno}: expected a string or an object with a 'text' string")
            docs.append(doc)
    elif path.suffix in (".txt", ""):
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n")]
    else:
        raise QuantInputError(f"--calib {path}: expected a .txt or .jsonl file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise QuantInputError(f"--calib {path}: the calibration file is empty")
    return docs


# Llama-family checkpoints whose tokenizer_config.json names one of these classes load it directly, as
# AutoTokenizer would (tests/quant/test_llama_layers.py compares them): importing AutoTokenizer's module
# imports transformers' model code, and torch._dynamo with it (quant.llama_layers).
_DIRECT_MODEL_TYPES = ("llama", "llama_variant")
_DIRECT_TOKENIZERS = {"LlamaTokenizer": "LlamaTokenizer", "LlamaTokenizerFast": "LlamaTokenizer",
                      "TokenizersBackend": "TokenizersBackend", "PreTrainedTokenizerFast": "TokenizersBackend"}


def _direct_tokenizer_class(model_dir: Path):
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        tokenizer_config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(tokenizer_config, dict):
        return None
    model_type = config.get("model_type")
    name = _DIRECT_TOKENIZERS.get(tokenizer_config.get("tokenizer_class"))
    if model_type not in _DIRECT_MODEL_TYPES or name is None or "auto_map" in tokenizer_config:
        return None
    import transformers

    return getattr(transformers, name)


def load_tokenizer(model_dir: Path):
    try:
        direct = _direct_tokenizer_class(model_dir)
        if direct is not None:
            return direct.from_pretrained(str(model_dir))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise QuantInputError(f"--model {model_dir}: cannot load its tokenizer ({exc})") from None


def calibration_samples(path: str | Path, tokenizer, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """int64 ``[n, seqlen]`` token windows, ``n <= num_samples``."""
    docs = read_documents(path)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    if len(ids) < seqlen:
        raise QuantInputError(f"--calib {path}: {len(ids)} tokens, fewer than --seqlen {seqlen}")
    tokens = torch.tensor(ids, dtype=torch.int64)
    n_windows = len(ids) // seqlen
    if n_windows <= num_samples:
        starts = [i * seqlen for i in range(n_windows)]
    else:
        rng = random.Random(seed)
        starts = [rng.randrange(0, len(ids) - seqlen + 1) for _ in range(num_samples)]
    return torch.stack([tokens[s:s + seqlen] for s in starts])
