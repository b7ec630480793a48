"""Clipping search for quantization scales (the idea of GPTQModel's ``mse`` and llm-compressor's ``imatrix_mse``).

The amax scale of a group (``scale = 2·amax/15`` for int4) wastes grid levels
on its one or two largest weights. :func:`search_scales` tries the scales of
``ratio · amax`` for each ratio of a grid and keeps, per row of the group, the
one whose rounding error weighted by the input importance

    err(ratio) = Σᵢ importanceᵢ · (wᵢ − scale · q(wᵢ, scale))²,   importance = diag(H)

is smallest (ties go to the larger ratio). ``diag(H) = 2·E[xᵢ²]`` makes this
the output error of the group when its inputs are uncorrelated (the
diagonal of GPTQ's objective ``tr(ΔW H ΔWᵀ)``); GPTQ then corrects what remains. The grid
always holds 1.0, so the chosen scale is never worse than amax on this
criterion. Scales are rounded to their stored dtype before the error is
measured, exactly as they are used.
"""

from __future__ import annotations

import torch

from quant.config import LayerScheme


def clip_ratios(min_ratio: float, step: float = 0.01) -> tuple[float, ...]:
    """``1.0, 1 − step, ...`` down to ``min_ratio`` (inclusive); ``(1.0,)`` when ``min_ratio`` is 1."""
    n = int(round((1.0 - min_ratio) / step))
    return tuple(round(1.0 - i * step, 10) for i in range(n + 1))


def search_scales(w: torch.Tensor, importance: torch.Tensor, scheme: LayerScheme,
                  ratios: tuple[float, ...]) -> torch.Tensor:
    """Per-row scale of ``w`` ``[rows, n]`` (float32, stored-dtype values) minimising the importance-weighted
    rounding error over ``ratio · amax`` for ``ratio`` in ``ratios`` (which must start with 1.0)."""
    from quant.gptq import qrange, scales_from_amax

    if not ratios or ratios[0] != 1.0:
        raise ValueError("the clipping ratios must start with 1.0")
    w = w.to(torch.float32).contiguous()
    imp = importance.to(torch.float32).clamp_min(0)
    amax = w.abs().amax(dim=1)
    best = scales_from_amax(amax, scheme)
    if len(ratios) == 1:
        return best
    lo, hi = qrange(scheme)
    buf = torch.empty_like(w)  # one [rows, n] work buffer for every ratio (no allocation per ratio)
    best_err = None
    for r in ratios:
        scale = best if r == 1.0 else scales_from_amax(amax * r, scheme)
        s = scale.unsqueeze(1)
        torch.div(w, s, out=buf).round_().clamp_(lo, hi).mul_(s)  # the dequantized row on the grid of s
        err = torch.sub(w, buf, out=buf).square_() @ imp  # sum_i imp_i (w_i - s q_i)^2 per row
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, scale, best)
        best_err = torch.where(better, err, best_err)
    return best
