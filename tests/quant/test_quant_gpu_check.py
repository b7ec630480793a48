"""``scripts/gpu_check.py`` at tiny size on the CPU, with vLLM blocked from import.

The GPU run itself (8B shape on one H200) is not part of the suite; this
checks that the script runs where vLLM is absent, that its table is
consistent (extrapolation = fixed + 32 x the mean steady layer) and that the
device branches plus the torch.linalg factorization agree with the CPU path
within its 2% tolerance.
"""

from __future__ import annotations

import json

import pytest

TINY = ["--device", "cpu", "--layers", "3", "--hidden", "128", "--intermediate", "256", "--heads", "4",
        "--kv-heads", "2", "--vocab", "512", "--samples", "8", "--seqlen", "64", "--compare-samples", "4"]


def test_gpu_check_runs_on_the_cpu_without_vllm(run_blocked, tmp_path):
    result = tmp_path / "result.json"
    proc = run_blocked("scripts/gpu_check.py", [*TINY, "--workdir", str(tmp_path / "work"), "--json", str(result)],
                       ("vllm", "vllm_plugins"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "extrapolated to 32 layers" in out and "peak RSS" in out and "within 2%" in out, out
    r = json.loads(result.read_text())
    assert r["ok"] and r["worst_rel_diff"] <= 0.02
    assert len(r["layer_seconds"]) == 3 and all(s > 0 for s in r["layer_seconds"])
    assert r["per_layer_seconds"] == pytest.approx(sum(r["layer_seconds"][1:]) / 2)
    assert r["extrapolated_seconds"] == pytest.approx(r["fixed_seconds"] + 32 * r["per_layer_seconds"])
    assert len(r["compare"]) == 2 * 7  # q, k, v, o, gate, up, down of two layers
    assert all(0 < row["cpu"] < 0.1 for row in r["compare"])
