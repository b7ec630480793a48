"""True-sequential order inside a layer (the default) vs one calibration pass per layer.

Layer 0's q/k/v see the same input in both modes (nothing before them is
quantized), so their integers must be identical; o_proj and the MLP see
inputs through quantized q/k/v only in true-sequential order, so their
integers must differ. From layer 1 on every input differs (the quantized
layer 0 feeds it in both modes). Both modes must track the float logits.
"""

from __future__ import annotations

import pytest
import torch

from quant.checkpoint import ShardReader
from quant.config import QuantConfig
from quant.evaluate import load_dequantized_model, load_float_model
from quant.pipeline import quantize_checkpoint


@pytest.fixture(scope="module")
def exports(tiny_llama, tmp_path_factory, shared_dir):
    src = tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2, initializer_range=0.05)
    out = {}
    for true_sequential in (True, False):
        d = tmp_path_factory.mktemp(f"seq-{true_sequential}") / "native"
        cfg = QuantConfig(scheme="w8a8", num_samples=16, seqlen=64, true_sequential=true_sequential)
        quantize_checkpoint(src, d, cfg, shared_dir / "data" / "tinystories_val.txt", progress=False)
        out[true_sequential] = d
    return src, out


def test_only_the_groups_after_the_first_see_quantized_inputs(exports):
    _, out = exports
    seq, one_pass = ShardReader(out[True]), ShardReader(out[False])
    p = "model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(seq.read(f"{p}{name}.qweight"), one_pass.read(f"{p}{name}.qweight")), name
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert not torch.equal(seq.read(f"{p}{name}.qweight"), one_pass.read(f"{p}{name}.qweight")), name


def test_both_orders_track_the_float_logits(exports):
    src, out = exports
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_float_model(src)(input_ids=ids).logits
        errs = {mode: float((load_dequantized_model(d)(input_ids=ids).logits - ref).norm() / ref.norm())
                for mode, d in out.items()}
    print(f"relative logit error (true-sequential: error) {errs}")
    assert max(errs.values()) < 0.05, errs
