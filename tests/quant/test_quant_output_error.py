"""The relative output errors ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of GPTQ linears without the ``ΔW H`` product.

The numerator comes from GPTQ's own loss (``output_error.gptq_error_energy``: ``2·loss - λ‖ΔW‖²``), the
denominator from row chunks of ``W H`` (``output_error.output_energy``), both run as small background jobs in
the pipeline (``output_error.OutputError``). Checked against float64 products with ``H``: on the functions
(act-order, dead inputs, the clipping search, per-channel int8, a dampening retry) and on every linear of
a whole run at one and two threads, with the Hessians and unquantized weights captured on the way.
"""

from __future__ import annotations

import pytest
import torch

from quant import output_error, pipeline
from quant.clip import clip_ratios
from quant.config import LayerScheme, QuantConfig
from quant.gptq import QuantResult, accumulate_hessian, gptq_quantize_shared, prepare_hessian
from quant.output_error import gptq_error_energy, output_energy, output_energy_rows
from quant.pipeline import quantize_checkpoint


def _reference(weight: torch.Tensor, result, hessian: torch.Tensor) -> tuple[float, float]:
    """``(tr(ΔW H ΔWᵀ), tr(W H Wᵀ))`` in float64."""
    w, h = weight.double(), hessian.double()
    d = w - result.dequantize(torch.float64)
    return float(torch.einsum("oi,ij,oj->", d, h, d)), float(torch.einsum("oi,ij,oj->", w, h, w))


CASES = {
    "w4a16-g64": (LayerScheme("w4a16", 64), False, (1.0,)),
    "w4a16-g128-clip": (LayerScheme("w4a16", 128), False, clip_ratios(0.8)),
    "w4a16-g64-actorder": (LayerScheme("w4a16", 64), True, (1.0,)),
    "w8a8-actorder": (LayerScheme("w8a8"), True, (1.0,)),
}


@pytest.mark.parametrize("case", CASES)
def test_error_energy_from_the_loss_is_the_product_with_h(case):
    scheme, act_order, ratios = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 256, generator=g) * torch.linspace(0.05, 4, 256)
    x[:, 5] = 0  # a dead input, zeroed before GPTQ's loop
    h = accumulate_hessian(None, 0, x)[0]
    w = torch.randn(200, 256, generator=g) * 0.05
    w[:, 5] = 1.0  # nonzero where H is zero: counts in neither term
    prepared = prepare_hessian(h, 0.01, act_order)
    assert prepared.damping == pytest.approx(0.01 * float(torch.diagonal(h).double().where(h.diagonal() > 0, 1).mean()))
    result = gptq_quantize_shared([w], None, scheme, prepared=prepared, act_order=act_order, clip_ratios=ratios)[0]
    num, den = _reference(w, result, h)
    assert gptq_error_energy(w, result, prepared) == pytest.approx(num, rel=2e-6)
    step = 37  # uneven chunks add up to the whole
    assert sum(output_energy(w, h, slice(a, a + step)) for a in range(0, 200, step)) == pytest.approx(den, rel=1e-6)


def test_error_energy_reads_any_group_order():
    """Groups relabelled (``g_idx`` not ``i // group_size``, the scales' columns permuted to match):
    the same dequantized weight, the same energy as the contiguous groups' path."""
    g = torch.Generator().manual_seed(2)
    h = accumulate_hessian(None, 0, torch.randn(1000, 128, generator=g))[0]
    w = torch.randn(40, 128, generator=g) * 0.05
    prepared = prepare_hessian(h, 0.01)
    result = gptq_quantize_shared([w], None, LayerScheme("w4a16", 32), prepared=prepared)[0]
    relabel = torch.tensor([2, 0, 3, 1])
    scales = torch.empty_like(result.scales)
    scales[:, relabel] = result.scales
    shuffled = QuantResult(result.q, scales, relabel[result.g_idx.long()].to(torch.int32), result.scheme, result.loss)
    assert torch.equal(shuffled.dequantize(), result.dequantize())
    assert gptq_error_energy(w, shuffled, prepared) == pytest.approx(gptq_error_energy(w, result, prepared), rel=1e-9)
    assert gptq_error_energy(w, result, prepared) == pytest.approx(_reference(w, result, h)[0], rel=2e-6)


def test_error_energy_uses_the_dampening_of_the_retry_that_succeeded():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 128, generator=g)
    h = accumulate_hessian(None, 0, x)[0] - 1.5 * torch.eye(128)  # indefinite: 1% and 10% dampening fail
    w = torch.randn(64, 128, generator=g) * 0.05
    prepared = prepare_hessian(h, 0.01, max_damp_retries=5)
    mean_diag = float(torch.diagonal(h).double().mean())
    assert prepared.damping > 0.1 * mean_diag * 1.5  # a retry with more dampening
    result = gptq_quantize_shared([w], None, LayerScheme("w4a16", 32), prepared=prepared)[0]
    assert gptq_error_energy(w, result, prepared) == pytest.approx(_reference(w, result, h)[0], rel=1e-5)


def test_energy_chunks_are_a_few_milliseconds_of_work_and_not_too_few_rows():
    assert output_energy_rows(768) * 768 * 768 <= output_error.ENERGY_MACS
    assert output_energy_rows(768) > output_error.MIN_ENERGY_ROWS
    assert output_energy_rows(2048) == output_energy_rows(14336) == output_error.MIN_ENERGY_ROWS


@pytest.fixture
def torch_threads():
    """``torch_threads(n)`` sets torch's intra-op threads for the test, restored after it."""
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)


@pytest.mark.parametrize("threads,gptaq", [(1, False), (2, False), (1, True)])
def test_every_linears_error_is_the_float64_product(threads, gptaq, tiny_llama, tmp_path, monkeypatch, torch_threads):
    """A whole true-sequential run (act-order, so that the permutation is in play): each linear's reported
    error against float64 ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` from the Hessian and the unquantized weights.
    At two threads the jobs run on the second thread, after the weights were overwritten. With
    ``--gptaq`` GPTQ quantizes least-squares targets, so its loss is not the error of ``W``: the errors are
    still those of the layer's own weights (captured where the targets are made)."""
    torch_threads(threads)
    monkeypatch.setattr(output_error, "ENERGY_MACS", 64 * 64 * 40)  # chunks of 16 rows on these tiny shapes
    monkeypatch.setattr(output_error, "MIN_ENERGY_ROWS", 16)
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2, initializer_range=0.05)
    samples = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    seen = []  # per input group: H, the unquantized weights, the results
    real_prepare, real_targets, real_gptq = (pipeline.prepare_hessian, pipeline.asymmetric_targets,
                                             pipeline.gptq_quantize_shared)

    def prepare(h, *a, **k):
        seen.append({"h": h.clone(), "w": [], "q": []})
        return real_prepare(h, *a, **k)

    def targets(weights, *a, **k):
        seen[-1]["w"] = [w.detach().clone() for w in weights]
        return real_targets(weights, *a, **k)

    def quantize(weights, *a, **k):
        out = real_gptq(weights, *a, **k)
        if not gptaq:
            seen[-1]["w"] += [w.detach().clone() for w in weights]
        seen[-1]["q"] += out
        return out

    monkeypatch.setattr(pipeline, "prepare_hessian", prepare)
    monkeypatch.setattr(pipeline, "asymmetric_targets", targets)
    monkeypatch.setattr(pipeline, "gptq_quantize_shared", quantize)
    cfg = QuantConfig(scheme="w4a16", group_size=32, act_order=True, gptaq=gptaq, num_samples=8, seqlen=32)
    report = quantize_checkpoint(model, tmp_path / "out", cfg, samples=samples, progress=False)
    got = [e for s in report.layers for e in s.errors.values()]
    want = []
    for group in seen:
        for w, result in zip(group["w"], group["q"], strict=True):
            num, den = _reference(w, result, group["h"])
            want.append(num / den)
    assert len(got) == len(want) == 2 * 7
    assert got == pytest.approx(want, rel=1e-5)
    assert min(want) > 0
