"""Fixtures shared by the whole suite.

- ``shared_dir``: the project's ``../shared`` data (override with
  ``VLLM_PLUGINS_SHARED``). Missing data skips locally and fails under CI.
- ``tiny_llama``: a factory that builds random-weight Llama checkpoints with a
  local tokenizer, cached per session by their arguments.
- ``vllm_single_process``: vLLM's distributed state for world size 1 in this
  process, set up once per session (torch.distributed can be initialised only
  once per process, so every in-process vLLM layer test shares it).
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


@pytest.fixture(scope="session")
def vllm_single_process():
    import torch.distributed as dist
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    from vllm_plugins import register
    from vllm_plugins.serving import free_port

    register()
    with set_current_vllm_config(VllmConfig()):
        if not dist.is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        ensure_model_parallel_initialized(1, 1)
    yield


@pytest.fixture(scope="session")
def cli_process():
    """``cli_process(argv, fsize_limit=None, pause_s=None) -> subprocess.Popen``: ``python -m
    vllm_plugins.cli ARGV`` (or ``python -m quant`` when ``argv[0] == "quant"``) in a subprocess
    with this checkout first on the path, stdout and stderr piped (text).

    ``fsize_limit``: RLIMIT_FSIZE in bytes, with SIGXFSZ ignored, so writing beyond it fails with
    ``EFBIG`` as a full disk fails with ``ENOSPC``. ``pause_s``: the export pauses that long once
    complete, before it is published (:data:`quant.outdir.PAUSE_ENV`), and says so on stderr."""
    import resource
    import signal
    import subprocess
    import sys

    from quant.outdir import PAUSE_ENV

    def start(argv: list[str], fsize_limit: int | None = None, pause_s: float | None = None):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        if pause_s is not None:
            env[PAUSE_ENV] = str(pause_s)

        def setup():
            # A suite started in the background (`cmd &`) inherits an ignored SIGINT: Python would
            # keep ignoring it instead of raising KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if fsize_limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

        module = ["-m", "quant", *argv[1:]] if argv[:1] == ["quant"] else ["-m", "vllm_plugins.cli", *argv]
        return subprocess.Popen([sys.executable, *module], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=setup)

    return start
