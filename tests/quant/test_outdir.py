"""``staged_output_dir``: the output appears whole or not at all."""

from __future__ import annotations

import pytest

from quant.outdir import staged_output_dir


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "ckpt"
    with staged_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert (out / "config.json").read_text() == "{}"
    assert _siblings(out) == ["ckpt"]


def test_error_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_and_untouched(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(FileExistsError, match="ckpt"):
        with staged_output_dir(out) as tmp:
            (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert _siblings(out) == ["ckpt"]


def test_replace_and_empty_takeover(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("old")
    with staged_output_dir(out, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_output_dir(empty) as tmp:
        (tmp / "a").write_text("a")
    assert [p.name for p in empty.iterdir()] == ["a"]
    assert _siblings(out) == ["ckpt", "empty"]
