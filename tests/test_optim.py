"""Parameter groups, optimisers, the poly LR schedule and the linear schedule, on hand-computed values."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from core.errors import WSSSError
from core.optim import PolyLR, build_optimizer, build_param_groups, linear_schedule


def _named_groups() -> dict[str, list[nn.Parameter]]:
    return {
        "pretrained_weights": [nn.Parameter(torch.ones(2))],
        "pretrained_biases": [nn.Parameter(torch.ones(2))],
        "scratch_weights": [nn.Parameter(torch.ones(2))],
        "scratch_biases": [nn.Parameter(torch.ones(2))],
    }


def _optimizer(lrs: tuple[float, ...] = (0.1, 1.0)) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _run_steps(optimizer: torch.optim.Optimizer, scheduler: PolyLR, steps: int) -> list[list[float]]:
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_param_group_multipliers() -> None:
    groups = build_param_groups(_named_groups(), lr=0.01, wd=1e-4)
    assert [g["name"] for g in groups] == [
        "pretrained_weights",
        "pretrained_biases",
        "scratch_weights",
        "scratch_biases",
    ]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 1e-4, 0.0]
    custom = build_param_groups(_named_groups(), lr=0.5, wd=0.0, alpha_scratch=4.0, alpha_bias=3.0)
    assert [g["lr"] for g in custom] == pytest.approx([0.5, 1.5, 2.0, 6.0])
    partial = build_param_groups({"scratch_biases": [], "pretrained_weights": []}, lr=1.0, wd=0.1)
    assert [g["name"] for g in partial] == ["pretrained_weights", "scratch_biases"]
    with pytest.raises(ValueError, match="unknown parameter groups"):
        build_param_groups({"head": []}, lr=1.0, wd=0.0)


def test_sgd_step_applies_group_lr_and_weight_decay() -> None:
    """Zero gradient: only weight decay moves a weight (by lr*wd*w); biases have no decay and stay put."""
    named = _named_groups()
    optimizer = build_optimizer(build_param_groups(named, lr=0.5, wd=0.1), "sgd")
    for params in named.values():
        params[0].grad = torch.zeros(2)
    optimizer.step()
    assert named["pretrained_weights"][0].tolist() == pytest.approx([1 - 0.5 * 0.1] * 2)
    assert named["scratch_weights"][0].tolist() == pytest.approx([1 - 5.0 * 0.1] * 2)
    assert named["pretrained_biases"][0].tolist() == [1.0, 1.0]
    assert named["scratch_biases"][0].tolist() == [1.0, 1.0]


def test_build_optimizer_kinds() -> None:
    sgd = build_optimizer(build_param_groups(_named_groups(), 0.1, 0.0), "sgd")
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0 and not g["nesterov"] for g in sgd.param_groups)
    momentum = build_optimizer(build_param_groups(_named_groups(), 0.1, 0.0), "momentum")
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in momentum.param_groups)
    adamw = build_optimizer(build_param_groups(_named_groups(), 0.1, 0.01), "adamw")
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.1, 0.2, 1.0, 2.0])
    with pytest.raises(WSSSError, match="unknown optimizer 'lion'.*sgd, momentum, adamw"):
        build_optimizer(build_param_groups(_named_groups(), 0.1, 0.0), "lion")


def test_poly_lr_values() -> None:
    optimizer = _optimizer((0.1, 1.0))
    scheduler = PolyLR(optimizer, total_steps=10)
    seen = _run_steps(optimizer, scheduler, 10)
    assert seen[0] == [0.1, 1.0]
    assert seen[5] == pytest.approx([0.1 * 0.5**0.9, 1.0 * 0.5**0.9], rel=1e-12)
    assert seen[9] == pytest.approx([0.1 * 0.1**0.9, 0.1**0.9], rel=1e-12)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]  # t = T
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [0.0, 0.0]  # stays 0 past T
    with pytest.raises(WSSSError, match="0 optimizer steps"):
        PolyLR(_optimizer(), total_steps=0)


def test_poly_lr_resume_continues_exactly() -> None:
    optimizer = _optimizer((0.3, 3.0))
    scheduler = PolyLR(optimizer, total_steps=12, power=0.9)
    _run_steps(optimizer, scheduler, 5)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)  # checkpoints are read with weights_only=True
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    uninterrupted = _run_steps(optimizer, scheduler, 7)

    resumed_optimizer = _optimizer((0.3, 3.0))  # fresh groups at their initial LRs
    resumed = PolyLR(resumed_optimizer, total_steps=12, power=0.9)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 5
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * (7 / 12) ** 0.9, rel=1e-12)
    assert _run_steps(resumed_optimizer, resumed, 7) == uninterrupted


def test_linear_schedule() -> None:
    assert linear_schedule(step=0, total=100, start=0.0, end=1.0, fraction=0.0) == 1.0
    assert linear_schedule(step=0, total=100, start=0.2, end=1.0, fraction=0.5) == pytest.approx(0.2)
    assert linear_schedule(step=25, total=100, start=0.2, end=1.0, fraction=0.5) == pytest.approx(0.6)
    assert linear_schedule(step=50, total=100, start=0.2, end=1.0, fraction=0.5) == pytest.approx(1.0)
    assert linear_schedule(step=90, total=100, start=0.2, end=1.0, fraction=0.5) == 1.0
