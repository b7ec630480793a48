"""``--format gptq`` as other tools read it: AutoGPTQ's ``quantize_config.json`` (row 20) and
``desc_act: false`` for act-order with static groups, which vLLM 0.32 serves (row 21)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_plugins.cli import main

# AutoGPTQ 0.7.1 BaseQuantizeConfig: the fields from_pretrained reads from quantize_config.json.
AUTOGPTQ_FIELDS = ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential")


@pytest.fixture(scope="module")
def act_order_export(tiny_llama, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "out"
    assert main(["quantize", "--model", str(tiny_llama()), "--out", str(out), "--calib", str(calib),
                 "--num-samples", "4", "--seqlen", "64", "--no-progress", "--format", "gptq", "--act-order",
                 "--group-size", "32"]) == 0
    return out


def test_quantize_config_json_for_autogptq(act_order_export):
    qc = json.loads((act_order_export / "config.json").read_text())["quantization_config"]
    side = json.loads((act_order_export / "quantize_config.json").read_text())
    assert {k: side[k] for k in AUTOGPTQ_FIELDS} == {k: qc[k] for k in AUTOGPTQ_FIELDS}
    assert side["bits"] == 4 and side["group_size"] == 32 and side["sym"] is True
    assert side["quant_method"] == "gptq" and side["checkpoint_format"] == "gptq"


def test_act_order_exports_static_groups_as_desc_act_false(act_order_export):
    qc = json.loads((act_order_export / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is False and qc["static_groups"] is True
    # What desc_act false promises: every g_idx is the natural arange // group_size.
    tensors = {}
    for shard in act_order_export.glob("*.safetensors"):
        tensors.update(load_file(shard))
    g_idx = {k: v for k, v in tensors.items() if k.endswith(".g_idx")}
    assert g_idx
    for name, g in g_idx.items():
        assert torch.equal(g.long(), torch.arange(g.numel()) // 32), name
    # vLLM's own check of the config (it refused desc_act true: "no longer supported").
    from vllm.model_executor.layers.quantization import get_quantization_config

    get_quantization_config("gptq").from_config(qc)
