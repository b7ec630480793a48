"""Tensor parallel size 2 on CPU gives the same greedy tokens as size 1.

The checkpoint is a random variant with every option on and head size 16
(padded for attention): 8 query and 4 KV heads, split 4 + 2 per rank.
TP=2 on CPU needs ``VLLM_CPU_OMP_THREADS_BIND`` with one entry per rank.
"""

from __future__ import annotations

import pytest
from variant_helpers import hf_greedy, job_outputs, load_hf

MAX_TOKENS = 32
VARIANT = dict(
    model_type="llama_variant", hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
    qk_norm=True, partial_rotary_factor=0.5, attention_bias=True, mlp_bias=True,
    hidden_act="gelu_pytorch_tanh",
)
PROMPTS = [[1, 17, 42, 99, 310], [1] + list(range(20, 80))]


@pytest.fixture(scope="module")
def checkpoint(tiny_llama):
    return tiny_llama(**VARIANT)


@pytest.fixture(scope="module")
def outputs(vllm_jobs, checkpoint):
    base = {"model": str(checkpoint), "prompts": PROMPTS, "max_tokens": MAX_TOKENS}
    tp1, tp2 = vllm_jobs([
        base,
        {**base, "llm": {"tensor_parallel_size": 2}, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}},
    ])
    return job_outputs(tp1), job_outputs(tp2)


def test_tp2_greedy_equals_tp1(outputs):
    tp1, tp2 = outputs
    assert [o["token_ids"] for o in tp2] == [o["token_ids"] for o in tp1]


def test_tp1_greedy_equals_hf(outputs, checkpoint):
    tp1, _ = outputs
    assert [o["token_ids"] for o in tp1] == hf_greedy(load_hf(checkpoint), PROMPTS, MAX_TOKENS)
