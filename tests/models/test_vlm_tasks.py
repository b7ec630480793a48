"""The demo VLM's procedural task generator: every answer is checked against
the image itself, decoded here independently of the generator's bookkeeping
(cell colours from pixel means, shapes from the lit pixels)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from models.vlm_tasks import CELL_LABELS, COLOURS, FAMILIES, NUMBER_WORDS, SHAPES, make_sample, make_samples, plural

GRID, CELL = 4, 8


def _nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c]) - rgb) ** 2)))


def _decode_scene(image):
    """Objects ``(row, col, colour, shape)`` in reading order, from pixels:
    a lit pixel has a channel above 100 (the background stays below 25);
    the shape by its outline: a square lights its top corners, a triangle
    its whole bottom row, a cross neither."""
    objects = []
    for r in range(GRID):
        for c in range(GRID):
            patch = image[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].astype(int)
            lit = patch.max(-1) > 100
            if not lit.any():
                continue
            colour = _nearest_colour(patch[lit].mean(0))
            if lit[1, 1] and lit[1, CELL - 2]:
                shape = "square"
            elif lit[CELL - 2].sum() >= CELL - 2:
                shape = "triangle"
            else:
                shape = "cross"
            objects.append((r, c, colour, shape))
    return objects


def _words(n: str) -> int:
    return NUMBER_WORDS.index(n)


@pytest.mark.parametrize("task", FAMILIES)
def test_answers_match_the_image(task):
    rng = np.random.default_rng(123)
    for _ in range(60):
        s = make_sample(rng, task, grid=GRID, cell=CELL)
        assert s.image.shape == (GRID * CELL, GRID * CELL, 3) and s.image.dtype == np.uint8
        assert s.task == task and s.answer.endswith(".")
        assert len(s.cells) == GRID * GRID and set(s.cells) <= set(CELL_LABELS)
        if task == "grid":
            colours = [_nearest_colour(s.image[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
                                       .reshape(-1, 3).mean(0)) for r in range(GRID) for c in range(GRID)]
            assert re.findall(r"[a-z]+", s.answer) == colours
            assert list(s.cells) == colours
            continue
        objects = _decode_scene(s.image)
        cells = [""] * (GRID * GRID)
        for r, c, colour, shape in objects:
            cells[r * GRID + c] = f"{colour} {shape}"
        assert list(s.cells) == cells
        if task == "global":
            assert len(objects) == 2
            assert re.findall(r"\ba (\w+) (\w+)", s.answer) == [(o[2], o[3]) for o in objects]
        elif task == "count":
            m = re.fullmatch(r"There (?:is|are) (\w+) (\w+) (\w+)\.", s.answer)
            assert m, s.answer
            singular = {plural(k): k for k in SHAPES} | {k: k for k in SHAPES}
            assert _words(m[1]) == len(objects)
            assert {o[2:] for o in objects} == {(m[2], singular[m[3]])}
        else:
            assert s.question == "Where is the shape?" and len(objects) == 1
            row, col, colour, shape = objects[0]
            assert s.answer == (f"The {colour} {shape} is in row {NUMBER_WORDS[row + 1]}, "
                                f"column {NUMBER_WORDS[col + 1]}.")


def test_samples_are_deterministic_and_cycle_families():
    a, b = make_samples(12, seed=7), make_samples(12, seed=7)
    assert [s.task for s in a] == [FAMILIES[i % len(FAMILIES)] for i in range(12)]
    assert all(x.answer == y.answer and np.array_equal(x.image, y.image) for x, y in zip(a, b))
    c = make_samples(12, seed=8)
    assert any(x.answer != y.answer for x, y in zip(a, c))


def test_grid_answer_is_long():
    s = make_sample(np.random.default_rng(0), "grid")
    assert len(s.answer.split()) == GRID * GRID


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown task family 'colour'"):
        make_sample(np.random.default_rng(0), "colour")
