"""GPTQ math contracts on a random linear with correlated inputs, against float64 references written here."""

from __future__ import annotations

import pytest
import torch

from quant.config import LayerScheme, QuantConfig, parse_override
from quant.errors import QuantInputError
from quant.gptq import (HessianError, accumulate_hessian, gptq_quantize, gptq_quantize_shared, inverse_cholesky,
                        mirror_lower, rtn_quantize, smoothquant_scales)

W4 = LayerScheme("w4a16", 32)
W4_CHANNEL = LayerScheme("w4a16", -1)
W8 = LayerScheme("w8a8")


def _problem(out_f=48, in_f=128, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    x = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ (torch.eye(in_f, dtype=torch.float64) + 2 * mix)
    x[:, :4] *= 6  # a few outlier channels
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.05
    return w, x


def _reference_gptq(w, h, scheme, damp=0.01):
    """Float64, one column at a time (no lazy blocks): the algorithm of the GPTQ paper."""
    w = w.clone()
    out_f, in_f = w.shape
    lo, hi = (-8, 7) if scheme.bits == 4 else (-127, 127)
    stored = torch.float16 if scheme.bits == 4 else torch.float32
    gsize = in_f if scheme.n_groups(in_f) == 1 else scheme.group_size
    h = h.clone() + damp * torch.diagonal(h).mean() * torch.eye(in_f, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros_like(w)
    scales = torch.zeros(out_f, in_f // gsize, dtype=torch.float64)
    for i in range(in_f):
        if i % gsize == 0:
            amax = w[:, i:i + gsize].abs().amax(dim=1)
            s = (amax * 2 / 15 if scheme.bits == 4 else amax / 127).to(stored).to(torch.float64)
            scales[:, i // gsize] = torch.where(s > 0, s, torch.ones_like(s))
        s = scales[:, i // gsize]
        q[:, i] = torch.clamp(torch.round(w[:, i] / s), lo, hi)
        err = (w[:, i] - q[:, i] * s) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
    return q, scales


def _output_error(w, deq, x):
    return float(((x @ (w - deq).t()) ** 2).mean())


@pytest.mark.parametrize("syrk", [True, False], ids=["ssyrk", "gemm"])
@pytest.mark.parametrize("block", [512, 48, 7], ids=["one-block", "blocks-48", "blocks-7-ragged"])
def test_hessian_is_two_x_xt_over_n(block, syrk):
    _, x = _problem(n=300)
    h, n = None, 0
    for chunk in x.split(64):
        h, n = accumulate_hessian(h, n, chunk.float().unsqueeze(0), block=block, syrk=syrk)
    assert n == 300
    # The mirrored blocks are exact copies (diagonal blocks symmetric up to GEMM rounding; exactly with ssyrk).
    b = min(block, h.shape[0])
    assert torch.equal(h[b:, :b], h[:b, b:].t())
    if syrk:
        assert torch.equal(h, h.t())
    torch.testing.assert_close(h.double(), 2 * x.t() @ x / 300, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block", [32, 512])
def test_hessian_mirrored_once_after_the_batches_is_the_same(block):
    """ssyrk touches one triangle: mirroring once after all batches (the pipeline's passes) gives the H
    of mirroring after every batch, bit for bit."""
    _, x = _problem(n=300)
    every, once, n = None, None, 0
    for chunk in x.split(64):
        every, _ = accumulate_hessian(every, n, chunk.float(), block=block, syrk=True)
        once, n = accumulate_hessian(once, n, chunk.float(), block=block, syrk=True, mirror=False)
    assert not torch.equal(once, every)  # the upper triangle is stale before the mirroring
    assert torch.equal(mirror_lower(once, block), every)


@pytest.mark.parametrize("scheme", [W4, W4_CHANNEL, W8], ids=["w4-g32", "w4-channel", "w8-channel"])
def test_gptq_matches_float64_reference(scheme):
    w, x = _problem()
    h = 2 * x.t() @ x / x.shape[0]
    res = gptq_quantize(w.float(), h.float(), scheme, block_size=32)
    q_ref, s_ref = _reference_gptq(w, h, scheme)
    # fp16 scales of the first group come from untouched weights: identical; later ones see float32 updates.
    torch.testing.assert_close(res.scales.double(), s_ref, rtol=2e-3, atol=0)
    if scheme.bits == 4:
        assert torch.equal(res.scales[:, 0].double(), s_ref[:, 0])
    mismatch = (res.q.double() != q_ref).double().mean().item()
    assert mismatch < 0.005, f"{mismatch:.2%} of the integers differ from the float64 reference"
    err = _output_error(w, res.dequantize(torch.float64), x)
    err_ref = _output_error(w, q_ref * s_ref.repeat_interleave(w.shape[1] // s_ref.shape[1], dim=1), x)
    assert err == pytest.approx(err_ref, rel=0.02)


@pytest.mark.parametrize("scheme,act_order", [(W4, False), (W4_CHANNEL, False), (W8, False), (W4, True)],
                         ids=["w4-g32", "w4-channel", "w8-channel", "w4-g32-act-order"])
def test_gptq_output_error_at_most_0p8_of_rtn(scheme, act_order):
    w, x = _problem(seed=1)
    h = (2 * x.t() @ x / x.shape[0]).float()
    gptq = gptq_quantize(w.float(), h, scheme, act_order=act_order)
    rtn = rtn_quantize(w.float(), scheme)
    e_gptq = _output_error(w, gptq.dequantize(torch.float64), x)
    e_rtn = _output_error(w, rtn.dequantize(torch.float64), x)
    assert e_gptq <= 0.8 * e_rtn, (e_gptq, e_rtn)
    if act_order:
        assert torch.equal(gptq.g_idx, rtn.g_idx)  # static groups keep g_idx in natural order


def test_scales_are_stored_dtype_values_and_grid_is_symmetric():
    w, x = _problem()
    h = (2 * x.t() @ x / x.shape[0]).float()
    res = gptq_quantize(w.float(), h, W4)
    assert res.scales.dtype == torch.float16
    assert int(res.q.min()) >= -8 and int(res.q.max()) <= 7
    r8 = rtn_quantize(w.float(), W8)
    assert r8.scales.dtype == torch.float32 and int(r8.q.abs().max()) == 127


def test_rtn_is_round_to_nearest():
    w, _ = _problem()
    res = rtn_quantize(w.float(), W8)
    s = res.scales.double()
    assert torch.equal(res.q.double(), torch.clamp(torch.round(w.float().double() / s), -127, 127))


@pytest.mark.parametrize("scheme", [W4, W4_CHANNEL, W8], ids=["w4-g32", "w4-channel", "w8-channel"])
def test_dequantize_into_writes_q_times_scale(scheme):
    w, _ = _problem()
    res = rtn_quantize(w.float(), scheme)
    out = torch.empty(w.shape, dtype=torch.float32)
    res.dequantize_into(out)
    gsize = w.shape[1] // res.scales.shape[1]
    exact = res.q.double() * res.scales.double().repeat_interleave(gsize, dim=1)  # exact in float64
    assert torch.equal(out, exact.float())  # float32 products are the correctly rounded exact ones


def test_cholesky_retries_dampening_then_fails_clearly():
    x = torch.randn(4, 16, dtype=torch.float64)  # rank 4 < 16: needs dampening
    h = 2 * x.t() @ x / 4
    upper = inverse_cholesky(h, damp_percent=1e-12)
    assert torch.isfinite(upper).all()
    bad = -torch.eye(16) + 0.5 * torch.ones(16, 16)  # indefinite whatever the dampening tried
    bad.diagonal().fill_(0.01)
    with pytest.raises(HessianError, match="Cholesky failed"):
        inverse_cholesky(bad, damp_percent=0.01, max_retries=1)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    _, x = _problem(in_f=96, n=400)
    h = 2 * x.t() @ x / x.shape[0]
    upper = inverse_cholesky(h.float(), damp_percent=0.01)
    damped = h.float().double() + 0.01 * torch.diagonal(h.float().double()).mean() * torch.eye(96, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # float64 reference: inverse, then Cholesky
    assert upper.dtype == torch.float64 and torch.equal(upper, upper.triu())
    torch.testing.assert_close(upper, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    assert inverse_cholesky(h.float(), 0.01, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("scheme,act_order", [(W4, False), (W8, False), (W4, True)], ids=["w4-g32", "w8", "w4-act-order"])
def test_shared_input_linears_quantized_together_match_one_by_one(scheme, act_order):
    w, x = _problem(out_f=80, seed=2)
    h = (2 * x.t() @ x / x.shape[0]).float()
    parts = [w[:16].float(), w[16:24].float(), w[24:].float()]  # e.g. q, k, v of different heights
    together = gptq_quantize_shared(parts, h, scheme, act_order=act_order)
    for part, res in zip(parts, together):
        alone = gptq_quantize(part, h, scheme, act_order=act_order)
        mismatch = (res.q != alone.q).double().mean().item()
        assert mismatch < 0.002, f"{mismatch:.2%} of the integers differ"
        torch.testing.assert_close(res.scales, alone.scales, rtol=2e-3, atol=0)
        assert res.loss == pytest.approx(alone.loss, rel=0.01)
        assert res.q.shape == part.shape and torch.equal(res.g_idx, alone.g_idx)


def test_smoothquant_scales_balance_ranges():
    act = torch.tensor([10.0, 1.0, 0.1])
    w = torch.tensor([[0.1, 1.0, 1.0]])
    s = smoothquant_scales(act, [w], alpha=0.5)
    torch.testing.assert_close(act / s, w.abs().amax(0) * s)  # alpha 0.5: equal max ranges


def test_config_overrides_ignore_and_validation():
    cfg = QuantConfig(scheme="w4a16", group_size=64, overrides=dict([
        parse_override("model.layers.*.mlp.down_proj=w8a8"),
        parse_override('model.layers.0.*={"scheme": "w4a16", "group_size": 32}')]),
        ignore=("lm_head", "model.layers.1.self_attn.o_proj"))
    assert cfg.scheme_for("model.layers.1.mlp.down_proj") == W8
    assert cfg.scheme_for("model.layers.0.mlp.down_proj") == LayerScheme("w4a16", 32)  # last match wins
    assert cfg.scheme_for("model.layers.1.mlp.up_proj") == LayerScheme("w4a16", 64)
    assert cfg.scheme_for("model.layers.1.self_attn.o_proj") is None
    for bad in [dict(group_size=48), dict(scheme="w3"), dict(smoothquant=0.5), dict(format="gptq", scheme="w8a8"),
                dict(overrides={"x": {"scheme": "w8a8", "group_size": 64}})]:
        with pytest.raises(QuantInputError):
            QuantConfig(**bad)
    with pytest.raises(QuantInputError, match="--override"):
        parse_override("no-equals-sign")
