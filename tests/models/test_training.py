"""The shared optimizer step and schedule (models/training.py) against hand-computed values."""

import pytest
import torch

from models.training import optimizer_step, warmup_cosine


def test_warmup_cosine_endpoints():
    f = warmup_cosine(warmup=4, steps=20, floor=0.05)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way through the decay
    assert f(20) == pytest.approx(0.05)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_optimizer_step_clips_then_steps():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(4, 10, floor=0.0))
    before = w.detach().clone()
    loss = (w * 100.0).sum()  # gradient 100 everywhere, norm 100 * sqrt(8)
    optimizer_step(loss, opt, sched, [w], max_grad_norm=1.0)
    step = before - w.detach()
    assert step.norm().item() == pytest.approx(0.25, rel=1e-5)  # clipped to norm 1, lr 1 * 1/4 (warmup)
    assert sched.last_epoch == 1
    assert opt.param_groups[0]["lr"] == 0.5  # the schedule moved on one step


def test_optimizer_step_without_clipping():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    optimizer_step((w * torch.tensor([1.0, 2.0, 3.0])).sum(), opt, sched)
    assert torch.allclose(w.detach(), torch.tensor([-0.1, -0.2, -0.3]))
