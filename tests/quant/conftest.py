"""Fixtures of the quantization tests: a writable tiny Llama and calibration text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    from models.tiny import synthetic_corpus

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(synthetic_corpus(60)))
    return path


@pytest.fixture
def source(tiny_llama, tmp_path) -> Path:
    """A private, writable copy of a tiny Llama (tests break it on purpose)."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_llama(), dst)
    return dst
