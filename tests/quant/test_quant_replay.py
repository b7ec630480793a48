"""Replaying the finished modules of a layer in true-sequential calibration (quant.replay).

The replays must change nothing but the work done: exports with the replay
cache are compared bit for bit with exports that recompute every pass
(``replay_cache_mb=0``), over several batches per pass, with SmoothQuant
(whose groups must not replay), an ignored tail linear and a budget that fits
one replay only. The work saved is counted: with the replays the attention and
the MLP run in two passes each, not five and three. The conditions of
:func:`quant.replay.find_replays` are checked on small modules written here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant import pipeline
from quant.config import QuantConfig
from quant.pipeline import quantize_checkpoint
from quant.replay import Replay, find_replays

SAMPLES, SEQLEN = 12, 48
CONFIGS = {
    "w4a16-clip-mixed": QuantConfig(scheme="w4a16", group_size=32, num_samples=SAMPLES, seqlen=SEQLEN,
                                    overrides={"model.layers.*.mlp.down_proj": {"scheme": "w8a8"}}),
    "w8a8-smooth": QuantConfig(scheme="w8a8", smoothquant=0.5, num_samples=SAMPLES, seqlen=SEQLEN),
    "w4a16-ignore-o": QuantConfig(scheme="w4a16", group_size=32, num_samples=SAMPLES, seqlen=SEQLEN,
                                  ignore=("lm_head", "*.o_proj")),
    # 0.3 MiB: the kept input of the attention's tail only (12 x 48 x 128 float32 = 0.28 MiB)
    "w4a16-budget": QuantConfig(scheme="w4a16", group_size=32, num_samples=SAMPLES, seqlen=SEQLEN,
                                replay_cache_mb=0.3),
}
BATCH_TOKENS = 2 * SEQLEN  # 2 samples per forward batch: 6 batches per pass


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2, initializer_range=0.05)


@pytest.fixture(scope="module")
def samples():
    return torch.randint(3, 512, (SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))


def _quantize(model, samples, out, cfg, counts=None):
    """Quantize with 6 batches per pass; ``counts``: module class name -> forward calls (pre-hooks)."""
    def count(mod, _args):
        counts[type(mod).__name__] = counts.get(type(mod).__name__, 0) + 1

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "BATCH_TOKENS", BATCH_TOKENS)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count) if counts is not None else None
    try:
        quantize_checkpoint(model, out, cfg, samples=samples, force=True, progress=False)
    finally:
        mp.undo()
        if handle is not None:
            handle.remove()
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_replays_give_the_recomputed_export_bit_for_bit(name, model, samples, tmp_path, assert_same_export):
    cfg = CONFIGS[name]
    got = _quantize(model, samples, tmp_path / "replay", cfg)
    want = _quantize(model, samples, tmp_path / "recompute", cfg.replace(replay_cache_mb=0))
    assert_same_export(got, want)


def test_replays_skip_the_finished_attention_and_mlp(model, samples, tmp_path):
    batches, layers = SAMPLES * SEQLEN // BATCH_TOKENS, 2
    cfg = QuantConfig(scheme="w4a16", group_size=32, num_samples=SAMPLES, seqlen=SEQLEN)
    replayed, recomputed = {}, {}
    _quantize(model, samples, tmp_path / "a", cfg, replayed)
    _quantize(model, samples, tmp_path / "b", cfg.replace(replay_cache_mb=0), recomputed)
    # per layer: one sample to discover the groups, then one pass per group and the output pass; a pass
    # enters the module that holds its group's first linear (q/k/v: the attention; gate/up: the MLP)
    assert recomputed["LlamaAttention"] == layers * (1 + 5 * batches)  # every pass
    assert recomputed["LlamaMLP"] == layers * (1 + 3 * batches)  # the passes of gate/up, down and the output
    assert replayed["LlamaAttention"] == layers * (1 + 2 * batches)  # the passes of q/k/v and o
    assert replayed["LlamaMLP"] == layers * (1 + 2 * batches)  # the passes of gate/up and down
    # each norm once per batch (in the pass of the group it feeds), then replayed; + the final norm, once
    # while the inputs of layer 0 are captured
    assert replayed["LlamaRMSNorm"] == layers * (2 + 2 * batches) + 1


class _Block(nn.Module):
    def __init__(self, scale: float | None = None, tuple_out: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.scale, self.tuple_out = scale, tuple_out

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        if self.scale is not None:
            y = y * self.scale
        return (y, None) if self.tuple_out else y


class _Layer(nn.Module):
    def __init__(self, **block):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.block = _Block(**block)

    def forward(self, x):
        return x + self.block(self.norm(x))[0] if self.block.tuple_out else x + self.block(self.norm(x))


def _recorded(layer: nn.Module):
    outputs, calls, inputs = {}, {}, {}

    def post(name):
        def hook(_m, args, out):
            outputs[name] = out
            calls[name] = calls.get(name, 0) + 1
            if isinstance(_m, nn.Linear):
                inputs[name] = args[0]
        return hook

    hooks = [m.register_forward_hook(post(n)) for n, m in layer.named_modules() if n]
    layer(torch.randn(2, 8))
    for h in hooks:
        h.remove()
    return outputs, calls, inputs


@pytest.mark.parametrize("tuple_out", [False, True])
def test_find_replays_takes_a_norm_and_a_block_ending_in_its_linear(tuple_out):
    layer = _Layer(tuple_out=tuple_out)
    found = find_replays(layer, *_recorded(layer), {"block.a": 0, "block.b": 1})
    assert sorted(found, key=lambda r: r.module) == [
        Replay("block", 1, "block.b", 1 if tuple_out else None), Replay("norm", 0, None, None)]


def test_find_replays_refuses_what_is_not_the_linear_output_or_not_finished():
    scaled = _Layer(scale=2.0)  # the block's output is computed from b's output, it is not b's output
    assert find_replays(scaled, *_recorded(scaled), {"block.a": 0, "block.b": 1}) == [Replay("norm", 0, None, None)]
    layer = _Layer()
    # a quantized linear of a later group inside the block: the block is not finished after b's group
    assert find_replays(layer, *_recorded(layer), {"block.a": 2, "block.b": 1}) == [Replay("norm", 2, None, None)]
    # b left in float: no pass captures its input
    assert find_replays(layer, *_recorded(layer), {"block.a": 0}) == [Replay("norm", 0, None, None)]
