"""Optimisers with per-group LR multipliers, the poly LR schedule and the linear loss-weight schedule (SPEC §3)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from core.errors import WSSSError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "momentum", "adamw", "adam")
GROUP_NAMES = ("pretrained_weights", "pretrained_biases", "scratch_weights", "scratch_biases")


def build_param_groups(
    named_groups: Mapping[str, Iterable[nn.Parameter]],
    lr: float,
    wd: float,
    alpha_scratch: float = 10.0,
    alpha_bias: float = 2.0,
) -> list[dict[str, Any]]:
    """Turn a model's named parameter groups into optimizer groups with their own LR and weight decay.

    ========================  =============================  ============
    group                     lr                             weight decay
    ========================  =============================  ============
    pretrained_weights        lr                             wd
    pretrained_biases         alpha_bias * lr                0
    scratch_weights           alpha_scratch * lr             wd
    scratch_biases            alpha_scratch * alpha_bias*lr  0
    ========================  =============================  ============

    Args:
        named_groups: output of a model's ``param_groups()`` (any subset of the four names).
        lr: base learning rate.
        wd: weight decay of the weight groups.

    Returns:
        One dict per given group, in the table's order, with keys ``params``, ``lr``, ``weight_decay``, ``name``.
        Empty groups are kept so the group order (and the saved optimizer state) does not depend on freezing flags.
    """
    unknown = sorted(set(named_groups) - set(GROUP_NAMES))
    if unknown:
        raise ValueError(f"unknown parameter groups {unknown}; expected names among {GROUP_NAMES}")
    settings = {
        "pretrained_weights": (lr, wd),
        "pretrained_biases": (alpha_bias * lr, 0.0),
        "scratch_weights": (alpha_scratch * lr, wd),
        "scratch_biases": (alpha_scratch * alpha_bias * lr, 0.0),
    }
    groups = []
    for name in GROUP_NAMES:
        if name in named_groups:
            group_lr, group_wd = settings[name]
            params = list(named_groups[name])
            groups.append({"params": params, "lr": group_lr, "weight_decay": group_wd, "name": name})
            logger.debug("param group %s: %d tensors, lr %g, wd %g", name, len(params), group_lr, group_wd)
    return groups


def build_optimizer(
    groups: list[dict[str, Any]], name: str = "sgd", momentum: float = 0.9, nesterov: bool = True
) -> torch.optim.Optimizer:
    """Create the optimizer for groups from :func:`build_param_groups`.

    Args:
        name: ``sgd`` (momentum 0, the reference CAM/C²AM/RW default), ``momentum`` (SGD with ``momentum`` and
            ``nesterov``, the reference segmentation setting), ``adamw``, or ``adam`` (Adam with the group's weight
            decay added to the gradient, i.e. L2 as in PyTorch's Adam: PoolNet's optimizer).

    Raises:
        WSSSError: unknown optimizer name.
    """
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0)
    if name == "momentum":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    if name == "adam":
        return torch.optim.Adam(groups, lr=groups[0]["lr"])
    raise WSSSError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


class PolyLR(LRScheduler):
    """Poly decay per optimizer step: ``lr_g(t) = lr_g(0) * (1 - t / T) ** power``, 0 from ``t = T`` on.

    Call ``step()`` after each *successful* optimizer step (skip it when a GradScaler skipped the update), so
    ``t`` counts applied updates as in the reference. ``state_dict()``/``load_state_dict()`` resume exactly: after
    loading, the optimizer's LRs are set for the restored step.

    Args:
        optimizer: optimizer whose groups carry their initial LRs.
        total_steps: T, total optimizer steps of the run (>= 1).
        power: decay exponent (0.9 in every reference).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9) -> None:
        if int(total_steps) < 1:
            raise WSSSError(
                f"the run has {total_steps} optimizer steps; "
                "check --max_epoch, --batch_size, --accumulate_steps and the dataset size"
            )
        self.total_steps = int(total_steps)
        self.power = float(power)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        """LRs for step ``self.last_epoch`` (closed form, so no rounding drift accumulates)."""
        progress = min(max(self.last_epoch, 0), self.total_steps) / self.total_steps
        factor = (1.0 - progress) ** self.power
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def linear_schedule(step: int, total: int, start: float, end: float, fraction: float) -> float:
    """Value ramping linearly from ``start`` to ``end`` over the first ``fraction`` of ``total`` steps, then ``end``.

    Returns ``end`` when ``fraction == 0``, else ``min(start + (end - start) * step / (total * fraction), end)``
    (the reference formula; the ``min`` assumes ``end >= start``).
    """
    if fraction == 0:
        return end
    return min(start + (end - start) * step / (total * fraction), end)
