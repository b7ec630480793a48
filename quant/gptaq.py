"""Asymmetric calibration (GPTAQ, Li et al. 2025): fit the quantized layer to the *float* model's outputs.

Plain GPTQ minimises ``‖(W − Q) X‖²`` with ``X`` the inputs the quantized
model feeds the layer. GPTAQ minimises ``‖W X_fp − Q X‖²`` instead, with
``X_fp`` the float model's inputs of the same linear, so that a layer also
corrects the error its quantized predecessors left in its input. Expanding,

    ‖W X_fp − Q X‖² = ‖(W_t − Q) X‖² + const,   W_t = W + W D H⁻¹,

with ``H = 2 X Xᵀ / n`` (GPTQ's Hessian) and ``D = 2 (X_fp − X) Xᵀ / n``:
GPTQ run on the least-squares target ``W_t`` with the same ``H`` minimises
the asymmetric objective. :func:`asymmetric_targets` returns
``W + α W D (H + λI)⁻¹`` with GPTQ's own dampening ``λ`` and a shrinkage
``α`` (GPTAQ's reference implementation scales its correction by 0.25). This
replaces GPTAQ's column-by-column correction inside GPTQ's loop, which is left
as it is.

:class:`FloatStream` keeps the float model's hidden state next to the quantized
one (one more ``[samples, seqlen, hidden]`` tensor), runs each float layer
once to record every linear's float input (``[samples, seqlen, in]`` per input
group, kept for that layer only) and accumulates ``D`` during the statistics
passes of the quantized layer.
"""

from __future__ import annotations

import torch
from torch import nn


class FloatStream:
    """The float model's hidden state and, for the layer in hand, each input group's float input and ``D``."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden.clone()
        self.inputs: dict[str, torch.Tensor] = {}  # linear name (in the layer) -> float input [samples, seq, in]
        self.cross: dict[str, torch.Tensor] = {}  # linear name -> D [in, in]
        self.counts: dict[str, int] = {}

    def record_layer(self, layer: nn.Module, kwargs: dict, batches, step: int, names: set[str] | None = None) -> None:
        """Run the (still float) ``layer`` on the float hidden state: keep the input of every linear named in
        ``names`` (all when None), then replace the hidden state by the layer's output.
        ``batches(hidden, step)`` yields ``(rows, batch)``."""
        self.inputs, self.cross, self.counts = {}, {}, {}
        seen: list[tuple[torch.Tensor, str]] = []  # (input, first linear fed it) of this batch, by identity
        current = {"rows": slice(0, 0)}

        def keep(name: str):
            def hook(_mod, args):
                x = args[0].detach()
                first = next((n for t, n in seen if t is x), None)  # linears fed one tensor share its copy
                if first is None:
                    seen.append((x, name))
                elif first != name:
                    self.inputs.setdefault(name, self.inputs[first])
                    return
                if name not in self.inputs:
                    self.inputs[name] = torch.empty(self.hidden.shape[0], *x.shape[1:], dtype=x.dtype,
                                                    device=self.hidden.device)
                self.inputs[name][current["rows"]] = x.to(self.hidden.device)
            return hook

        handles = [m.register_forward_pre_hook(keep(n)) for n, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and (names is None or n in names)]
        try:
            with torch.no_grad():
                for rows, batch in batches(self.hidden, step):
                    current["rows"] = rows
                    seen.clear()
                    y = layer(batch, **kwargs)
                    self.hidden[rows] = (y[0] if isinstance(y, tuple) else y).to(self.hidden.device)
        finally:
            for h in handles:
                h.remove()

    def accumulate(self, name: str, rows: slice, x: torch.Tensor) -> None:
        """Add the batch ``rows`` of linear ``name``'s quantized-model input ``x`` to
        ``D = 2/n Σ (x_fp − x)ᵀ x``."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        dx = self.inputs[name][rows].to(x.device, torch.float32).reshape(-1, x.shape[-1]) - x
        n_old = self.counts.get(name, 0)
        total = n_old + x.shape[0]
        d = self.cross.get(name)
        if d is None:
            d = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        d.mul_(n_old / total).addmm_(dx.t(), x, alpha=2.0 / total)
        self.cross[name], self.counts[name] = d, total

    def release(self) -> None:
        """Drop the layer's float inputs and ``D`` (the float hidden state stays)."""
        self.inputs, self.cross, self.counts = {}, {}, {}


def asymmetric_targets(weights: list[torch.Tensor], cross: torch.Tensor, hessian: torch.Tensor,
                       damp_percent: float, alpha: float) -> list[torch.Tensor]:
    """``W + α W D (H + λI)⁻¹`` (float32) for each ``W`` of ``weights`` (linears fed one input), with
    ``λ = damp_percent · mean(diag H)``.

    One float64 Cholesky factor of the damped ``H`` serves the group; the solves and products run in
    float32 (the correction is a small share of ``W``). With more rows in the group than inputs,
    ``G = D H⁻¹`` is formed once and ``W G`` taken per linear; else ``H⁻¹ (W D)ᵀ`` is solved per linear.
    Inputs that are dead in ``H`` (zero diagonal) get a unit diagonal, as GPTQ gives them, and no correction.
    """
    h = hessian.to(torch.float64).clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1
    diag.add_(damp_percent * float(diag.mean()))
    chol = torch.linalg.cholesky(h).to(torch.float32)
    del h
    d = cross.to(torch.float32).clone()
    d[:, dead] = 0
    d[dead, :] = 0
    ws = [w.detach().to(torch.float32) for w in weights]
    if sum(w.shape[0] for w in ws) > d.shape[0]:
        g = torch.cholesky_solve(d.t().contiguous(), chol).t()  # (H⁻¹ Dᵀ)ᵀ = D H⁻¹ (H is symmetric)
        return [w + alpha * (w @ g) for w in ws]
    return [w + alpha * torch.cholesky_solve((w @ d).t().contiguous(), chol).t() for w in ws]
