"""Fixtures of the quant tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def _assert_same_export(got: Path, want: Path) -> None:
    """Two export directories hold the same config and the same tensors, bit for bit."""
    from quant.checkpoint import ShardReader

    assert json.loads((got / "config.json").read_text()) == json.loads((want / "config.json").read_text())
    a, b = ShardReader(got), ShardReader(want)
    assert sorted(a.names()) == sorted(b.names())
    for name in b.names():
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.fixture(scope="session")
def assert_same_export():
    """``assert_same_export(got_dir, want_dir)``: config.json and every tensor identical."""
    return _assert_same_export
