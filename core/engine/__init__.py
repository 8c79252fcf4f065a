"""The one training loop shared by every training script (CAM methods, C²AM, AffinityNet, DeepLabV3+).

A script builds its networks, registers them in a :class:`TrainContext` and hands :func:`fit` a *step function*,
the only method-specific part of the loop::

    def step_fn(ctx, batch, step):               # step = global micro-step index, 0-based
        images = ctx.to_device(batch["image"])
        with ctx.autocast():
            loss = loss_fn(ctx.models["cg"](images), ctx.to_device(batch["label"]))
        ctx.update("cg", loss)                   # backward; optimizer step every --accumulate_steps calls
        return {"loss": loss.item()}

The context owns, per named network: the (DDP-wrapped) model, optimizer, scheduler, GradScaler, EMA and step
counters, so methods with two networks (P-NOC's ``cg`` and ``oc``) step each on its own schedule.
"""

from core.engine.context import (
    Member,
    NonFiniteLossError,
    StatefulObject,
    StepFn,
    TrainContext,
    ValidateFn,
    build_loader,
    total_optimizer_steps,
)
from core.engine.flags import DEFAULT_THRESHOLDS, add_training_args
from core.engine.loop import fit, train_one_epoch, write_final_weights

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Member",
    "NonFiniteLossError",
    "StatefulObject",
    "StepFn",
    "TrainContext",
    "ValidateFn",
    "add_training_args",
    "build_loader",
    "fit",
    "total_optimizer_steps",
    "train_one_epoch",
    "write_final_weights",
]
