"""Procedural images and image-dependent questions for the tiny VLM demo.

Every image is a ``grid`` x ``grid`` board of square cells, one cell per
vision patch of the target (:mod:`models.vlm_demo`), rendered with numpy.
Four task families, each answered by a fixed template whose content words
can only come from the image:

- ``global``: which two shapes are there (colour and kind, in reading order);
- ``grid``: read out the colour of every cell, row by row (local content,
  the longest answer);
- ``count``: how many shapes (1 to ``max_shapes``, all of one colour and kind);
- ``position``: the colour, kind, row and column of the one shape.

Every sample also records what each cell holds (:data:`CELL_LABELS`), the
per-patch truth that :func:`models.vlm_train.pretrain_vision` teaches the
vision tower before the whole model trains on the answers.

No torch and no vLLM here: numpy and the standard library only (PIL only
to write PNGs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "white": (235, 235, 235),
    "purple": (150, 60, 200),
}
SHAPES: tuple[str, ...] = ("cross", "square", "triangle")
FAMILIES: tuple[str, ...] = ("global", "grid", "count", "position")
QUESTIONS: dict[str, str] = {
    "global": "Which shapes are there?",
    "grid": "Read the colours of the grid.",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
# What one cell can hold: nothing, a plain colour (a grid cell), or a shape.
CELL_LABELS: tuple[str, ...] = ("",) + tuple(COLOURS) + tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    question: str
    answer: str
    task: str
    cells: tuple[str, ...] = ()  # one CELL_LABELS entry per cell, in reading order


def _shape_masks(cell: int) -> dict[str, np.ndarray]:
    """Boolean ``cell`` x ``cell`` masks of each shape, one pixel of margin."""
    yy, xx = np.mgrid[0:cell, 0:cell] + 0.5
    c = cell / 2
    # A plus sign two pixels thick: its lit area and outline differ from
    # the square's and the triangle's (a small circle's and a square's do
    # not, at 8 pixels).
    bar = lambda a, b: (np.abs(a - c) <= 1) & (b >= 1) & (b <= cell - 1)  # noqa: E731
    cross = bar(yy, xx) | bar(xx, yy)
    square = (yy >= 1.5) & (yy <= cell - 1.5) & (xx >= 1.5) & (xx <= cell - 1.5)
    # Apex at the top centre, base on the bottom margin.
    height = (yy - 1) / (cell - 2)
    triangle = (yy >= 1) & (yy <= cell - 1) & (np.abs(xx - c) <= height * (cell / 2 - 1))
    return {"cross": cross, "square": square, "triangle": triangle}


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.integers(-20, 21, 3), 0, 255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 25, (size, size, 3)).astype(np.uint8)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def _count(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else plural(noun)}"


def _scene(rng: np.random.Generator, grid: int, cell: int, n: int, same: bool = False):
    """A board with ``n`` shapes in distinct random cells (all of one colour
    and kind if ``same``); returns the image and the objects ``(row, col,
    colour, shape)`` in reading order."""
    colours = list(COLOURS)
    cells = sorted(rng.choice(grid * grid, size=n, replace=False).tolist())
    image = _background(rng, grid * cell)
    masks = _shape_masks(cell)
    objects = []
    pick = lambda: (colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))])  # noqa: E731
    first = pick()
    for idx in cells:
        row, col = divmod(idx, grid)
        colour, shape = first if same else pick()
        patch = image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
        patch[masks[shape]] = _jitter(rng, COLOURS[colour])
        objects.append((row, col, colour, shape))
    return image, objects


def _cell_labels(objects, grid: int) -> tuple[str, ...]:
    labels = [""] * (grid * grid)
    for row, col, colour, shape in objects:
        labels[row * grid + col] = f"{colour} {shape}"
    return tuple(labels)


def make_sample(rng: np.random.Generator, task: str, grid: int = 4, cell: int = 8,
                max_shapes: int = 4) -> Sample:
    """One image with its question and answer for ``task`` (a family)."""
    colours = list(COLOURS)
    if task == "grid":
        cells = rng.integers(len(colours), size=(grid, grid))
        image = np.zeros((grid * cell, grid * cell, 3), dtype=np.uint8)
        for r in range(grid):
            for c in range(grid):
                image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = _jitter(rng, COLOURS[colours[cells[r, c]]])
        answer = ", ".join(" ".join(colours[i] for i in row) for row in cells)
        return Sample(image, QUESTIONS[task], answer + ".", task, tuple(colours[i] for i in cells.flat))
    if task == "global":
        image, objects = _scene(rng, grid, cell, 2)
        answer = _join([f"a {colour} {shape}" for _, _, colour, shape in objects])
        return Sample(image, QUESTIONS[task], f"There are {answer}.", task, _cell_labels(objects, grid))
    if task == "count":
        n = int(rng.integers(1, max_shapes + 1))
        image, objects = _scene(rng, grid, cell, n, same=True)
        _, _, colour, shape = objects[0]
        verb = "is" if n == 1 else "are"
        return Sample(image, QUESTIONS[task], f"There {verb} {_count(n, colour + ' ' + shape)}.", task,
                      _cell_labels(objects, grid))
    if task == "position":
        image, objects = _scene(rng, grid, cell, 1)
        ((row, col, colour, shape),) = objects
        return Sample(image, QUESTIONS[task], f"The {colour} {shape} is in row {NUMBER_WORDS[row + 1]}, "
                      f"column {NUMBER_WORDS[col + 1]}.", task, _cell_labels(objects, grid))
    raise ValueError(f"unknown task family {task!r}; expected one of {FAMILIES}")


def make_samples(n: int, seed: int, families: tuple[str, ...] = FAMILIES, **kwargs) -> list[Sample]:
    """``n`` samples cycling through ``families``; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, families[i % len(families)], **kwargs) for i in range(n)]


def vocabulary_text() -> list[str]:
    """Every word the questions and answers use (tokenizer training text)."""
    words = list(COLOURS) + list(SHAPES) + [plural(s) for s in SHAPES] + list(NUMBER_WORDS)
    lines = list(QUESTIONS.values()) + [" ".join(words)]
    lines += [f"There are a {c} {s}, a {c} {s} and a {c} {s}." for c in COLOURS for s in SHAPES]
    lines += [f"There is a {c} {s}." for c in COLOURS for s in SHAPES]
    lines += [f"The {c} {s} is in row {n}, column {n}." for c in COLOURS for s in SHAPES for n in NUMBER_WORDS]
    lines += [f"There are {n} {c} {plural(s)}." for n in NUMBER_WORDS for c in COLOURS for s in SHAPES]
    return lines


def write_png(image: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(image, "RGB").save(path, format="PNG")
