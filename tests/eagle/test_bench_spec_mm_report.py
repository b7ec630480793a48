"""``scripts/bench_spec_mm.py``'s table: the optional ``textonly`` drafter
gets its own row and the line before the last; the last line keeps its
``acceptance vision=X text=Y lossless=Z%`` form over those two runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_spec_mm", ROOT / "scripts" / "bench_spec_mm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(drafts_accepted: tuple[int, int], outputs: dict, cls: str | None = "X") -> dict:
    drafts, accepted = drafts_accepted
    fam = {"spec": {"num_drafts": drafts, "num_accepted_tokens": accepted,
                    "num_accepted_tokens_per_pos": [accepted, 0, 0]},
           "seconds": 1.0, "tokens": 10, "prompts": 2, "exact": 1}
    return {"drafter_class": cls, "families": {"grid": fam}, "outputs": outputs}


def test_textonly_row_and_unchanged_last_line(bench):
    same, other = {"0": [1, 2], "1": [3]}, {"0": [1, 2], "1": [4]}
    results = {"target": _run((0, 0), same, None), "vision": _run((10, 20), same),
               "text": _run((10, 10), same), "textonly": _run((10, 5), other)}
    lines = bench.report(results, 3).splitlines()
    assert lines[-1] == "acceptance vision=3.00 text=2.00 lossless=100%"  # textonly differs: not counted
    assert lines[-2] == "acceptance textonly=1.50"
    assert any(line.startswith("| textonly | X | 1.50 |") for line in lines)
    assert "textonly 1/2" in lines[-3]

    del results["textonly"]
    lines = bench.report(results, 3).splitlines()
    assert lines[-1] == "acceptance vision=3.00 text=2.00 lossless=100%"
    assert lines[-2].startswith("prompts: 2;")
