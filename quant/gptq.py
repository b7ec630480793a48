"""GPTQ and round-to-nearest as pure functions on tensors (no I/O).

Close to the reference ``gptq.py`` of IST-DASLab (Frantar et al., 2022):
Hessian ``H = 2 X Xᵀ / n`` accumulated over samples, dampening as a share of
the mean diagonal, the upper Cholesky factor of ``H⁻¹``, lazy block updates
and error feedback. Two deliberate differences, both documented where they
happen: group scales are computed from the error-updated weights of the group
(the reference reads stale in-block columns), and scales are rounded to their
stored dtype *before* the integers are computed, so every export format
dequantizes to bit-identical weights.

Grids, scale rules and scale dtypes come from :mod:`quant.schemes`: int4
``q ∈ [-8, 7]`` with ``scale = 2·amax/15`` (AutoGPTQ's sym convention, zero
point 8); int8 ``q ∈ [-127, 127]`` with ``scale = amax/127``.
Dequantized weight: ``W = q · scale``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import torch

from quant.config import LayerScheme

_NUMPY_DTYPES = {torch.float64: "float64", torch.float32: "float32"}

# OpenBLAS (scipy's, with its own pthreads) keeps its idle threads busy-waiting for 2**28 cycles (about
# 0.1 s) after each call. The calibration passes alternate torch ops (OpenMP threads) with ssyrk
# (OpenBLAS threads) several times a second, so the spinning thread held the core that torch's second
# thread needed: on 2 cores the forwards gained nothing from the second thread, and under load the
# spinning made a run 2x slower (scripts/profile_quant.py). 2**4 cycles: idle threads sleep at once and
# the next call wakes them. Read by OpenBLAS when it loads, so set before scipy.linalg is imported.
OPENBLAS_THREAD_TIMEOUT = "4"


def _scipy_linalg():
    """``scipy.linalg``, its OpenBLAS loaded with :data:`OPENBLAS_THREAD_TIMEOUT` unless the environment
    sets another value or ``scipy.linalg`` is loaded already (then as it was loaded)."""
    if "scipy.linalg" not in sys.modules:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
    import scipy.linalg

    return scipy.linalg


class HessianError(RuntimeError):
    """The Hessian stayed non-positive-definite after every dampening retry."""


@dataclass
class QuantResult:
    """Integers and scales of one linear: ``W[o, i] = q[o, i] * scales[o, g_idx[i]]``."""

    q: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # scheme.spec.scale_dtype [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]
    scheme: LayerScheme
    loss: float  # GPTQ's sum of (w - q)² / [H⁻¹]ᵢᵢ² / 2, or the same formula for RTN when a Hessian is given

    def to(self, device: torch.device | str) -> "QuantResult":
        """The same result with its tensors on ``device``."""
        return QuantResult(self.q.to(device), self.scales.to(device), self.g_idx.to(device), self.scheme, self.loss)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scales.to(torch.float32)[:, self.g_idx.long()]).to(dtype)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """:meth:`dequantize` written into ``out`` ``[out, in]`` (rounded once to its dtype) without ``[out, in]`` temporaries."""
        out_f, in_f = self.q.shape
        n_groups = self.scales.shape[1]
        gsize = in_f // n_groups
        if not torch.equal(self.g_idx.long(), torch.arange(in_f, device=self.g_idx.device) // gsize):  # not contiguous groups
            return out.copy_(self.dequantize())
        out.copy_(self.q)
        out.view(out_f, n_groups, gsize).mul_(self.scales.to(torch.float32).unsqueeze(2))
        return out


def qrange(scheme: LayerScheme) -> tuple[int, int]:
    return scheme.spec.qmin, scheme.spec.qmax


def compute_scales(w: torch.Tensor, scheme: LayerScheme, importance: torch.Tensor | None = None,
                   clip_ratios: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """Per-row scale of ``w`` ``[out, n]``, already rounded to its stored dtype (returned as float32).

    With ``importance`` ``[n]`` and more than one of ``clip_ratios``, the clipped scale of
    :func:`quant.clip.search_scales`; else the amax scale.
    """
    if importance is not None and len(clip_ratios) > 1:
        from quant.clip import search_scales

        return search_scales(w, importance, scheme, clip_ratios)
    return scales_from_amax(w.abs().amax(dim=1), scheme)


def scales_from_amax(amax: torch.Tensor, scheme: LayerScheme) -> torch.Tensor:
    """The symmetric scale of per-row ``amax``, rounded to its stored dtype (float32; 1 where it is 0)."""
    amax = amax.to(torch.float32)
    scale = scheme.spec.scale(amax)
    stored = scheme.spec.scale_dtype
    info = torch.finfo(stored)
    if bool((scale > info.max).any()):
        raise OverflowError(f"weight magnitude {float(amax.max()):.3g} overflows {stored} scales")
    scale = scale.to(stored).to(torch.float32)
    # An all-zero row (or one below the smallest stored value) quantizes to 0 whatever its scale.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, scheme: LayerScheme) -> torch.Tensor:
    """Integers of ``w`` ``[out, n]`` on the grid of per-row ``scale`` ``[out]`` (float, integral values)."""
    lo, hi = qrange(scheme)
    return torch.clamp(torch.round(w / scale.unsqueeze(1)), lo, hi)


def default_g_idx(in_features: int, scheme: LayerScheme, device: torch.device | str = "cpu") -> torch.Tensor:
    if scheme.n_groups(in_features) == 1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    return torch.arange(in_features, dtype=torch.int32, device=device) // scheme.group_size


def check_group_size(in_features: int, scheme: LayerScheme, where: str) -> None:
    if scheme.spec.grouped and scheme.group_size != -1 and in_features % scheme.group_size:
        raise ValueError(f"--group-size {scheme.group_size} does not divide the input size {in_features} of {where}")


def rtn_quantize(weight: torch.Tensor, scheme: LayerScheme, hessian: torch.Tensor | None = None) -> QuantResult:
    """Round to nearest with the same scales and grid as :func:`gptq_quantize`."""
    w = weight.to(torch.float32)
    out_f, in_f = w.shape
    check_group_size(in_f, scheme, "the weight")
    n_groups = scheme.n_groups(in_f)
    gsize = in_f // n_groups
    wg = w.reshape(out_f * n_groups, gsize)
    scales = compute_scales(wg, scheme)
    q = quantize_to_grid(wg, scales, scheme).reshape(out_f, in_f)
    scales = scales.reshape(out_f, n_groups)
    result = QuantResult(q.to(torch.int8), scales.to(scheme.spec.scale_dtype), default_g_idx(in_f, scheme, w.device),
                         scheme, 0.0)
    if hessian is not None:
        err = w - result.dequantize()
        result.loss = float(torch.einsum("oi,ij,oj->", err.double(), hessian.double(), err.double()) / 2)
    return result


HESSIAN_BLOCK = 512  # columns per block of the triangular Hessian update


def accumulate_hessian(hessian: torch.Tensor | None, nsamples: int, x: torch.Tensor,
                       block: int = HESSIAN_BLOCK, syrk: bool | None = None,
                       mirror: bool = True) -> tuple[torch.Tensor, int]:
    """Running ``H = 2/n Σ xxᵀ`` over the rows of ``x`` ``[..., in]``; returns ``(H, n)``.

    H is symmetric, so only one triangle is computed and mirrored into the other, one
    block of ``block`` columns at a time. ``syrk`` (default: for a CPU tensor): BLAS ``ssyrk``
    (scipy) updates the lower triangle in place, half the flops of ``xᵀx`` and, measured on
    this package's 2-core machine at one thread, 1.4x (2048 inputs) to 2.1x (768 inputs)
    faster than the GEMM per block row below it; else (a CUDA tensor) one GEMM per block row
    of the upper triangle. ``ssyrk`` reads and writes only the lower triangle, so a caller that
    accumulates many batches may pass ``mirror=False`` and call :func:`mirror_lower` once at the end
    (the same H, bit for bit).
    """
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    n_new, width = x.shape
    if hessian is None:
        hessian = torch.zeros(width, width, dtype=torch.float32, device=x.device)
    total = nsamples + n_new
    alpha = 2.0 / total
    if syrk if syrk is not None else x.device.type == "cpu":
        blas = _scipy_linalg().blas
        # Column-major views: x.T is [in, n], H (symmetric) is its own transpose. ssyrk writes
        # c = alpha·x.T·x + beta·c into the upper triangle of c, i.e. the lower triangle of H.
        c = hessian.numpy().T
        out = blas.ssyrk(alpha, x.contiguous().numpy().T, beta=nsamples / total, c=c, trans=0, lower=0,
                         overwrite_c=1)
        if not np_shares_memory(out, c):
            hessian.copy_(torch.from_numpy(out.T))
        if mirror:
            mirror_lower(hessian, block)
        return hessian, total
    hessian.mul_(nsamples / total)
    for i in range(0, width, block):
        j = min(i + block, width)
        hessian[i:j, i:].addmm_(x[:, i:j].t(), x[:, i:], alpha=alpha)
        hessian[j:, i:j] = hessian[i:j, j:].t()
    return hessian, total


def mirror_lower(hessian: torch.Tensor, block: int = HESSIAN_BLOCK) -> torch.Tensor:
    """Copy the lower triangle of ``hessian`` into its upper one, in place, one block of columns at a time."""
    width = hessian.shape[0]
    for i in range(0, width, block):
        j = min(i + block, width)
        hessian[i:j, j:] = hessian[j:, i:j].t()
        diag = hessian[i:j, i:j]
        diag.copy_(diag.tril() + diag.tril(-1).t())
    return hessian


def np_shares_memory(a, b) -> bool:
    import numpy as np

    return bool(np.shares_memory(a, b))


@functools.cache
def _blas_threadpools():
    """The BLAS/LAPACK thread pools of this process, found once: ``threadpool_limits`` rescans every loaded
    library on each call (about 10-20 ms, twice per input group of every layer)."""
    from threadpoolctl import ThreadpoolController

    _scipy_linalg()  # its LAPACK must be loaded before the scan

    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded():
    """Run torch and BLAS/LAPACK on one thread inside the block.

    GPTQ's column loop is thousands of tiny, latency-bound ops and the
    factorizations are small LAPACK calls: extra threads only add
    synchronisation, and on shared or oversubscribed cores their busy-waiting
    made them up to 50x slower here (measured in ``scripts/bench_quant.py``'s notes).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_threadpools().limit(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(n)


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float, max_retries: int = 5,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹ = UᵀU`` computed in float64, ``λ = damp · mean(diag H)``.

    With ``J`` the reversal permutation and ``J H J = L Lᵀ`` (lower Cholesky),
    ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular with a
    positive diagonal, hence *the* Cholesky factor of ``H⁻¹``. So one
    Cholesky and one triangular inverse (LAPACK ``potrf``, ``trtri``), both in
    place on a single float64 ``[in, in]`` buffer, replace the reference's
    Cholesky, inverse and Cholesky of the inverse (half the flops, one float64
    matrix alive instead of two). On failure the dampening is multiplied by 10
    and retried ``max_retries`` times, then :class:`HessianError` is raised.
    The factor is returned in ``dtype``.
    """
    import numpy as np

    flipped_inverse, _ = _reversed_inverse_factor(hessian, damp_percent, max_retries)
    return torch.from_numpy(np.ascontiguousarray(flipped_inverse[::-1, ::-1], dtype=_NUMPY_DTYPES[dtype]))


def _reversed_inverse_factor(hessian: torch.Tensor, damp_percent: float, max_retries: int):
    """``(L⁻¹, λ)``: ``L⁻¹`` of :func:`inverse_cholesky` (float64 numpy, Fortran order, in its own buffer;
    ``U = J L⁻¹ J``) and the dampening ``λ`` it added to the diagonal."""
    import numpy as np

    lapack = _scipy_linalg().lapack
    n = hessian.shape[0]
    src = hessian.detach().cpu().numpy()[::-1, ::-1]  # J H J, a view
    mean_diag = float(np.diagonal(src).astype(np.float64).mean())
    if not mean_diag > 0 or not torch.isfinite(hessian).all():
        raise HessianError("the Hessian has no positive diagonal (all calibration inputs are zero or not finite)")
    buf = np.empty((n, n), dtype=np.float64, order="F")  # LAPACK works in place on Fortran order only

    def factor(damp: float):
        buf[...] = src
        np.einsum("ii->i", buf)[...] += damp * mean_diag
        lower, info = lapack.dpotrf(buf, lower=1, clean=1, overwrite_a=1)
        if info:
            return None
        inv, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
        del lower
        if info == 0 and np.isfinite(inv).all():
            return inv
        raise _not_positive_definite(damp)

    with single_threaded():
        inv, damp = _with_dampening(damp_percent, max_retries, factor)
    return inv, damp * mean_diag


def _with_dampening(damp_percent: float, max_retries: int, factor):
    """``(factor(damp), damp)`` for ``damp = damp_percent`` and then ten times more, ``max_retries`` times,
    until the Cholesky factorization inside it succeeds (it returns the factor, else None)."""
    damp = damp_percent
    for _ in range(max_retries + 1):
        inv = factor(damp)
        if inv is not None:
            return inv, damp
        damp *= 10
    raise HessianError(f"Cholesky failed even with dampening {damp / 10:g} x mean(diag H); "
                       "use more calibration samples or raise --damp-percent")


def _not_positive_definite(damp: float) -> HessianError:
    return HessianError(f"the inverse Hessian is not positive definite (dampening {damp:g} x mean(diag H)); "
                        "use more calibration samples or raise --damp-percent")


def _reversed_inverse_factor_torch(hessian: torch.Tensor, damp_percent: float,
                                   max_retries: int) -> tuple[torch.Tensor, float]:
    """:func:`_reversed_inverse_factor` with ``torch.linalg`` in float64 on the Hessian's device (CUDA).

    The same computation (``L`` = lower Cholesky factor of the damped ``J H J``,
    returned as ``L⁻¹``, with the dampening ``λ``), as a torch tensor on ``hessian.device``.
    """
    if not torch.isfinite(hessian).all():
        raise HessianError("the Hessian has no positive diagonal (all calibration inputs are zero or not finite)")
    flipped = hessian.to(torch.float64).flip((0, 1))  # J H J, a float64 copy
    diagonal = flipped.diagonal()
    undamped = diagonal.clone()
    mean_diag = float(undamped.mean())
    if not mean_diag > 0:
        raise HessianError("the Hessian has no positive diagonal (all calibration inputs are zero or not finite)")

    def factor(damp: float):
        diagonal.copy_(undamped).add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info):
            return None
        eye = torch.eye(lower.shape[0], dtype=torch.float64, device=lower.device)
        inv = torch.linalg.solve_triangular(lower, eye, upper=False)
        del lower, eye
        if bool(torch.isfinite(inv).all()) and bool((inv.diagonal() > 0).all()):
            return inv
        raise _not_positive_definite(damp)

    inv, damp = _with_dampening(damp_percent, max_retries, factor)
    return inv, damp * mean_diag


@dataclass
class PreparedHessian:
    """What GPTQ needs from a Hessian: dead inputs, column order and the upper Cholesky factor of H⁻¹.

    The factor stays in its float64 buffer (as ``J L⁻¹ J``, see
    :func:`inverse_cholesky`): a LAPACK (numpy) one on the CPU, a torch tensor
    on the Hessian's device otherwise. GPTQ reads it one block of rows at a
    time in float32, so no second ``[in, in]`` matrix is ever made from it.
    """

    dead: torch.Tensor  # bool [in]
    perm: torch.Tensor  # processing order of the columns
    # float64 [in, in], rows/columns in reversed ``perm`` order: numpy (Fortran order) or a torch tensor
    flipped_inverse: object
    importance: torch.Tensor | None = None  # diag(H) [in] in column order (the clipping search's weights)
    damping: float = 0.0  # λ added to the diagonal of H before the factorization (dead inputs' 1 aside)

    def upper_rows(self, i1: int, i2: int) -> torch.Tensor:
        """Rows ``i1:i2``, columns ``i1:`` of the upper factor ``U``, float32 (the values of ``U.float()``)."""
        n = self.flipped_inverse.shape[0]
        if isinstance(self.flipped_inverse, torch.Tensor):
            return self.flipped_inverse[n - i2:n - i1, :n - i1].to(torch.float32).flip((0, 1))
        import numpy as np

        rows = self.flipped_inverse[n - i2:n - i1, :n - i1][::-1, ::-1]
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def prepare_hessian(hessian: torch.Tensor, damp_percent: float = 0.01, act_order: bool = False,
                    max_damp_retries: int = 5, lapack: bool | None = None) -> PreparedHessian:
    """Dead inputs, column order and the factor of H⁻¹: scipy LAPACK on the CPU when ``lapack``, else
    ``torch.linalg`` on the Hessian's device (``None``: LAPACK for a CPU Hessian, torch.linalg otherwise)."""
    if lapack is None:
        lapack = hessian.device.type == "cpu"
    h = hessian.to(torch.float32)
    importance = torch.diagonal(h).clone()
    dead = importance == 0
    if bool(dead.any()):
        h = h.clone()
        h[dead, dead] = 1
    perm = torch.arange(h.shape[0], device=h.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        h = h[perm][:, perm]
    if lapack:
        factor, damping = _reversed_inverse_factor(h, damp_percent, max_damp_retries)
    else:
        factor, damping = _reversed_inverse_factor_torch(h, damp_percent, max_damp_retries)
    del h
    return PreparedHessian(dead, perm, factor, importance, damping)


# Threads of the GPTQ column loop on the CPU: at most this many, each with at least MIN_CHUNK_ROWS rows.
MAX_GPTQ_WORKERS = 2  # measured on 2 cores only; Python's GIL serialises the many small ops of the loop
MIN_CHUNK_ROWS = 256
CHUNK_ALIGN = 64  # chunk boundaries at multiples of this many rows (whole cache lines of every row of Wᵀ)


def gptq_workers(device: torch.device | str = "cpu", reserve: int = 0) -> int:
    """Threads for the column loop: torch's intra-op threads (``OMP_NUM_THREADS``, else the cores) less
    ``reserve`` (kept for other work), at least 1 and at most :data:`MAX_GPTQ_WORKERS` on the CPU; 1 on
    an accelerator (its kernels are already parallel)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads() - reserve, MAX_GPTQ_WORKERS))


def _row_chunks(rows: int, workers: int) -> list[slice]:
    """``rows`` split into at most ``workers`` contiguous chunks of about equal size, each at least
    :data:`MIN_CHUNK_ROWS` and starting at a multiple of :data:`CHUNK_ALIGN` (one chunk when too few)."""
    n = max(1, min(workers, rows // MIN_CHUNK_ROWS))
    bounds = [0, *(CHUNK_ALIGN * round(rows * k / n / CHUNK_ALIGN) for k in range(1, n)), rows]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _run_threads(calls: list[tuple]) -> None:
    """``fn(*args)`` for each of ``calls``, the first on this thread, the others on their own threads,
    each with one intra-op thread; the first exception raised is re-raised after all have finished."""
    import threading

    errors: list[BaseException] = []

    def one(fn, args):
        try:
            torch.set_num_threads(1)  # per thread under OpenMP/MKL: a new thread starts at the default
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=call, daemon=True) for call in calls[1:]]
    for t in threads:
        t.start()
    one(*calls[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@dataclass
class _ColumnLoop:
    """GPTQ's loop over the columns of ``Wᵀ`` for any set of its columns (rows of ``W``): every step is
    per row except the lazy-block products, whose rows of ``U`` are shared."""

    prepared: PreparedHessian
    col_group: list[int]  # group of each column, in processing order
    static: bool  # scales fixed beforehand, else set at each group's first column
    block_size: int
    gsize: int
    group_scales: object  # (w_group_t [rows, gsize], first column) -> scales [rows]
    lo: int
    hi: int

    def run(self, wt: torch.Tensor, qt: torch.Tensor, scales: torch.Tensor, losses: torch.Tensor) -> None:
        """Quantize ``wt`` ``[in, rows]`` (updated in place) into ``qt``, ``scales`` ``[groups, rows]``
        and ``losses`` ``[rows]`` (views of the whole result's columns)."""
        in_f, gsize, lo, hi = wt.shape[0], self.gsize, self.lo, self.hi
        # The loop is thousands of tiny ops, bound by their dispatch: views made once per block (unbind),
        # results written into two work rows, the same arithmetic as q = clamp(round(w / s)),
        # e = (w - q·s) / U_ii in the same order (the same bits as temporaries would give).
        scale_rows = scales.unbind(0)  # views: the scales set below show through them
        qbuf = torch.empty(wt.shape[1], dtype=wt.dtype, device=wt.device)
        tmp = torch.empty_like(qbuf)
        for i1 in range(0, in_f, self.block_size):
            i2 = min(i1 + self.block_size, in_f)
            w1 = wt[i1:i2]  # a view: updated in place
            err1 = torch.empty_like(w1)
            rows = self.prepared.upper_rows(i1, i2).to(wt.device)  # U[i1:i2, i1:]
            hinv1 = rows[:, :i2 - i1]
            w_cols, e_cols, q_cols = w1.unbind(0), err1.unbind(0), qt[i1:i2].unbind(0)
            h_rows, diag = hinv1.unbind(0), hinv1.diagonal().unbind(0)
            last = i2 - i1 - 1
            for i in range(i2 - i1):
                col = i1 + i
                if not self.static and col % gsize == 0:
                    # Scales from the error-updated weights of the whole group (all inside this block).
                    scales[col // gsize] = self.group_scales(w1[i:i + gsize].t(), col)
                s = scale_rows[self.col_group[col]]
                wcol = w_cols[i]
                torch.div(wcol, s, out=qbuf).round_().clamp_(lo, hi)
                q_cols[i].copy_(qbuf)
                torch.sub(wcol, torch.mul(qbuf, s, out=tmp), out=tmp)
                torch.div(tmp, diag[i], out=e_cols[i])
                if i < last:
                    w1[i + 1:].addr_(h_rows[i][i + 1:], e_cols[i], alpha=-1)
            losses += err1.double().square_().sum(0) / 2
            wt[i2:].addmm_(rows[:, i2 - i1:].t(), err1, alpha=-1)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: LayerScheme, **options) -> QuantResult:
    """GPTQ of one linear weight ``[out, in]`` given the Hessian ``[in, in]`` of its inputs.

    ``options`` are the keyword options of :func:`gptq_quantize_shared`.
    """
    return gptq_quantize_shared([weight], hessian, scheme, **options)[0]


def gptq_quantize_shared(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    scheme: LayerScheme,
    *,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    max_damp_retries: int = 5,
    prepared: "PreparedHessian | None" = None,
    clip_ratios: tuple[float, ...] = (1.0,),
    workers: int | None = None,
) -> list[QuantResult]:
    """GPTQ of linears fed the same input (one Hessian) with the same scheme, in one column loop.

    GPTQ's rows are independent given ``H``: every operation below is per row
    except the lazy-block products, so stacking the weights along the output
    dimension (q/k/v, gate/up) and splitting the result gives each linear the
    integers of its own :func:`gptq_quantize` call, with one Python loop over
    the columns instead of one per linear. Columns are kept as contiguous rows
    of ``Wᵀ`` so that each step touches contiguous memory.

    ``act_order`` processes columns by decreasing ``diag(H)`` with *static*
    groups: scales are fixed from the unmodified weight beforehand, so
    ``g_idx[i] = i // group_size`` stays the natural order. ``prepared``
    (from :func:`prepare_hessian`) shares one inverse among linears fed the same input.
    ``clip_ratios`` other than ``(1.0,)`` search each group's scale among ``ratio · amax``
    (:func:`quant.clip.search_scales`, weighted by ``diag(H)``) where the amax scale would be taken.

    ``workers`` (default :func:`gptq_workers`) splits the rows (the columns of ``Wᵀ``) into that
    many contiguous chunks, each run through the whole column loop by its own thread on one core
    (:class:`_ColumnLoop`); the chunks share only ``H``, so the integers and scales are those of one
    thread, bit for bit.
    """
    sizes = [w.shape[0] for w in weights]
    in_f, out_f = weights[0].shape[1], sum(sizes)
    check_group_size(in_f, scheme, "the weight")
    # Wᵀ [in, out] in float32, one copy (the inputs stay untouched), filled one linear at a time.
    device = weights[0].device
    wt = torch.empty(in_f, out_f, dtype=torch.float32, device=device)
    start = 0
    for w, n in zip(weights, sizes):
        wt[:, start:start + n].copy_(w.detach().t())
        start += n
    if prepared is None:
        prepared = prepare_hessian(hessian, damp_percent, act_order, max_damp_retries)
    dead, perm = prepared.dead, prepared.perm
    wt[dead] = 0
    imp = prepared.importance if len(clip_ratios) > 1 else None

    def group_scales(w_group_t: torch.Tensor, first: int) -> torch.Tensor:
        """Scales of the rows of ``w_group_t`` ``[out, gsize]``, the group of columns ``first:first + gsize``."""
        return compute_scales(w_group_t, scheme, None if imp is None else imp[first:first + gsize], clip_ratios)

    n_groups = scheme.n_groups(in_f)
    gsize = in_f // n_groups
    g_idx = default_g_idx(in_f, scheme, device)
    scales = torch.zeros(n_groups, out_f, dtype=torch.float32, device=device)  # transposed: one row per group
    static = n_groups == 1 or act_order
    if static:
        for g in range(n_groups):
            scales[g] = group_scales(wt[g * gsize:(g + 1) * gsize].t(), g * gsize)

    if act_order:
        wt = wt[perm]  # rows in processing order
    col_group = g_idx[perm].tolist()
    lo, hi = qrange(scheme)

    # A group must not straddle two lazy blocks when its scale is computed in-block.
    if not static and block_size % gsize:
        block_size = gsize * -(-block_size // gsize)

    qt = torch.empty(in_f, out_f, dtype=torch.int8, device=device)
    losses = torch.zeros(out_f, dtype=torch.float64, device=device)
    loop = _ColumnLoop(prepared, col_group, static, block_size, gsize, group_scales, lo, hi)
    chunks = _row_chunks(out_f, gptq_workers(device) if workers is None else workers)
    with single_threaded():
        if len(chunks) == 1:
            loop.run(wt, qt, scales, losses)
        else:
            _run_threads([(loop.run, (wt[:, c], qt[:, c], scales[:, c], losses[c])) for c in chunks])

    q_all = (qt[torch.argsort(perm)] if act_order else qt).t()
    scales = scales.t().to(scheme.spec.scale_dtype)
    results, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        results.append(QuantResult(q_all[rows].contiguous(), scales[rows].contiguous(), g_idx.clone(), scheme,
                                   float(losses[rows].sum())))
        start += n
    return results


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant per-input-channel factors ``s = max|X|^α / max|W|^(1-α)``.

    The linear then sees ``X / s`` and weights ``W · s``; the caller folds
    ``1/s`` into the preceding norm weight.
    """
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).to(torch.float32)
    a = act_absmax.to(torch.float32).clamp_min(1e-5)
    s = a.pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)
