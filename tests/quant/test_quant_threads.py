"""Threads in quantization: GPTQ's column loop over row chunks (``quant.gptq._ColumnLoop``) and the errors.

Rows of W are independent given H, so running the loop on contiguous chunks
of rows, one thread each, must give the integers and scales of one thread bit
for bit: checked on the loop itself (grouped int4 with the clipping search,
act-order with static groups, per-channel int8; several linears stacked;
uneven chunks) and on whole exports of a tiny Llama, where the pipeline must
actually take the threaded path. The pipeline also computes each linear's
relative output error on a second thread while later groups are factorized
and quantized (``pipeline._Background``): the same errors, on that thread.
"""

from __future__ import annotations

import threading

import pytest
import torch

from quant import gptq, output_error, pipeline
from quant.clip import clip_ratios
from quant.config import LayerScheme, QuantConfig
from quant.gptq import _row_chunks, _run_threads, accumulate_hessian, gptq_quantize_shared, prepare_hessian
from quant.pipeline import quantize_checkpoint


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows and more, so that the tiny shapes below split."""
    monkeypatch.setattr(gptq, "MIN_CHUNK_ROWS", 16)
    monkeypatch.setattr(gptq, "CHUNK_ALIGN", 16)


@pytest.mark.parametrize("rows,workers", [(4096, 2), (1280, 3), (700, 4), (300, 2), (255, 2), (64, 4)])
def test_row_chunks_cover_every_row_once_at_aligned_starts(rows, workers):
    chunks = _row_chunks(rows, workers)
    assert chunks[0].start == 0 and chunks[-1].stop == rows
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert all(c.start % gptq.CHUNK_ALIGN == 0 for c in chunks)
    assert len(chunks) == max(1, min(workers, rows // gptq.MIN_CHUNK_ROWS))
    if len(chunks) > 1:
        assert min(c.stop - c.start for c in chunks) >= gptq.MIN_CHUNK_ROWS - gptq.CHUNK_ALIGN


def test_gptq_workers_follow_torch_threads_on_the_cpu_only():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert gptq.gptq_workers("cpu") == 1
        torch.set_num_threads(2)
        assert gptq.gptq_workers("cpu") == 2
        assert gptq.gptq_workers("cpu", reserve=1) == 1
        torch.set_num_threads(4)
        assert gptq.gptq_workers("cpu") == gptq.MAX_GPTQ_WORKERS
        assert gptq.gptq_workers("cpu", reserve=1) == min(3, gptq.MAX_GPTQ_WORKERS)
        assert gptq.gptq_workers("cuda") == 1
    finally:
        torch.set_num_threads(n)


CASES = {
    "w4a16-g32-clip": (LayerScheme("w4a16", 32), False, clip_ratios(0.8)),
    "w4a16-g64-actorder": (LayerScheme("w4a16", 64), True, (1.0,)),
    "w8a8": (LayerScheme("w8a8"), False, (1.0,)),
}


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("case", CASES)
def test_threaded_column_loop_gives_one_threads_results_bit_for_bit(case, workers, small_chunks):
    scheme, act_order, ratios = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 128, generator=g) * torch.linspace(0.1, 3, 128)
    prepared = prepare_hessian(accumulate_hessian(None, 0, x)[0], act_order=act_order)
    weights = [torch.randn(n, 128, generator=g) * 0.05 for n in (72, 40, 56)]  # stacked like q, k, v
    options = dict(prepared=prepared, act_order=act_order, clip_ratios=ratios)
    want = gptq_quantize_shared(weights, None, scheme, workers=1, **options)
    got = gptq_quantize_shared(weights, None, scheme, workers=workers, **options)
    assert len(_row_chunks(168, workers)) == workers  # the rows were really split
    for a, b in zip(got, want):
        assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.g_idx, b.g_idx)
        assert a.loss == pytest.approx(b.loss, rel=1e-12)


def test_a_worker_threads_exception_reaches_the_caller():
    def fail():
        raise ValueError("in a worker")

    with pytest.raises(ValueError, match="in a worker"):
        _run_threads([(lambda: None, ()), (fail, ())])


@pytest.fixture
def torch_threads():
    """``torch_threads(n)`` sets torch's intra-op threads for the test, restored after it."""
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)


@pytest.mark.parametrize("cfg", [
    QuantConfig(scheme="w4a16", group_size=32, num_samples=8, seqlen=32),  # the defaults: true-sequential, clip
    QuantConfig(scheme="w8a8", true_sequential=False, num_samples=8, seqlen=32),
], ids=["w4a16-default", "w8a8-1pass"])
def test_threaded_export_is_the_one_thread_export(cfg, tiny_llama, tmp_path, monkeypatch, small_chunks, torch_threads,
                                                  assert_same_export):
    """One thread against four: the errors are computed on a second thread while GPTQ runs
    (``pipeline._Background``) and the column loops run on the 3 others."""
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2, initializer_range=0.05)
    samples = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    threaded, error_threads = [], []
    real_run_threads, real_energy_job = gptq._run_threads, output_error.OutputError.energy_job
    monkeypatch.setattr(gptq, "_run_threads", lambda calls: (threaded.append(len(calls)), real_run_threads(calls)))
    monkeypatch.setattr(output_error.OutputError, "energy_job",
                        lambda self, k: (error_threads.append(threading.get_ident()), real_energy_job(self, k)))
    runs = {}
    for workers in (1, 4):
        torch_threads(workers)  # 4 intra-op threads: one for the errors, 3 GPTQ workers
        monkeypatch.setattr(gptq, "MAX_GPTQ_WORKERS", workers)
        runs[workers] = quantize_checkpoint(model, tmp_path / f"w{workers}", cfg, samples=samples, progress=False)
    assert threaded and max(threaded) == 3  # column loops on 3 threads
    per_run = len(error_threads) // 2  # denominator chunks: 7 linears in each of 2 layers, at least one each
    assert per_run >= 2 * 7 and set(error_threads[:per_run]) == {threading.get_ident()}
    assert set(error_threads[per_run:]) - {threading.get_ident()}  # the second run's (some) on another thread
    assert_same_export(tmp_path / "w4", tmp_path / "w1")
    assert [s.errors for s in runs[4].layers] == [s.errors for s in runs[1].layers]
