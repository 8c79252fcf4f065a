"""Training state: what a checkpoint holds, saving it at epoch ends, and resuming from it exactly."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from core import checkpoint, distributed
from core.engine.context import TrainContext
from core.errors import WSSSError

logger = logging.getLogger(__name__)


def training_state(ctx: TrainContext) -> dict[str, Any]:
    """Everything needed to continue exactly: weights, optimizers, schedulers, scalers, EMA, counters,
    pending accumulated gradients, extra method state, RNG states of every process and the flags."""
    trained = {n: m for n, m in ctx.members.items() if m.optimizer is not None}
    return {
        "models": {n: m.module.state_dict() for n, m in ctx.members.items()},
        "optimizers": {n: m.optimizer.state_dict() for n, m in trained.items()},
        "schedulers": {n: m.scheduler.state_dict() for n, m in trained.items() if m.scheduler is not None},
        "scalers": {n: m.scaler.state_dict() for n, m in trained.items() if m.scaler is not None},
        "ema": {n: m.ema.state_dict() for n, m in trained.items() if m.ema is not None},
        "counters": {n: m.counters() for n, m in trained.items()},
        "pending_grads": {n: _pending_grads(m.module) for n, m in trained.items()},
        "states": {n: obj.state_dict() for n, obj in ctx.states.items()},
        "epoch": ctx.epoch,
        "step": ctx.step,
        "rng": _gather_rng_states(),
        "world_size": ctx.run.dist.world_size,
        "args": checkpoint.plain_args(ctx.args),
        "model_kwargs": {
            n: checkpoint.plain_args(getattr(m.module, "model_kwargs", {})) for n, m in ctx.members.items()
        },
    }


def load_training_state(ctx: TrainContext, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Restore :func:`training_state` output (already loaded on CPU); raises WSSSError on mismatching networks."""
    missing = set(ctx.members) - set(state["models"])
    if missing:
        raise WSSSError(f"{source} has no weights for {sorted(missing)}: it was written by another training script")
    for name, member in ctx.members.items():
        checkpoint.load_state_dict_strict(member.module, state["models"][name], source, f"network {name!r}")
        if member.optimizer is None:
            continue
        member.optimizer.load_state_dict(state["optimizers"][name])
        if member.scheduler is not None and name in state["schedulers"]:
            member.scheduler.load_state_dict(state["schedulers"][name])
        if member.scaler is not None and name in state["scalers"]:
            member.scaler.load_state_dict(state["scalers"][name])
        if member.ema is not None and name in state["ema"]:
            member.ema.load_state_dict(state["ema"][name])
        counters = state["counters"][name]
        member.micro_steps = int(counters["micro_steps"])
        member.optimizer_steps = int(counters["optimizer_steps"])
        member.skipped_steps = int(counters["skipped_steps"])
        _restore_pending_grads(member.module, state["pending_grads"].get(name, {}))
    for name, obj in ctx.states.items():
        if name in state.get("states", {}):
            obj.load_state_dict(state["states"][name])
    ctx.epoch = int(state["epoch"])
    ctx.step = int(state["step"])
    _restore_rng(ctx, state)
    _warn_changed_args(state.get("args", {}), checkpoint.plain_args(ctx.args))


def _restore_rng(ctx: TrainContext, state: Mapping[str, Any]) -> None:
    rng_states = state["rng"]
    rank, world = ctx.run.dist.rank, ctx.run.dist.world_size
    if int(state.get("world_size", 1)) == world and rank < len(rng_states):
        checkpoint.restore_rng_state(rng_states[rank])
    else:
        logger.warning(
            "checkpoint was written by %s processes, now %d: random streams restart from the seed",
            state.get("world_size"),
            world,
        )


def save_checkpoint(ctx: TrainContext) -> None:
    """Write the full state to ``experiments/models/<tag>/last.pth`` (rank 0 writes; all ranks must call)."""
    state = training_state(ctx)  # collective (RNG gather): every rank takes part
    if ctx.run.is_main:
        checkpoint.save(ctx.run.checkpoint_path, state)
    distributed.barrier()


def resume(ctx: TrainContext) -> None:
    """Load ``last.pth`` when the run was started with ``--resume true`` and one exists (once)."""
    if ctx.resumed or not ctx.run.resume:
        return
    load_training_state(ctx, checkpoint.load(ctx.run.checkpoint_path), str(ctx.run.checkpoint_path))
    ctx.resumed = True
    ctx.run.metrics.drop_after(ctx.step)  # the killed run's rows past the checkpoint are logged again
    logger.info("resumed %s: %d epoch(s) and %d step(s) done", ctx.run.checkpoint_path, ctx.epoch, ctx.step)


def _pending_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    # Gradients accumulated but not yet applied (an epoch that ends mid-accumulation, or P-NOC's OC gradients
    # left by the CAM generator's backward); without them a resumed run would diverge.
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _restore_pending_grads(module: nn.Module, grads: Mapping[str, torch.Tensor]) -> None:
    for name, param in module.named_parameters():
        param.grad = grads[name].to(param.device, param.dtype).clone() if name in grads else None


def _gather_rng_states() -> list[dict[str, Any]]:
    local = checkpoint.capture_rng_state()
    if not distributed.is_distributed():
        return [local]
    gathered: list[Any] = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered


_RESUME_SENSITIVE = ("batch_size", "max_epoch", "accumulate_steps", "lr", "optimizer", "architecture", "mode", "seed")


def _warn_changed_args(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    for key in _RESUME_SENSITIVE:
        if key in saved and key in current and saved[key] != current[key]:
            logger.warning(
                "resuming with --%s %s, but the checkpoint was trained with %s", key, current[key], saved[key]
            )
