"""The quantize process imports only what it uses (issue 13, item 4).

``python -m quant`` runs a tiny quantization in a subprocess that reports, at
exit, which modules were imported. transformers' generation code would import
scikit-learn (and through it scipy.stats and pandas) when lm-eval is installed;
``quant.imports`` keeps them out. vLLM is never needed, and the compressed-tensors
export is written without the compressed_tensors library (whose import compiles with torch.compile).
A Llama (stock or the variant) calibrates with ``quant.llama_layers``, so transformers' modeling
code and the ``torch._dynamo`` its ``masking_utils`` imports stay out too. scipy's OpenBLAS is loaded
with ``OPENBLAS_THREAD_TIMEOUT`` set (``quant.gptq``: its idle threads must not spin beside torch's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNUSED = ("sklearn", "pandas", "lm_eval", "vllm", "vllm_plugins", "compressed_tensors", "torch._dynamo",
          "transformers.masking_utils", "transformers.modeling_utils")

PROBE = """
import atexit, json, os, runpy, sys

class BlasProbe:  # records OPENBLAS_THREAD_TIMEOUT as scipy.linalg (and its OpenBLAS) is first imported
    seen = []
    def find_spec(self, name, path=None, target=None):
        if name == "scipy.linalg" and not self.seen:
            self.seen.append(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
        return None

sys.meta_path.insert(0, BlasProbe())
atexit.register(lambda: print("MODULES " + json.dumps(sorted(k for k, v in sys.modules.items() if v is not None))))
atexit.register(lambda: print("BLAS_TIMEOUT " + json.dumps(BlasProbe.seen)))
sys.argv = ["python -m quant", *sys.argv[1:]]
runpy.run_module("quant", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("model", [{}, {"torch_dtype": "bfloat16"},
                                   {"model_type": "llama_variant", "qk_norm": True, "partial_rotary_factor": 0.5}],
                         ids=["llama", "llama-bf16", "llama_variant"])
def test_python_m_quant_imports_no_unused_packages(tiny_llama, tmp_path, model):
    from models.tiny import synthetic_corpus

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(synthetic_corpus(20)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "--model", str(tiny_llama(**model)), "--out", str(out), "--calib", str(calib),
         "--num-samples", "4", "--seqlen", "32", "--format", "compressed-tensors", "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.json").is_file()
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES "))
    imported = set(json.loads(line[len("MODULES "):]))
    assert "transformers" in imported and "quant.pipeline" in imported  # the probe saw the real run
    assert "quant.llama_layers" in imported
    leaked = sorted(m for m in imported if any(m == u or m.startswith(u + ".") for u in UNUSED))
    assert not leaked, f"the quantize process imported {leaked[:10]}"
    # scipy's OpenBLAS loaded with idle threads that sleep at once (quant.gptq.OPENBLAS_THREAD_TIMEOUT)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BLAS_TIMEOUT "))
    assert json.loads(line[len("BLAS_TIMEOUT "):]) == ["4"]
