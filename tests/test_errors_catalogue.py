"""``docs/errors.md`` stays true: every test a row names exists, and every quoted fragment of a
row's answer appears in the source of one of that row's tests (which assert on it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = REPO_ROOT / "docs" / "errors.md"


def _rows() -> list[tuple[str, str, list[tuple[str, str]]]]:
    rows = []
    for line in CATALOGUE.read_text().splitlines():
        m = re.match(r"^\| (\d+) \|", line)
        if m:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            assert len(cells) == 5, line
            rows.append((cells[0], cells[3], re.findall(r"(tests/[\w/]+\.py)::(\w+)", cells[4])))
    return rows


def _function_source(path: str, name: str) -> str:
    text = (REPO_ROOT / path).read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            segment = ast.get_source_segment(text, node)
            # parametrize lists live in the decorators, above the function
            decorators = [ast.get_source_segment(text, d) for d in node.decorator_list]
            return "\n".join([*decorators, segment])
    raise AssertionError(f"docs/errors.md names {path}::{name}, which does not exist")


def test_catalogue_covers_issue_15():
    numbers = [int(n) for n, _, _ in _rows()]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 22


@pytest.mark.parametrize("number, answer, tests", _rows(), ids=lambda v: v if isinstance(v, str) and v.isdigit() else "")
def test_row_is_tested(number, answer, tests):
    assert tests, f"row {number} names no test"
    sources = "\n".join(_function_source(path, name) for path, name in tests)
    for fragment in re.findall(r"`([^`]+)`", answer):
        assert fragment in sources, f"row {number}: no test of {[n for _, n in tests]} checks {fragment!r}"
