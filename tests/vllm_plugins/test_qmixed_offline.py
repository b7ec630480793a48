"""Offline vLLM (``LLM``) on a per-layer mixed export and on an in-tree ``gptq`` export.

- mixed ``native``: W8A8 attention, W4A16 MLP (group 32, one override to
  group 128), one MLP ``down_proj`` and ``lm_head`` left unquantized.
  ``llm.apply_model`` lists every linear's method: targeted ones carry ours,
  ignored ones don't. Greedy tokens equal the float64 dequantized reference,
  at TP=1 and TP=2 (``VLLM_CPU_OMP_THREADS_BIND='0|1'``).
- the toolkit's ``gptq`` export (AutoGPTQ v1 layout) served by vLLM's own
  ``AutoGPTQLinearMethod`` in bfloat16, compiled, with ``CPUWNA16`` disabled (as if the
  build lacked ``cpu_gemm_wna16``): the registered CPU int4 kernel must be
  chosen (``TileInt4CPULinearKernel`` on AVX512-BF16 CPUs), and each greedy
  token is the float64 reference's best
  (or within ``BF16_GAP`` of it, a near-tie bf16 may flip).

Each engine runs in a subprocess: this file is also the script
(``python test_qmixed_offline.py CKPT TP``) and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PROMPTS = [[1, 5, 77, 200, 31], [1, 300, 12], [1, 42, 43, 44, 45, 46, 47, 48]]
MAX_TOKENS = 10
BF16_GAP = 0.1  # logits; the tiny model's logits span ~20, a wrong kernel moves them by several
MIXED = {
    "quant_method": "vllm_plugins", "format_version": 1, "scheme": "w4a16", "group_size": 32, "act_order": False,
    "ignore": ["lm_head", "model.layers.0.mlp.down_proj"],
    "overrides": {
        **{f"model.layers.{i}.self_attn.{p}_proj": {"scheme": "w8a8"} for i in (0, 1) for p in "qkvo"},
        "model.layers.1.mlp.down_proj": {"group_size": 128},
    },
}


def _engine_report(ckpt: str, tp: int, dtype: str, compiled: bool = False) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(ckpt, dtype=dtype, enforce_eager=not compiled, max_model_len=256, tensor_parallel_size=tp,
              max_num_seqs=8)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    report = {"tokens": [list(o.outputs[0].token_ids) for o in outs]}
    if tp == 1:
        def methods(model):
            from vllm.model_executor.layers.linear import LinearBase
            from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

            found = {}
            for name, module in model.named_modules():
                if isinstance(module, (LinearBase, ParallelLMHead)):
                    method = module.quant_method
                    kernel = getattr(method, "kernel", None)
                    found[name] = [type(method).__name__, type(kernel).__name__ if kernel is not None else None]
            return found

        report["methods"] = llm.apply_model(methods)[0]
    return report


def _run_engine(ckpt: Path, tp: int, dtype: str = "float32", compiled: bool = False, **extra_env: str) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **extra_env}
    if tp == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # apply_model in this process, no pickling
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    proc = subprocess.run([sys.executable, __file__, str(ckpt), str(tp), dtype, str(int(compiled))], env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1])


def _toolkit_gptq_export(src: Path, out: Path, calib: Path, group_size: int) -> dict[str, torch.Tensor]:
    """``vllm-plugins quantize --format gptq`` (AutoGPTQ v1 layout), read back with numpy:
    qweight ``[in/8, out]`` packed along the input, scales ``[groups, out]``, g_idx ``[in]``."""
    from safetensors.numpy import load_file

    from vllm_plugins.cli import main

    assert main(["quantize", "--model", str(src), "--out", str(out), "--format", "gptq", "--method", "rtn",
                 "--scheme", "w4a16", "--group-size", str(group_size), "--calib", str(calib),
                 "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    deq = {}
    for name in [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]:
        words = tensors[f"{name}.qweight"].view(np.uint32)  # [in/8, out]
        in_f = words.shape[0] * 8
        q = np.stack([(words[i // 8] >> np.uint32(4 * (i % 8))) & np.uint32(15) for i in range(in_f)], 1)
        g = tensors[f"{name}.g_idx"].astype(np.int64)
        deq[name] = torch.from_numpy((q.astype(np.int64) - 8) * tensors[f"{name}.scales"].astype(np.float64).T[:, g])
    return deq


@pytest.fixture(scope="module")
def mixed(tiny_llama, tmp_path_factory):
    from test_qpacking import dequantized_reference, export_native, greedy_reference

    src = tiny_llama()
    out = tmp_path_factory.mktemp("mixed") / "ckpt"
    deq = export_native(src, out, MIXED)
    return out, greedy_reference(dequantized_reference(src, MIXED, deq), PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def mixed_tp1(mixed):
    return _run_engine(mixed[0], 1)


def test_mixed_methods_per_layer(mixed_tp1):
    methods = mixed_tp1["methods"]
    for i in (0, 1):
        assert methods[f"model.layers.{i}.self_attn.qkv_proj"][0] == "W8A8LinearMethod"
        assert methods[f"model.layers.{i}.self_attn.o_proj"][0] == "W8A8LinearMethod"
        assert methods[f"model.layers.{i}.mlp.gate_up_proj"][0] == "W4A16LinearMethod"
    assert methods["model.layers.1.mlp.down_proj"][0] == "W4A16LinearMethod"
    assert methods["model.layers.0.mlp.down_proj"][0] == "UnquantizedLinearMethod"
    assert methods["lm_head"][0] == "UnquantizedEmbeddingMethod"
    assert len(methods) == 2 * 4 + 1
    kernels = {m[1] for m in methods.values() if m[0] != "UnquantizedLinearMethod" and m[1]}
    assert kernels == {"CPUInt8ScaledMMLinearKernel", "TorchInt4CPULinearKernel"}, methods


def test_mixed_greedy_equals_reference(mixed, mixed_tp1):
    assert mixed_tp1["tokens"] == mixed[1]


def test_mixed_tp2_equals_tp1(mixed, mixed_tp1):
    assert _run_engine(mixed[0], 2)["tokens"] == mixed_tp1["tokens"]


def test_intree_gptq_runs_on_registered_cpu_int4_kernel(tiny_llama, shared_dir, tmp_path):
    from test_qpacking import dequantized_reference, greedy_gaps

    src = tiny_llama()
    deq = _toolkit_gptq_export(src, tmp_path / "gptq", shared_dir / "data" / "tinystories_val.txt", 32)
    # vLLM's gptq takes bf16/fp16 only. CPUWNA16 is disabled so that the test
    # sees what a build without cpu_gemm_wna16 (AVX2) does on any machine.
    # Compiled (vLLM's CPU default), so the tile kernel's op is traced by torch.compile.
    report = _run_engine(tmp_path / "gptq", 1, "bfloat16", compiled=True,
                         VLLM_DISABLED_KERNELS="CPUWNA16LinearKernel")
    from vllm_plugins.quantization import cpu_ext

    kernel = "TileInt4CPULinearKernel" if cpu_ext.has_fast_path() else "TorchInt4CPULinearKernel"
    quantized = {n: m for n, m in report["methods"].items() if n != "lm_head"}
    assert quantized and all(m == ["AutoGPTQLinearMethod", kernel] for m in quantized.values()), report["methods"]
    reference = dequantized_reference(src, {"scheme": "w4a16", "group_size": 32}, deq)
    # bf16 activations: every greedy step must pick the reference's best token,
    # or one within BF16_GAP logits of it (a near-tie that bf16 rounding may flip).
    gaps = greedy_gaps(reference, PROMPTS, report["tokens"])
    print("logit gaps", gaps)
    assert max(gaps) <= BF16_GAP and sum(g == 0 for g in gaps) >= 0.8 * len(gaps), gaps


if __name__ == "__main__":
    print(json.dumps(_engine_report(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1")))
