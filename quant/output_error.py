"""Relative output errors of quantized linears: ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the calibration inputs.

The pipeline reports one per linear (``QuantReport``). :func:`layer_output_error` computes it with two
``[out, in] x [in, in]`` products; for a GPTQ result the numerator needs no product
(:func:`gptq_error_energy`, from the column loop's own loss) and the denominator
(:func:`output_energy`) comes in row chunks small enough to run as background jobs
(:class:`OutputError`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from quant.gptq import PreparedHessian, QuantResult


def layer_output_error(weight: torch.Tensor, result: QuantResult, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: relative output MSE of the quantized linear on the calibration inputs.

    Two ``[out, in] x [in, in]`` products; for a GPTQ result the pipeline takes the numerator from
    :func:`gptq_error_energy` instead (no product) and the denominator from :func:`output_energy`.
    """
    w = weight.to(torch.float32)
    h = hessian.to(torch.float32)
    d = w - result.dequantize(torch.float32)
    num = float(((d @ h) * d).sum(dtype=torch.float64))
    den = float(((w @ h) * w).sum(dtype=torch.float64))
    return num / den if den > 0 else 0.0



ENERGY_MACS = 1 << 27  # multiply-adds per output_energy chunk: a few milliseconds on one core
# ... but at least this many rows: each chunk reads all of H, so fewer rows are bound by memory
# (a 2048 x 5632 weight: 7.6 s in chunks of 4 rows, 1.7 s in chunks of 64, one core)
MIN_ENERGY_ROWS = 64


def output_energy_rows(in_features: int) -> int:
    """Rows of ``W`` per :func:`output_energy` chunk: about :data:`ENERGY_MACS` multiply-adds, at least
    :data:`MIN_ENERGY_ROWS`."""
    return max(MIN_ENERGY_ROWS, ENERGY_MACS // (in_features * in_features))


def output_energy(weight: torch.Tensor, hessian: torch.Tensor, rows: slice = slice(None)) -> float:
    """``tr(W H Wᵀ)`` over ``rows`` of ``weight`` ``[out, in]``: float32 products, summed in float64
    (the denominator of :func:`layer_output_error`; chunks of rows add up to the whole)."""
    w = weight[rows].to(torch.float32)
    return float(((w @ hessian.to(torch.float32)) * w).sum(dtype=torch.float64))


def gptq_error_energy(weight: torch.Tensor, result: QuantResult, prepared: PreparedHessian) -> float:
    """``tr(ΔW H ΔWᵀ)`` of a GPTQ result, from its column loop's loss instead of a product with ``H``.

    The loop's error feedback makes ``ΔW = E U`` with ``E`` its scaled errors ``(w - q) / U_ii``
    (``result.loss = ‖E‖² / 2``) and ``U`` the upper Cholesky factor of ``(H + λI)⁻¹``, so
    ``tr(ΔW (H + λI) ΔWᵀ) = ‖E‖²`` and ``tr(ΔW H ΔWᵀ) = 2·loss - λ‖ΔW‖²`` (``λ = prepared.damping``;
    traces do not see act-order's permutation). Dead inputs (``H`` zero there) are zeroed before the
    loop and count in neither term. ``O(out·in)``, in chunks of rows small enough to stay in the
    cache and below the mmap threshold; equal to the product up to float32 rounding.
    """
    out_f, in_f = weight.shape
    live = ~prepared.dead if bool(prepared.dead.any()) else None
    scales = result.scales.to(torch.float32)
    n_groups = scales.shape[1]
    gsize = in_f // n_groups
    # Contiguous groups (the default order): [rows, groups, gsize] views, no gather of the scales.
    grouped = torch.equal(result.g_idx.long(), torch.arange(in_f, device=result.g_idx.device) // gsize)
    step = max(1, (1 << 16) // in_f) if weight.device.type == "cpu" else out_f  # an accelerator: at once
    squares = 0.0
    for a in range(0, out_f, step):
        w, q = weight[a:a + step], result.q[a:a + step]
        if grouped:
            dq = q.to(torch.float32).view(-1, n_groups, gsize).mul_(scales[a:a + step].unsqueeze(2)).view(q.shape)
        else:
            dq = q.to(torch.float32).mul_(scales[a:a + step, result.g_idx.long()])
        d = torch.sub(w, dq, out=dq) if w.dtype == torch.float32 else w.to(torch.float32).sub_(dq)
        if live is not None:
            d = d[:, live]
        squares += float(d.square_().sum(dtype=torch.float64))
    return max(0.0, 2 * result.loss - prepared.damping * squares)


class OutputError:
    """The relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of one GPTQ linear, in background jobs.

    The denominator in row chunks of a few milliseconds each on the CPU (:meth:`energy_job`, queued
    before the group's GPTQ window, while ``W`` is unquantized; one chunk on an accelerator, where
    nothing runs in the background), the numerator from GPTQ's own loss once the result exists
    (:meth:`finish`, queued after the chunks: no product with ``H``). The chunks add up in a fixed
    order, each on one intra-op thread: the same error wherever the jobs ran.
    """

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor):
        self.weight, self.hessian = weight, hessian
        step = output_energy_rows(weight.shape[1]) if weight.device.type == "cpu" else weight.shape[0]
        self.chunks = [slice(a, a + step) for a in range(0, weight.shape[0], step)]
        self.parts: list[float | None] = [None] * len(self.chunks)

    def energy_job(self, k: int) -> None:
        self.parts[k] = output_energy(self.weight, self.hessian, self.chunks[k])
        if k == len(self.chunks) - 1:
            self.hessian = None  # the last chunk: H may go

    def keep_weight(self) -> None:
        """Read a copy of the weight from now on (the layer's is overwritten with the quantized one next)."""
        self.weight = self.weight.clone()

    def finish(self, errors: dict[str, float], name: str, result: QuantResult, prepared: PreparedHessian) -> None:
        den = sum(self.parts)
        errors[name] = gptq_error_energy(self.weight, result, prepared) / den if den > 0 else 0.0
        self.weight = None


def queue_energies(background, linears: dict[str, nn.Module], hessian: torch.Tensor) -> dict[str, OutputError]:
    """An :class:`OutputError` per linear of a group, its denominator's chunks queued on ``background``
    (``quant.pipeline._Background``: anything with ``add(job)``). The chunks read the layer's weight,
    untouched until the group's GPTQ window has closed."""
    pending = {}
    for name, m in linears.items():
        pending[name] = OutputError(m.weight.detach(), hessian)
        for k in range(len(pending[name].chunks)):
            background.add(functools.partial(pending[name].energy_job, k))
    return pending


def record_errors(errors: dict[str, float], linears: list[tuple[str, torch.Tensor, QuantResult]],
                   hessian: torch.Tensor) -> None:
    """``errors[name]`` = the relative output error of each ``(name, weight, result)`` of one input group
    (round to nearest, or GPTAQ, whose loss is measured from its targets: no GPTQ loss of ``W`` to read)."""
    for name, weight, result in linears:
        errors[name] = layer_output_error(weight, result, hessian)
