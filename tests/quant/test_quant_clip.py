"""The clipping search of group scales (quant.clip) against a float64 brute force written here."""

from __future__ import annotations

import pytest
import torch

from quant.clip import clip_ratios, search_scales
from quant.config import LayerScheme, QuantConfig
from quant.errors import QuantInputError
from quant.gptq import gptq_quantize

RATIOS = clip_ratios(0.7)


def _reference_errors(w: torch.Tensor, imp: torch.Tensor, bits: int, ratios) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64: for every row and ratio, the stored-dtype scale and sum_i imp_i (w_i - s q_i)^2."""
    w, imp = w.double(), imp.double()
    lo, hi, stored = (-8, 7, torch.float16) if bits == 4 else (-127, 127, torch.float32)
    amax = w.abs().amax(dim=1).float()
    scales, errors = [], []
    for r in ratios:
        # the candidate scale: (ratio * amax) * 2/15 in float32 arithmetic, rounded to the stored dtype
        clipped = amax * r
        s = (clipped * (2.0 / 15.0) if bits == 4 else clipped / 127.0).to(stored).double()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(w / s.unsqueeze(1)), lo, hi)
        scales.append(s)
        errors.append(((w - q * s.unsqueeze(1)) ** 2 * imp).sum(dim=1))
    return torch.stack(scales, 1), torch.stack(errors, 1)  # [rows, ratios]


def _weights(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.05
    w[torch.arange(rows), torch.randint(0, n, (rows,), generator=g)] *= 4  # one outlier per row
    imp = torch.rand(n, generator=g) ** 4 * 10  # a few inputs matter much more than the rest
    return w, imp


@pytest.mark.parametrize("scheme", [LayerScheme("w4a16", 32), LayerScheme("w8a8")], ids=["int4", "int8"])
def test_search_picks_the_ratio_with_least_weighted_error(scheme):
    w, imp = _weights(256, 32, seed=1)
    got = search_scales(w, imp, scheme, RATIOS).double()
    ref_scales, ref_err = _reference_errors(w, imp, scheme.bits, RATIOS)
    best = ref_err.min(dim=1).values
    # the error of the chosen scale, measured in float64
    lo, hi = (-8, 7) if scheme.bits == 4 else (-127, 127)
    q = torch.clamp(torch.round(w.double() / got.unsqueeze(1)), lo, hi)
    got_err = ((w.double() - q * got.unsqueeze(1)) ** 2 * imp.double()).sum(dim=1)
    assert torch.all(got_err <= best * (1 + 1e-5) + 1e-12), "a row did not get the least weighted error"
    assert torch.all(got_err <= ref_err[:, 0] * (1 + 1e-6) + 1e-12), "worse than the amax scale"
    # rows with a clear winner get exactly its scale
    second = ref_err.sort(dim=1).values[:, 1]
    clear = second > best * (1 + 1e-4)
    winner = ref_scales.gather(1, ref_err.argmin(dim=1, keepdim=True)).squeeze(1)
    assert clear.sum() > 200
    assert torch.equal(got[clear], winner[clear])
    if scheme.bits == 4:  # int4 on outlier rows: the search does clip
        assert (got < ref_scales[:, 0]).float().mean() > 0.3


def test_one_ratio_is_the_amax_scale_and_zero_importance_keeps_it():
    w, imp = _weights(64, 32, seed=2)
    scheme = LayerScheme("w4a16", 32)
    amax_scales = search_scales(w, imp, scheme, (1.0,))
    assert torch.equal(amax_scales, (w.abs().amax(1) * 2 / 15).half().float())
    assert torch.equal(search_scales(w, torch.zeros(32), scheme, RATIOS), amax_scales)
    with pytest.raises(ValueError):
        search_scales(w, imp, scheme, (0.9, 1.0))


def test_gptq_with_diagonal_hessian_uses_the_searched_scale_of_each_group():
    """With a diagonal H, GPTQ makes no error feedback: its group scales are the search on the weights."""
    w, _ = _weights(32, 128, seed=3)
    g = torch.Generator().manual_seed(4)
    d = torch.rand(128, generator=g) ** 4 * 10 + 1e-3
    scheme = LayerScheme("w4a16", 32)
    res = gptq_quantize(w, torch.diag(d), scheme, clip_ratios=RATIOS)
    expect = torch.stack([search_scales(w[:, k:k + 32], d[k:k + 32], scheme, RATIOS) for k in range(0, 128, 32)], 1)
    assert torch.equal(res.scales.float(), expect)
    plain = gptq_quantize(w, torch.diag(d), scheme)
    assert not torch.equal(plain.scales, res.scales)
    ref_errs = [((w - r.dequantize()) ** 2 * d).sum().item() for r in (plain, res)]
    assert ref_errs[1] < ref_errs[0]


def test_config_ratios_and_validation():
    assert QuantConfig(clip_search=False).clip_ratios == (1.0,)
    assert QuantConfig().clip_ratios == QuantConfig(clip_search=True).clip_ratios == clip_ratios(0.8)
    cfg = QuantConfig(clip_search=True, clip_min_ratio=0.9)
    assert cfg.clip_ratios == (1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9)
    with pytest.raises(QuantInputError, match="--clip-min-ratio"):
        QuantConfig(clip_min_ratio=0)


def test_pipeline_clip_search_changes_scales_and_lowers_the_layer_error(tiny_llama, tmp_path):
    """--clip-search reaches GPTQ through the pipeline: other scales, less output error on the calibration data."""
    from models.tiny import synthetic_corpus
    from quant.checkpoint import ShardReader
    from quant.pipeline import quantize_checkpoint

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(synthetic_corpus(40)))
    src = tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2, initializer_range=0.05)
    reports, readers = {}, {}
    for clip in (False, True):
        cfg = QuantConfig(group_size=32, num_samples=8, seqlen=64, clip_search=clip)
        reports[clip] = quantize_checkpoint(src, tmp_path / f"clip-{clip}", cfg, calib, progress=False)
        readers[clip] = ShardReader(tmp_path / f"clip-{clip}")
    name = "model.layers.0.mlp.down_proj.scales"
    assert not torch.equal(readers[False].read(name), readers[True].read(name))
    mean_err = {c: sum(s.mean_error for s in r.layers) / len(r.layers) for c, r in reports.items()}
    assert mean_err[True] < 0.97 * mean_err[False], mean_err
