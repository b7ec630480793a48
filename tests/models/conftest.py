"""Fixture ``vllm_jobs``: offline vLLM engines in one subprocess.

``vllm_jobs(jobs)`` runs offline vLLM engines one after another in a single
subprocess (``vllm_jobs.py``) so that a module pays vLLM's import once.
HF reference helpers are in ``variant_helpers.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


@pytest.fixture(scope="session")
def vllm_jobs(tmp_path_factory):
    """``vllm_jobs(jobs, timeout=900) -> list[dict]``: see ``vllm_jobs.py``;
    each result also carries ``"log"``, the subprocess's output."""

    def run(jobs: list[dict], timeout: float = 900.0) -> list[dict]:
        work = tmp_path_factory.mktemp("vllm-jobs")
        jobs_path, out_path = work / "jobs.json", work / "out.json"
        jobs_path.write_text(json.dumps(jobs))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        proc = subprocess.run(
            [sys.executable, str(HERE / "vllm_jobs.py"), str(jobs_path), str(out_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
        )
        assert proc.returncode == 0 and out_path.exists(), (
            f"vllm_jobs.py failed ({proc.returncode}):\n{proc.stdout[-8000:]}"
        )
        results = json.loads(out_path.read_text())
        for result in results:
            result["log"] = proc.stdout  # the whole subprocess's log, shared by its jobs
        return results

    return run
