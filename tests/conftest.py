"""Fixtures shared by the whole suite.

- ``shared_dir``: the project's ``../shared`` data (override with
  ``VLLM_PLUGINS_SHARED``). Missing data skips locally and fails under CI.
- ``tiny_llama``: a factory that builds random-weight Llama checkpoints with a
  local tokenizer, cached per session by their arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_path() -> Path:
    return Path(os.environ.get("VLLM_PLUGINS_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = _shared_path()
    if not (path / "models").is_dir() or not (path / "data").is_dir():
        message = f"shared data not found at {path} (set VLLM_PLUGINS_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """``tiny_llama(**kwargs) -> Path``: see :func:`models.tiny.build_tiny_llama`.

    The same keyword arguments return the same directory within a session.
    Callers must treat it as read-only.
    """
    from models.tiny import build_tiny_llama

    cache: dict[str, Path] = {}

    def build(**kwargs) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("tiny-llama")
            cache[key] = build_tiny_llama(out, **kwargs)
        return cache[key]

    return build
