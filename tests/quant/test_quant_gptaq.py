"""GPTAQ's asymmetric calibration (quant.gptaq) against float64 least squares and HF transformers' float model."""

from __future__ import annotations

import pytest
import torch

from quant.config import LayerScheme, QuantConfig
from quant.errors import QuantInputError
from quant.gptaq import FloatStream, asymmetric_targets


def asymmetric_target(w, d, h, damp_percent, alpha):
    """The target of one linear."""
    return asymmetric_targets([w], d, h, damp_percent, alpha)[0]
from quant.gptq import accumulate_hessian, gptq_quantize


def _inputs(n: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float-model inputs ``x_fp`` [n, width] with unequal channel scales, and quantized-model inputs ``x``
    that differ from them by a correlated error (what quantized earlier layers leave)."""
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(n, width, generator=g) * (0.5 + torch.rand(width, generator=g) * 2)
    mix = torch.randn(width, width, generator=g) * 0.05
    x = x_fp + x_fp @ mix + 0.05 * torch.randn(n, width, generator=g)
    return x_fp, x


def _statistics(x_fp: torch.Tensor, x: torch.Tensor, batch: int = 700) -> tuple[torch.Tensor, torch.Tensor]:
    """H and D as the pipeline accumulates them: in batches, through FloatStream.accumulate."""
    stream = FloatStream(torch.zeros(1, 1))
    stream.inputs["lin"] = x_fp.unsqueeze(0)  # one "sample" of n tokens
    h, n = None, 0
    for s in range(0, x.shape[0], batch):
        rows = slice(s, s + batch)
        xb = x[rows].unsqueeze(0)
        # FloatStream indexes its float inputs by sample rows: give it this batch's tokens as one sample
        stream.inputs["lin"] = x_fp[rows].unsqueeze(0)
        stream.accumulate("lin", slice(0, 1), xb)
        h, n = accumulate_hessian(h, n, xb)
    return h, stream.cross["lin"]


def test_cross_term_matches_float64():
    x_fp, x = _inputs(3000, 48, seed=0)
    _, d = _statistics(x_fp, x)
    want = 2.0 / x.shape[0] * (x_fp.double() - x.double()).t() @ x.double()
    torch.testing.assert_close(d.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_target_is_the_least_squares_fit_of_the_float_outputs():
    """alpha 1 and (almost) no dampening: W_t = argmin_V ||x_fp Wᵀ − x Vᵀ||², solved by float64 lstsq."""
    x_fp, x = _inputs(4000, 48, seed=1)
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(2)) * 0.1
    h, d = _statistics(x_fp, x)
    got = asymmetric_target(w, d, h, damp_percent=1e-9, alpha=1.0).double()
    want = torch.linalg.lstsq(x.double(), x_fp.double() @ w.double().t()).solution.t()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    # and the objective identity: ||x_fp Wᵀ − x Qᵀ||² − ||x (W_t − Q)ᵀ||² does not depend on Q
    g = torch.Generator().manual_seed(3)
    consts = []
    for _ in range(3):
        q = w.double() + 0.02 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        full = ((x_fp.double() @ w.double().t() - x.double() @ q.t()) ** 2).sum()
        reduced = ((x.double() @ (want - q).t()) ** 2).sum()
        consts.append(float(full - reduced))
    assert max(consts) - min(consts) < 1e-9 * abs(consts[0]) + 1e-6


def test_alpha_and_dampening_against_float64():
    x_fp, x = _inputs(3000, 40, seed=4)
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(5)) * 0.1
    h, d = _statistics(x_fp, x)
    damp, alpha = 0.05, 0.4
    h64 = 2.0 / x.shape[0] * x.double().t() @ x.double()
    d64 = 2.0 / x.shape[0] * (x_fp.double() - x.double()).t() @ x.double()
    damped = h64 + damp * float(h64.diagonal().mean()) * torch.eye(40, dtype=torch.float64)
    want = w.double() + alpha * torch.linalg.solve(damped, (w.double() @ d64).t()).t()
    got = asymmetric_target(w, d, h, damp_percent=damp, alpha=alpha).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_smoothed_coordinates_give_the_smoothed_target():
    """SmoothQuant feeds x / s to W · s: the pipeline rescales D like H (D / s sᵀ), and the target must then be
    the unsmoothed one times s (without dampening, which depends on the scale of H)."""
    x_fp, x = _inputs(3000, 32, seed=9)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(10)) * 0.1
    s = 0.5 + torch.rand(32, generator=torch.Generator().manual_seed(11))
    h, d = _statistics(x_fp, x)
    want = asymmetric_target(w, d, h, 1e-9, 0.7) * s
    got = asymmetric_target(w * s, d / s.unsqueeze(1) / s.unsqueeze(0), h / s.unsqueeze(1) / s.unsqueeze(0), 1e-9, 0.7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_both_routes_agree():
    """A group with more rows than inputs takes W (D H⁻¹), else H⁻¹ (W D)ᵀ: the same targets."""
    x_fp, x = _inputs(3000, 32, seed=12)
    h, d = _statistics(x_fp, x)
    g = torch.Generator().manual_seed(13)
    wide, narrow = torch.randn(40, 32, generator=g) * 0.1, torch.randn(8, 32, generator=g) * 0.1
    together = asymmetric_targets([wide, narrow], d, h, 0.01, 0.5)  # 48 rows > 32 inputs: D H⁻¹
    alone = [asymmetric_targets([w], d, h, 0.01, 0.5)[0] for w in (narrow,)]  # 8 rows: H⁻¹ (W D)ᵀ
    torch.testing.assert_close(together[1], alone[0], rtol=1e-4, atol=1e-6)


def test_equal_inputs_leave_the_weight_unchanged():
    x_fp, _ = _inputs(2000, 32, seed=6)
    w = torch.randn(16, 32)
    h, d = _statistics(x_fp, x_fp)
    assert float(d.abs().max()) == 0.0
    assert torch.equal(asymmetric_target(w, d, h, 0.01, 0.5), w)


def test_gptq_on_the_target_fits_the_float_outputs_better():
    """The point of GPTAQ: GPTQ of W_t has a smaller ||x_fp Wᵀ − x Qᵀ|| than GPTQ of W (same H)."""
    x_fp, x = _inputs(4000, 128, seed=7)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(8)) * 0.05
    h, d = _statistics(x_fp, x)
    scheme = LayerScheme("w4a16", 64)

    def asym_error(weight: torch.Tensor) -> float:
        q = gptq_quantize(weight, h, scheme).dequantize().double()
        return float(((x_fp.double() @ w.double().t() - x.double() @ q.t()) ** 2).sum())

    plain = asym_error(w)
    gptaq = asym_error(asymmetric_target(w, d, h, 0.01, 1.0))
    assert gptaq < 0.8 * plain


def test_float_stream_follows_the_float_model(tiny_llama, calib, tmp_path, monkeypatch):
    """Through a whole quantization run, the float hidden state after every layer is HF transformers' own
    float hidden state, and the first input group of layer 0 (float and quantized inputs equal) is quantized
    exactly as without GPTAQ."""
    from transformers import AutoModelForCausalLM

    from quant.checkpoint import ShardReader
    from quant.pipeline import quantize_checkpoint

    model_dir = tiny_llama()
    seen: list[torch.Tensor] = []
    record = FloatStream.record_layer

    def spy(self, *args, **kwargs):
        record(self, *args, **kwargs)
        seen.append(self.hidden.clone())

    monkeypatch.setattr(FloatStream, "record_layer", spy)
    base = QuantConfig(num_samples=4, seqlen=32, group_size=32, calib_dtype="float32")
    quantize_checkpoint(model_dir, tmp_path / "plain", base, calib, progress=False)
    quantize_checkpoint(model_dir, tmp_path / "gptaq", base.replace(gptaq=True, gptaq_alpha=1.0), calib,
                        progress=False)

    from quant.calib import calibration_samples, load_tokenizer

    samples = calibration_samples(calib, load_tokenizer(model_dir), 4, 32, 0)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        states = hf(samples, output_hidden_states=True).hidden_states
    assert len(seen) == hf.config.num_hidden_layers
    for i, got in enumerate(seen[:-1]):  # the last entry of hidden_states has the final norm applied
        torch.testing.assert_close(got.float(), states[i + 1], rtol=1e-4, atol=1e-4)

    plain, asym = ShardReader(tmp_path / "plain"), ShardReader(tmp_path / "gptaq")
    first = "model.layers.0.self_attn.q_proj.qweight"
    assert torch.equal(plain.read(first), asym.read(first))
    later = [n for n in plain.names() if n.endswith(".qweight") and not n.startswith("model.layers.0.self_attn.")]
    assert any(not torch.equal(plain.read(n), asym.read(n)) for n in later)


def test_bad_settings_are_refused():
    with pytest.raises(QuantInputError, match="--gptaq-alpha"):
        QuantConfig(gptaq=True, gptaq_alpha=0.0)
    with pytest.raises(QuantInputError, match="--gptaq applies to --method gptq"):
        QuantConfig(gptaq=True, method="rtn")
