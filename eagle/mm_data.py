"""Image+text training data for ``train-drafter``: LLaVA / ShareGPT jsonl.

One conversation per line::

    {"image": "images/0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A red square."}]}

Image paths are relative to the jsonl file. The first human turn is the
prompt and must hold exactly one ``<image>`` tag; the first ``gpt`` turn after
it is the response (later turns are not used). Every problem is one
:class:`DrafterError` naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eagle.checks import DrafterError

IMAGE_TAG = "<image>"
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


@dataclass(frozen=True)
class Conversation:
    line: int  # 1-based line number in the jsonl
    image: Path  # resolved path
    prompt: str  # the human turn, with its <image> tag
    response: str


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _parse_line(path: Path, n: int, text: str) -> Conversation:
    where = f"--data {path} line {n}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DrafterError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DrafterError(f"{where}: expected a JSON object")
    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise DrafterError(f"{where}: no \"image\" path")
    turns = row.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DrafterError(f"{where}: \"conversations\" must be a list of {{\"from\", \"value\"}} turns")
    human = next((i for i, t in enumerate(turns) if t.get("from") in _HUMAN), None)
    if human is None:
        raise DrafterError(f"{where}: the conversation has no human turn")
    prompt = turns[human].get("value")
    if not isinstance(prompt, str) or prompt.count(IMAGE_TAG) != 1:
        count = prompt.count(IMAGE_TAG) if isinstance(prompt, str) else 0
        raise DrafterError(f"{where}: the human turn must hold exactly one {IMAGE_TAG} tag "
                           f"(found {count})")
    response = next((t.get("value") for t in turns[human + 1:] if t.get("from") in _GPT), None)
    if not isinstance(response, str) or not response.strip():
        raise DrafterError(f"{where}: the conversation has no response (no non-empty \"gpt\" "
                           "turn after the human turn)")
    return Conversation(n, (path.parent / image).resolve(), prompt, response)


def read_conversations(path: Path) -> list[Conversation]:
    """Parse every line (blank lines skipped) and check each image opens."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DrafterError(f"--data {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    convs = [_parse_line(path, n, text) for n, text in enumerate(lines, 1) if text.strip()]
    if not convs:
        raise DrafterError(f"--data {path}: no conversations")
    for conv in convs:
        load_image(path, conv)  # fail before any training, not in the middle
    return convs


def load_image(path: Path, conv: Conversation):
    """The conversation's image as RGB, decoded with PIL."""
    from PIL import Image, UnidentifiedImageError

    where = f"--data {path} line {conv.line}"
    if not conv.image.is_file():
        raise DrafterError(f"{where}: image {conv.image} not found")
    try:
        with Image.open(conv.image) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DrafterError(f"{where}: cannot read image {conv.image} ({exc})") from None
