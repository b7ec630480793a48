"""``--device``: the device code path, run on the CPU, against the CPU path.

A device run differs from the CPU run in where tensors live (layer, kwargs and
Hessians onloaded, activations either resident on the device or in host
memory copied per batch, results offloaded before writing), in not parking H
in a file, and in factorizing H with ``torch.linalg`` on the device instead of
scipy's LAPACK. Forced through a :class:`~quant.device.Placement` on the CPU:

- with LAPACK, the device branches must give the CPU path's integers and
  scales bit for bit;
- the ``torch.linalg`` factorization must match LAPACK's and an independent
  float64 reference (Cholesky of the explicit inverse), and a whole run with
  it (everything a CUDA run does except the device itself) must give nearly
  the same integers, scales within float rounding, and the same errors.
"""

from __future__ import annotations

import pytest
import torch

from quant.checkpoint import ShardReader
from quant.config import LayerScheme, QuantConfig
from quant.device import Placement, resolve_device, to_device
from quant.gptq import HessianError, _reversed_inverse_factor, accumulate_hessian, gptq_quantize_shared, prepare_hessian
from quant.pipeline import quantize_checkpoint

CPU = torch.device("cpu")
DEVICE_BRANCHES = Placement(CPU, activations_on_device=False, lapack=True)
CUDA_LIKE = Placement(CPU, activations_on_device=False, lapack=False)

CONFIGS = {
    # grouped int4 (scales from error-updated weights), true-sequential, one linear per layer in w8a8
    "w4a16-g32": QuantConfig(scheme="w4a16", group_size=32, num_samples=12, seqlen=48, device="cpu",
                             overrides={"model.layers.*.mlp.down_proj": {"scheme": "w8a8"}}),
    # int4 act-order with static groups
    "w4a16-actorder": QuantConfig(scheme="w4a16", group_size=64, act_order=True, num_samples=12, seqlen=48,
                                  device="cpu"),
    # per-channel int8 with SmoothQuant (activation maxima), one pass per layer
    "w8a8-smooth": QuantConfig(scheme="w8a8", smoothquant=0.5, true_sequential=False, num_samples=12, seqlen=48,
                               device="cpu"),
    # GPTAQ (float stream and inputs kept where the activations are), true-sequential and one pass + SmoothQuant
    "w4a16-gptaq": QuantConfig(scheme="w4a16", group_size=32, gptaq=True, num_samples=12, seqlen=48, device="cpu"),
    "w8a8-smooth-gptaq": QuantConfig(scheme="w8a8", smoothquant=0.5, true_sequential=False, gptaq=True,
                                     num_samples=12, seqlen=48, device="cpu"),
}


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2, initializer_range=0.05)


@pytest.fixture(scope="module")
def samples():
    return torch.randint(3, 512, (12, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cpu_runs(model, samples, tmp_path_factory):
    """The CPU path (``device="cpu"``) for every config: name -> (export dir, report)."""
    runs = {}
    for name, cfg in CONFIGS.items():
        out = tmp_path_factory.mktemp(f"cpu-{name}") / "out"
        runs[name] = out, quantize_checkpoint(model, out, cfg, samples=samples, progress=False)
    return runs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_device_branches_give_the_cpu_path_bit_for_bit(name, model, samples, cpu_runs, tmp_path, assert_same_export):
    out = tmp_path / "out"
    report = quantize_checkpoint(model, out, CONFIGS[name], samples=samples, progress=False, placement=DEVICE_BRANCHES)
    assert_same_export(out, cpu_runs[name][0])
    assert [s.errors for s in report.layers] == [s.errors for s in cpu_runs[name][1].layers]


def _hessian(width: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.linspace(0.1, 3, width)  # uneven channel scales
    return accumulate_hessian(None, 0, x)[0]


def test_torch_factorization_matches_lapack_and_a_float64_reference():
    h = _hessian(96, 400, 0)
    damp = 0.01
    lapack = torch.from_numpy(_reversed_inverse_factor(h, damp, 0)[0].copy())
    prepared = prepare_hessian(h, damp, lapack=False)
    torch_factor = prepared.flipped_inverse
    assert isinstance(torch_factor, torch.Tensor) and torch_factor.dtype == torch.float64
    torch.testing.assert_close(torch_factor, lapack, rtol=1e-10, atol=1e-12)
    # Independent: U = chol(inv(H + λI)) upper, computed the textbook way in float64 from H's upper
    # triangle (the one both factorizations read; a float32 GEMM leaves H symmetric only to rounding).
    hd = torch.triu(h).double() + torch.triu(h, 1).double().t()
    hd += damp * hd.diagonal().mean() * torch.eye(96, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    torch.testing.assert_close(torch_factor.flip((0, 1)), reference, rtol=1e-9, atol=1e-12)
    # Block rows read by GPTQ: the same float32 values from either representation.
    lapack_prepared = prepare_hessian(h, damp, lapack=True)
    for i1, i2 in ((0, 32), (32, 96), (90, 96)):
        torch.testing.assert_close(prepared.upper_rows(i1, i2), lapack_prepared.upper_rows(i1, i2), rtol=1e-6, atol=0)
        torch.testing.assert_close(prepared.upper_rows(i1, i2), reference[i1:i2, i1:].float(), rtol=1e-6, atol=1e-7)


def test_torch_factorization_retries_dampening_like_lapack():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    h = accumulate_hessian(None, 0, x)[0]  # rank 16 of 64
    h -= 3e-3 * h.diagonal().mean() * torch.eye(64)  # indefinite: needs dampening above 3e-3 x mean(diag H)
    h[3], h[:, 3] = 0, 0  # a dead input
    for act_order in (False, True):
        a = prepare_hessian(h, 1e-6, act_order=act_order, lapack=False)  # succeeds at 1e-2, the 5th retry
        b = prepare_hessian(h, 1e-6, act_order=act_order, lapack=True)
        assert torch.equal(a.dead, b.dead) and int(a.dead.sum()) == 1 and torch.equal(a.perm, b.perm)
        torch.testing.assert_close(a.upper_rows(0, 64), b.upper_rows(0, 64), rtol=1e-5, atol=1e-7)
    for lapack in (False, True):
        with pytest.raises(HessianError, match="Cholesky failed even with dampening 0.0001"):
            prepare_hessian(h, 1e-6, max_damp_retries=2, lapack=lapack)


def test_gptq_with_torch_factorization_matches_lapack():
    h = _hessian(128, 512, 2)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    for scheme in (LayerScheme("w4a16", 32), LayerScheme("w8a8")):
        want = gptq_quantize_shared([w], None, scheme, prepared=prepare_hessian(h, lapack=True))[0]
        got = gptq_quantize_shared([w], None, scheme, prepared=prepare_hessian(h, lapack=False))[0]
        assert (got.q == want.q).float().mean() >= 0.999, scheme
        torch.testing.assert_close(got.scales.float(), want.scales.float(), rtol=1e-3, atol=0)
        assert got.loss == pytest.approx(want.loss, rel=1e-4)


def test_cuda_like_run_on_the_cpu(model, samples, cpu_runs, tmp_path):
    """Every device branch plus the torch.linalg factorization, against the CPU path."""
    name = "w4a16-g32"
    out = tmp_path / "out"
    report = quantize_checkpoint(model, out, CONFIGS[name], samples=samples, progress=False, placement=CUDA_LIKE)
    want_dir, want_report = cpu_runs[name]
    got, want = ShardReader(out), ShardReader(want_dir)
    assert sorted(got.names()) == sorted(want.names())
    same = total = 0
    for key in want.names():
        a, b = got.read(key), want.read(key)
        if key.endswith("qweight"):
            same, total = same + int((a == b).sum()), total + a.numel()
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=1e-6, msg=key)
    assert same / total >= 0.999, same / total
    for g, w in zip(report.layers, want_report.layers):
        assert g.errors.keys() == w.errors.keys()
        for k in w.errors:
            assert g.errors[k] == pytest.approx(w.errors[k], rel=1e-3), k


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device())
                                      if torch.cuda.is_available() else CPU)
    assert to_device({"a": (torch.ones(1), None), "b": [torch.zeros(2)], "c": 3}, CPU)["c"] == 3


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "cuda:", "CPU", "cuda:1:2", ""])
def test_device_flag_syntax(bad):
    from quant.errors import QuantInputError

    with pytest.raises(QuantInputError, match="--device must be one of"):
        QuantConfig(device=bad)


def test_activations_stay_on_the_device_while_they_fit(monkeypatch):
    import quant.device

    cuda = torch.device("cuda", 0)  # a device object only: nothing is allocated
    monkeypatch.setattr(quant.device, "free_memory", lambda device: 1000)
    resident = Placement.for_run(cuda, int(1000 * quant.device.ACTIVATION_SHARE))
    offloaded = Placement.for_run(cuda, int(1000 * quant.device.ACTIVATION_SHARE) + 1)
    assert resident.activations_on_device and not offloaded.activations_on_device
    for p in (resident, offloaded):  # the CUDA configuration: H stays on the device, torch.linalg factorizes
        assert not p.lapack
    assert Placement.for_run(CPU, 10**15) == Placement(CPU)  # the CPU path, whatever the size
