"""Exponential moving average of a model's weights, kept in a separate copy (``--ema true``).

The P-NOC reference meant to do this but averaged the student into itself (SPEC §13.1.8), so its EMA was a
no-op. Here the average lives in its own module: ``θ_ema ← d·θ_ema + (1-d)·θ`` every ``every_steps``
optimizer steps once ``warmup_steps`` optimizer steps have passed; before that the copy just follows the
model. Buffers (BatchNorm running statistics) are always copied, never averaged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of a model whose floating-point parameters track an exponential average.

    Args:
        model: the trained (bare, not DDP-wrapped) module; the copy is taken now.
        decay: ``d`` in ``θ_ema ← d·θ_ema + (1-d)·θ``, in [0, 1).
        every_steps: average once every this many optimizer steps (``--ema_steps``).
        warmup_steps: optimizer steps during which the copy is overwritten instead of averaged
            (``--ema_warmup`` epochs × optimizer steps per epoch).
    """

    def __init__(self, model: nn.Module, decay: float, every_steps: int = 1, warmup_steps: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every_steps < 1:
            raise ValueError(f"EMA every_steps must be >= 1, got {every_steps}")
        self.decay = decay
        self.every_steps = every_steps
        self.warmup_steps = max(0, warmup_steps)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, optimizer_step: int) -> None:
        """Fold the model into the average after optimizer step number ``optimizer_step`` (1-based)."""
        if optimizer_step <= self.warmup_steps:
            self._copy_from(model)
            return
        if (optimizer_step - self.warmup_steps) % self.every_steps != 0:
            self._copy_buffers(model)
            return
        model_params = dict(model.named_parameters())
        for name, ema_param in self.module.named_parameters():
            source = model_params[name].detach()
            if ema_param.dtype.is_floating_point:
                ema_param.lerp_(source.to(ema_param.dtype), 1.0 - self.decay)
            else:
                ema_param.copy_(source)
        self._copy_buffers(model)
        self.num_updates += 1

    def _copy_from(self, model: nn.Module) -> None:
        model_params = dict(model.named_parameters())
        for name, ema_param in self.module.named_parameters():
            ema_param.copy_(model_params[name].detach())
        self._copy_buffers(model)

    def _copy_buffers(self, model: nn.Module) -> None:
        model_buffers = dict(model.named_buffers())
        for name, ema_buffer in self.module.named_buffers():
            ema_buffer.copy_(model_buffers[name])

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"], strict=True)
        self.num_updates = int(state["num_updates"])
