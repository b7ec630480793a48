"""Start and stop a real ``vllm serve`` in a subprocess.

Used by ``vllm-plugins eval``, the benchmark scripts and the end-to-end tests.
The server runs from the current environment's ``vllm`` console script on
127.0.0.1, in its own process session, so that stopping it can account for
every process it started (API server, engine core, workers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# On CPU the KV cache is carved out of RAM; 1 GiB is plenty for tiny models
# and lets several servers coexist on a 24 GiB machine. An explicit value in
# the caller's environment wins.
CPU_DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


class ServerError(RuntimeError):
    """The server exited or did not become healthy; carries its log tail."""


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The ``vllm`` console script of the running interpreter's environment."""
    exe = Path(sys.executable).parent / "vllm"
    if not exe.exists():
        raise FileNotFoundError(f"no vllm console script next to {sys.executable}")
    return str(exe)


class VllmServer:
    """``with VllmServer(model, "--dtype", "float32") as server: ...``

    ``server.url("/v1/completions")`` gives an endpoint; ``server.log()``
    the combined stdout/stderr so far. On exit the whole process session
    is stopped (SIGINT, then SIGKILL after ``stop_timeout``) and
    ``leftover_pids`` lists any process that survived (normally empty).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *args: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 600.0,
        stop_timeout: float = 60.0,
    ) -> None:
        self.model = str(model)
        self.args = [str(a) for a in args]
        self.env = {**CPU_DEFAULT_ENV, **os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.leftover_pids: list[int] = []
        self._log = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def start(self) -> "VllmServer":
        import requests

        cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                if requests.get(self.url("/health"), timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vllm serve not healthy after {self.startup_timeout}s:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        import psutil

        try:
            family = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _, alive = psutil.wait_procs(family, timeout=self.stop_timeout)
        self.leftover_pids = [p.pid for p in alive]
        for p in alive:
            p.kill()
        self.proc = None

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
