"""Datasets for the local lm-eval tasks, built at run time from ``../shared/data``.

lm-eval calls these through ``custom_dataset: !function data.<name>`` with the
task's ``metadata`` as keyword arguments; ``shared_dir`` comes from
:func:`vllm_plugins.evaluation.runner.task_manager`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TINYSTORIES = "tinystories_val.txt"
WIKITEXT = "wikitext2_test.txt"
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s(?P<word>[A-Za-z]+)[.!?]$", re.S)
_HEADING = re.compile(r"^ = [^=].* = $")


def shared_data(shared_dir: str | os.PathLike | None, name: str) -> Path:
    base = Path(shared_dir or os.environ.get("VLLM_PLUGINS_SHARED", "../shared"))
    path = base / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --shared-dir (or set VLLM_PLUGINS_SHARED)")
    return path


def last_word_rows(text: str, min_words: int = 15) -> list[dict]:
    """Held-out TinyStories paragraphs ending in ``word.``: context and next (last) word."""
    rows = []
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text)]
    for block in blocks[1:-1]:  # the file's first and last blocks may be cut mid-story
        m = _LAST_WORD.match(block)
        if m and len(block.split()) >= min_words and '"' not in block[-3:]:
            rows.append({"context": m["context"], "target": " " + m["word"]})
    return rows


def wikitext_documents(text: str) -> list[dict]:
    """wikitext-2 raw split into articles at the `` = Title = `` headings, as in
    EleutherAI/wikitext_document_level (``page`` keeps the raw tokenization)."""
    lines = text.replace("\r\n", "\n").split("\n")
    docs, current = [], []
    for line in lines:
        if _HEADING.match(line) and current:
            docs.append("\n".join(current).strip("\n"))
            current = []
        current.append(line)
    if current:
        docs.append("\n".join(current).strip("\n"))
    return [{"page": d} for d in docs if d.strip()]


def _as_dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def tinystories_lastword(shared_dir=None, **_):
    return _as_dataset(last_word_rows(shared_data(shared_dir, TINYSTORIES).read_text(encoding="utf-8")))


def wikitext2(shared_dir=None, **_):
    return _as_dataset(wikitext_documents(shared_data(shared_dir, WIKITEXT).read_text(encoding="utf-8")))


def _text_file(text_file) -> str:
    if not text_file:
        raise FileNotFoundError("the text_* tasks need a text file: pass --text FILE")
    return Path(text_file).read_text(encoding="utf-8")


def text_lastword(text_file=None, **_):
    """Last-word rows from every blank-line separated document of ``text_file``."""
    text = _text_file(text_file)
    return _as_dataset(last_word_rows("\n\n" + text.strip() + "\n\n", min_words=8))


def text_ppl(text_file=None, **_):
    """Each blank-line separated document of ``text_file`` as a rolling-perplexity page."""
    blocks = [b.strip() for b in re.split(r"\n\s*\n", _text_file(text_file))]
    return _as_dataset([{"page": b} for b in blocks if b])


def wikitext_process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
