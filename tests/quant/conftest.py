"""Fixtures of the quant tests: a writable tiny Llama, calibration text, runs with packages blocked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Run TARGET (a module name, or a script path ending in .py) as __main__ with ARGV after installing a
# meta-path finder that makes the packages BLOCKED unimportable, as if they were not installed.
_BLOCKED_RUN = """
import runpy, sys
blocked, target, argv = {blocked!r}, {target!r}, {argv!r}

class BlockImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, BlockImports())
sys.argv = [target] + argv
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
finally:
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
    assert not leaked, leaked
"""


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


@pytest.fixture(scope="session")
def run_blocked():
    """``run_blocked(target, argv, blocked) -> CompletedProcess``: ``python -m target`` (or the script
    ``target.py``) in a subprocess where the top-level packages ``blocked`` cannot be imported."""

    def run(target: str, argv: list[str], blocked: tuple[str, ...], timeout: float = 600):
        code = _BLOCKED_RUN.format(blocked=tuple(blocked), target=target, argv=list(argv))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)

    return run


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
