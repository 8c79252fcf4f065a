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

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from core import checkpoint, distributed, runtime
from core.cli import add_arg, add_bool_arg, float_list, str2bool
from core.ema import ModelEMA
from core.errors import WSSSError
from core.runtime import Run

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = [round(0.10 + 0.05 * i, 2) for i in range(8)]  # 0.10, 0.15, ..., 0.45 (SPEC §4.1)
StepFn = Callable[["TrainContext", Any, int], Mapping[str, Any]]
ValidateFn = Callable[["TrainContext", int], Mapping[str, Any]]


class NonFiniteLossError(WSSSError):
    """A loss became NaN or infinite; the checkpoint of the last finished epoch is left untouched."""


class StatefulObject(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


def _optional_float(value: str) -> float | None:
    if str(value).strip().lower() in ("none", "", "0", "0.0"):
        return None
    try:
        return float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {value!r}") from e


def _optional_int(value: str) -> int | None:
    if str(value).strip().lower() in ("none", "", "all"):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {value!r}") from e


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse._ArgumentGroup:
    """Add the flags every training script shares (reference names and defaults; ``defaults`` overrides them).

    Example: ``add_training_args(parser, batch_size=16, accumulate_steps=2)`` for the P-NOC recipe.
    """
    group = parser.add_argument_group("training")
    add_arg(
        group, "--tag", type=str, default=None, help="run name; may contain '/'. Writes experiments/models/<tag>.pth"
    )
    add_arg(
        group, "--batch_size", type=int, default=32, help="GLOBAL batch size (split evenly over torchrun processes)"
    )
    add_arg(group, "--max_epoch", type=int, default=15, help="number of training epochs")
    add_arg(group, "--lr", type=float, default=0.1, help="base learning rate (poly schedule, power 0.9)")
    add_arg(group, "--wd", type=float, default=1e-4, help="weight decay")
    add_arg(
        group,
        "--optimizer",
        type=str,
        default="sgd",
        choices=("sgd", "momentum", "adamw"),
        help="sgd = SGD without momentum (reference default); momentum = SGD 0.9 Nesterov; adamw",
    )
    add_arg(group, "--lr_alpha_scratch", type=float, default=10.0, help="LR multiplier of scratch (head) weights")
    add_arg(group, "--lr_alpha_bias", type=float, default=2.0, help="LR multiplier of biases")
    add_arg(group, "--accumulate_steps", type=int, default=1, help="micro-batches per optimizer step")
    add_bool_arg(
        group,
        "--accumulate_mean",
        False,
        "divide the loss by --accumulate_steps (false = sum gradients, as the reference CAM scripts do)",
    )
    add_bool_arg(
        group, "--mixed_precision", False, "autocast: bf16 where supported (CPU, recent GPUs), else fp16 + GradScaler"
    )
    add_arg(
        group,
        "--max_grad_norm",
        type=_optional_float,
        default=None,
        help="clip the gradient norm to this value (none = off)",
    )
    add_bool_arg(
        group, "--ema", False, "keep an exponential moving average of the weights and save it as the final model"
    )
    add_arg(group, "--ema_decay", type=float, default=0.999, help="EMA decay d in θ_ema ← d·θ_ema + (1-d)·θ")
    add_arg(group, "--ema_steps", type=int, default=32, help="average into the EMA every N optimizer steps")
    add_arg(group, "--ema_warmup", type=int, default=1, help="epochs during which the EMA just copies the weights")
    add_arg(group, "--seed", type=int, default=0, help="random seed (each process uses seed + rank)")
    add_arg(group, "--num_workers", type=int, default=4, help="data-loading worker processes per training process")
    add_arg(group, "--print_ratio", type=float, default=0.25, help="log a line every this fraction of an epoch")
    add_bool_arg(group, "--resume", False, "continue from experiments/models/<tag>/last.pth if it exists")
    add_bool_arg(group, "--overwrite", False, "allow replacing the outputs of an earlier run with the same --tag")
    add_arg(group, "--device", type=str, default="auto", choices=distributed.DEVICES, help="auto = cuda when available")
    add_bool_arg(group, "--sync_bn", False, "SyncBatchNorm across processes (only with torchrun and --mode normal)")
    add_arg(
        group,
        "--wandb",
        type=str2bool,
        nargs="?",
        const=True,
        default=None,
        metavar="true|false",
        help="log to Weights & Biases (default: only when WANDB_PROJECT is set)",
    )
    add_bool_arg(group, "--deterministic", False, "use deterministic torch kernels (slower)")
    add_bool_arg(group, "--validate", False, "run validation at the end of every epoch")
    add_arg(
        group,
        "--validate_max_steps",
        type=_optional_int,
        default=None,
        help="validation batches per process and epoch (none = all)",
    )
    add_arg(
        group,
        "--validate_thresholds",
        type=float_list,
        default=list(DEFAULT_THRESHOLDS),
        help="comma-separated background thresholds of the CAM sweep",
    )
    parser.set_defaults(**defaults)
    return group


def total_optimizer_steps(steps_per_epoch: int, epochs: int, accumulate_steps: int) -> int:
    """``T`` of the poly schedule: optimizer steps in the whole run (accumulation spans epoch ends)."""
    return max(1, epochs * steps_per_epoch // max(1, accumulate_steps))


def resolve_amp(enabled: bool, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Choose the autocast dtype and whether a GradScaler is needed.

    Returns:
        (dtype or None when AMP is off, needs_scaler). bf16 on CPU and on GPUs that support it (no scaler);
        fp16 with a GradScaler on older GPUs.
    """
    if not enabled:
        return None, False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16, True
    return torch.bfloat16, False


def build_loader(
    dataset: Dataset, run: Run, train: bool, num_workers: int | None = None, batch_size: int | None = None
) -> DataLoader:
    """A per-process DataLoader.

    Training: shuffled by a sampler seeded with ``(--seed, epoch)`` (``fit`` sets the epoch), last partial batch
    dropped. Evaluation: this rank's shard ``ids[rank::world]`` in order, every sample exactly once.
    """
    workers = run.args.num_workers if num_workers is None else num_workers
    local_batch = run.local_batch_size if batch_size is None else batch_size
    pin = run.device.type == "cuda"
    if train:
        sampler = distributed.build_sampler(dataset, run.dist, shuffle=True, seed=int(run.args.seed))
        loader = DataLoader(
            dataset, batch_size=local_batch, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=True
        )
        if len(loader) == 0:
            raise WSSSError(
                f"the training set has {len(dataset)} images, fewer than one batch of {local_batch} per process: "
                "lower --batch_size or check --domain"
            )
        return loader
    indices = distributed.shard(range(len(dataset)), run.dist.rank, run.dist.world_size)
    return DataLoader(
        Subset(dataset, indices),
        batch_size=local_batch,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        drop_last=False,
    )


@dataclass
class Member:
    """One trained (or frozen) network and everything that steps it."""

    name: str
    model: nn.Module  # DDP-wrapped when distributed: use it for forward passes that train
    module: nn.Module  # the bare network: state dicts, validation, EMA
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEMA | None = None
    max_grad_norm: float | None = None
    micro_steps: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0

    def counters(self) -> dict[str, int]:
        return {
            "micro_steps": self.micro_steps,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
        }


class TrainContext:
    """Networks, optimizers, AMP, accumulation and counters of one training run.

    Args:
        run: from :func:`core.runtime.setup`.
        steps_per_epoch: batches per epoch on each process (``len(train_loader)``).
    """

    def __init__(self, run: Run, steps_per_epoch: int) -> None:
        args = run.args
        self.run = run
        self.args = args
        self.device = run.device
        self.steps_per_epoch = steps_per_epoch
        self.max_epoch = int(args.max_epoch)
        self.accumulate_steps = max(1, int(args.accumulate_steps))
        self.accumulate_mean = bool(args.accumulate_mean)
        self.amp_dtype, self._needs_scaler = resolve_amp(bool(args.mixed_precision), self.device)
        self.channels_last = self.device.type == "cuda"
        self.members: dict[str, Member] = {}
        self.states: dict[str, StatefulObject] = {}
        self.epoch = 0  # finished epochs
        self.step = 0  # finished micro-steps (batches) over the whole run
        self.main = ""
        self._resumed = False

    # -- set-up -------------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """Micro-steps (batches) of the whole run: the ``T`` of per-batch schedules such as Puzzle's α."""
        return self.max_epoch * self.steps_per_epoch

    @property
    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: the ``T`` of the poly LR schedule."""
        return total_optimizer_steps(self.steps_per_epoch, self.max_epoch, self.accumulate_steps)

    @property
    def models(self) -> dict[str, nn.Module]:
        """name -> model to call in the step function (DDP-wrapped when distributed)."""
        return {name: m.model for name, m in self.members.items()}

    def module(self, name: str) -> nn.Module:
        """The bare network registered as ``name`` (no DDP wrapper)."""
        return self.members[name].module

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move a network to the run's device (channels-last on CUDA) without registering it."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def add(
        self,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        max_grad_norm: float | None = None,
        ema: bool = False,
        sync_bn: bool = False,
        find_unused_parameters: bool = False,
    ) -> nn.Module:
        """Register a network; returns the model to call (DDP-wrapped when distributed and trainable).

        The first registered network is the *main* one, whose weights :func:`fit` writes as the final model.
        The optimizer may be built before or after this call (moving keeps the same Parameter objects).
        A network without optimizer is treated as frozen (never stepped, kept in eval mode).
        """
        if name in self.members:
            raise ValueError(f"a network named {name!r} is already registered")
        module = self.prepare(model)
        wrapped = module
        if optimizer is not None:
            wrapped = distributed.wrap_model(
                module, self.run.dist, sync_bn=sync_bn, find_unused_parameters=find_unused_parameters
            )
            module = distributed.unwrap(wrapped)  # SyncBN conversion returns new BN modules
        scaler = torch.amp.GradScaler(self.device.type) if (optimizer is not None and self._needs_scaler) else None
        ema_model = None
        if ema and optimizer is not None:
            warmup = int(self.args.ema_warmup) * self.steps_per_epoch // self.accumulate_steps
            ema_model = ModelEMA(module, float(self.args.ema_decay), int(self.args.ema_steps), warmup)
        self.members[name] = Member(name, wrapped, module, optimizer, scheduler, scaler, ema_model, max_grad_norm)
        if not self.main:
            self.main = name
        if optimizer is None:
            module.eval()
        return wrapped

    def add_state(self, name: str, obj: StatefulObject) -> None:
        """Checkpoint an extra object with ``state_dict``/``load_state_dict`` (e.g. OC-CSE class counters)."""
        self.states[name] = obj

    # -- per step -----------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes and losses: autocast to the AMP dtype, or nothing when AMP is off."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a batch tensor to the device (images of shape [B, 3, H, W] become channels-last on CUDA)."""
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4 and tensor.is_floating_point():
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def lr(self, name: str | None = None) -> float:
        """Current learning rate of the first parameter group of a network's optimizer."""
        member = self.members[name or self.main]
        return float(member.optimizer.param_groups[0]["lr"]) if member.optimizer else 0.0

    def _begin_micro_step(self) -> None:
        # DDP all-reduces gradients only on the micro-step that ends an accumulation (saves communication);
        # the flag must be set before the forward pass, so it is predicted from the counters here.
        for member in self.members.values():
            if isinstance(member.model, nn.parallel.DistributedDataParallel):
                member.model.require_backward_grad_sync = (member.micro_steps + 1) % self.accumulate_steps == 0

    def update(self, name: str, loss: torch.Tensor) -> bool:
        """Backpropagate ``loss`` into network ``name``; every ``--accumulate_steps`` calls, step its optimizer.

        The optimizer step unscales (fp16), clips (``max_grad_norm``), steps, updates the scaler, zeroes the
        gradients, advances the scheduler and the EMA, for this network only.

        Args:
            loss: scalar tensor (any dtype) with a graph reaching the network's parameters.

        Returns:
            True when an optimizer step was taken (False while accumulating, or when fp16 overflow skipped it).

        Raises:
            NonFiniteLossError: the loss is NaN/inf on any process (all processes stop together).
        """
        member = self.members[name]
        if member.optimizer is None:
            raise ValueError(f"network {name!r} was registered without an optimizer and cannot be updated")
        self._check_finite(name, loss)
        if self.accumulate_mean:
            loss = loss / self.accumulate_steps
        if member.scaler is not None:
            member.scaler.scale(loss).backward()
        else:
            loss.backward()
        member.micro_steps += 1
        if member.micro_steps % self.accumulate_steps != 0:
            return False
        return self._optimizer_step(member)

    def _check_finite(self, name: str, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all().item())
        if distributed.all_ranks_agree(finite):
            return
        last = self.run.checkpoint_path
        kept = f"{last} (end of epoch {self.epoch}) is kept" if last.exists() else "no checkpoint was written yet"
        message = (
            f"loss of {name!r} is not finite at epoch {self.epoch + 1}, step {self.step + 1}; {kept}: "
            "lower --lr or set --max_grad_norm, then rerun with --resume true"
        )
        logger.error(message)
        raise NonFiniteLossError(message)

    def _optimizer_step(self, member: Member) -> bool:
        optimizer, scaler = member.optimizer, member.scaler
        if member.max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, member.max_grad_norm)
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale_before  # the scale shrinks only when the step was skipped
        else:
            optimizer.step()
            stepped = True
        optimizer.zero_grad(set_to_none=True)
        if not stepped:
            member.skipped_steps += 1
            return False
        member.optimizer_steps += 1
        if member.scheduler is not None:
            member.scheduler.step()  # poly LR counts successful optimizer steps only
        if member.ema is not None:
            member.ema.update(member.module, member.optimizer_steps)
        return True

    # -- state --------------------------------------------------------------------------------------------------
    def final_module(self, name: str | None = None) -> nn.Module:
        """The network whose weights are saved as the final model: its EMA copy when ``--ema true``."""
        member = self.members[name or self.main]
        return member.ema.module if member.ema is not None else member.module

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizers, schedulers, scalers, EMA, counters,
        pending accumulated gradients, extra method state, RNG states of every process and the flags."""
        trained = {n: m for n, m in self.members.items() if m.optimizer is not None}
        return {
            "models": {n: m.module.state_dict() for n, m in self.members.items()},
            "optimizers": {n: m.optimizer.state_dict() for n, m in trained.items()},
            "schedulers": {n: m.scheduler.state_dict() for n, m in trained.items() if m.scheduler is not None},
            "scalers": {n: m.scaler.state_dict() for n, m in trained.items() if m.scaler is not None},
            "ema": {n: m.ema.state_dict() for n, m in trained.items() if m.ema is not None},
            "counters": {n: m.counters() for n, m in trained.items()},
            "pending_grads": {n: _pending_grads(m.module) for n, m in trained.items()},
            "states": {n: obj.state_dict() for n, obj in self.states.items()},
            "epoch": self.epoch,
            "step": self.step,
            "rng": _gather_rng_states(),
            "world_size": self.run.dist.world_size,
            "args": checkpoint.plain_args(self.args),
            "model_kwargs": {
                n: checkpoint.plain_args(getattr(m.module, "model_kwargs", {})) for n, m in self.members.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict` output (already loaded on CPU); raises WSSSError on mismatching networks."""
        missing = set(self.members) - set(state["models"])
        if missing:
            raise WSSSError(f"{source} has no weights for {sorted(missing)}: it was written by another training script")
        for name, member in self.members.items():
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
        for name, obj in self.states.items():
            if name in state.get("states", {}):
                obj.load_state_dict(state["states"][name])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self._restore_rng(state)
        _warn_changed_args(state.get("args", {}), checkpoint.plain_args(self.args))

    def _restore_rng(self, state: Mapping[str, Any]) -> None:
        rng_states = state["rng"]
        rank, world = self.run.dist.rank, self.run.dist.world_size
        if int(state.get("world_size", 1)) == world and rank < len(rng_states):
            checkpoint.restore_rng_state(rng_states[rank])
        else:
            logger.warning(
                "checkpoint was written by %s processes, now %d: random streams restart from the seed",
                state.get("world_size"),
                world,
            )

    def save_checkpoint(self) -> None:
        """Write the full state to ``experiments/models/<tag>/last.pth`` (rank 0 writes; all ranks must call)."""
        state = self.state_dict()  # collective (RNG gather): every rank takes part
        if self.run.is_main:
            checkpoint.save(self.run.checkpoint_path, state)
        distributed.barrier()

    def resume(self) -> None:
        """Load ``last.pth`` when the run was started with ``--resume true`` and one exists (once)."""
        if self._resumed or not self.run.resume:
            return
        self.load_state_dict(checkpoint.load(self.run.checkpoint_path), str(self.run.checkpoint_path))
        self._resumed = True
        logger.info("resumed %s: %d epoch(s) and %d step(s) done", self.run.checkpoint_path, self.epoch, self.step)

    def train_mode(self) -> None:
        """Trained networks to train mode (their own ``train()`` keeps frozen BN frozen); frozen ones to eval."""
        for member in self.members.values():
            member.model.train(member.optimizer is not None)


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


def _count_images(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    for item in batch:
        if isinstance(item, torch.Tensor):
            return int(item.shape[0])
        if isinstance(item, (list, tuple)):
            return len(item)
    return 0


class _Averager:
    """Running means of named scalars."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.sums[key] += float(value)
            self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _format(values: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def _epoch_batches(ctx: TrainContext, loader: DataLoader, epoch: int) -> Iterator[Any]:
    # Every random stream of epoch e (sample order, augmentations, worker seeds, dropout) is a function of
    # (seed, rank, e) only, so a run resumed at an epoch boundary replays exactly what the uninterrupted run did,
    # including transforms that draw from their own generators seeded by torch's initial seed.
    runtime.seed_everything(runtime.epoch_seed(int(ctx.args.seed), ctx.run.dist.rank, epoch))
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    # disable=None: a progress bar on an interactive rank-0 terminal only, not in batch-job log files.
    bar = tqdm(
        loader,
        total=len(loader),
        desc=f"epoch {epoch + 1}/{ctx.max_epoch}",
        disable=None if ctx.run.is_main else True,
        leave=False,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    yield from bar


def train_one_epoch(ctx: TrainContext, loader: DataLoader, step_fn: StepFn, epoch: int) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch means of the step function's scalars (over all processes)."""
    ctx.train_mode()
    log_every = max(1, int(round(ctx.steps_per_epoch * ctx.args.print_ratio)))
    epoch_avg, interval = _Averager(), _Interval()
    with logging_redirect_tqdm():  # log lines print above the progress bar instead of breaking it
        for index, batch in enumerate(_epoch_batches(ctx, loader, epoch)):
            ctx._begin_micro_step()
            scalars = {k: float(v) for k, v in step_fn(ctx, batch, ctx.step).items()}
            ctx.step += 1
            epoch_avg.add(scalars)
            interval.add(scalars, _count_images(batch) * ctx.run.dist.world_size)
            if (index + 1) % log_every == 0 or index + 1 == ctx.steps_per_epoch:
                _log_interval(ctx, epoch, index + 1, interval)
                interval = _Interval()
    return distributed.all_reduce_mean(epoch_avg.means())


class _Interval(_Averager):
    """Scalars, step count, image count and wall time since the last log line."""

    def __init__(self) -> None:
        super().__init__()
        self.start, self.steps, self.images = time.perf_counter(), 0, 0

    def add(self, values: Mapping[str, Any], images: int = 0) -> None:  # type: ignore[override]
        super().add(values)
        self.steps += 1
        self.images += images


def _log_interval(ctx: TrainContext, epoch: int, index: int, interval: _Interval) -> None:
    elapsed = max(time.perf_counter() - interval.start, 1e-9)
    means = interval.means()
    record = {
        "kind": "train",
        "epoch": epoch + 1,
        "step": ctx.step,
        "lr": ctx.lr(),
        "images_per_s": interval.images / elapsed,
    }
    remaining = (ctx.total_steps - ctx.step) * elapsed / max(1, interval.steps)
    logger.info(
        "epoch %d/%d step %d/%d %s lr=%.6f img/s=%.1f eta=%s",
        epoch + 1,
        ctx.max_epoch,
        index,
        ctx.steps_per_epoch,
        _format(means),
        record["lr"],
        record["images_per_s"],
        _eta(remaining),
    )
    ctx.run.metrics.write(record | means)
    ctx.run.wandb.log({f"train/{k}": v for k, v in means.items()} | {"train/lr": record["lr"]}, step=ctx.step)


def _eta(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fit(
    ctx: TrainContext, loader: DataLoader, step_fn: StepFn, validate_fn: ValidateFn | None = None
) -> dict[str, Any]:
    """Train from the current (possibly resumed) epoch to ``--max_epoch``, then write the final weights.

    At every epoch end: epoch means are logged (``metrics.jsonl``, W&B), ``validate_fn(ctx, epoch)`` runs
    if given (its dict is logged under ``val/``), and the full state is saved to ``last.pth``. A run
    resumed from ``last.pth`` produces the same weights as an uninterrupted one (same seed, CPU).

    Returns:
        The last epoch's ``train/*`` and ``val/*`` metrics plus ``final_path``.
    """
    if not ctx.members:
        raise ValueError("register at least one network with ctx.add() before fit()")
    ctx.resume()
    summary: dict[str, Any] = {}
    for epoch in range(ctx.epoch, ctx.max_epoch):
        start = time.perf_counter()
        train_means = train_one_epoch(ctx, loader, step_fn, epoch)
        summary = {f"train/{k}": v for k, v in train_means.items()}
        if validate_fn is not None:
            summary |= {f"val/{k}": v for k, v in validate_fn(ctx, epoch).items()}
        ctx.epoch = epoch + 1
        logger.info(
            "epoch %d/%d done in %.0fs: %s",
            epoch + 1,
            ctx.max_epoch,
            time.perf_counter() - start,
            _format({k: v for k, v in summary.items() if isinstance(v, float)}),
        )
        ctx.run.metrics.write({"kind": "epoch", "epoch": epoch + 1, "step": ctx.step, **summary})
        ctx.run.wandb.log(summary, step=ctx.step)
        ctx.save_checkpoint()
    return summary | {"final_path": str(write_final_weights(ctx))}


def write_final_weights(ctx: TrainContext, name: str | None = None, path: str | Path | None = None) -> Path:
    """Save a network's state dict (EMA copy if enabled) atomically on rank 0; all ranks must call.

    Args:
        name: registered network (default: the main one).
        path: destination (default ``experiments/models/<tag>.pth``; e.g. P-NOC's ``<tag>-oc.pth`` for its OC).
    """
    path = Path(path) if path is not None else ctx.run.final_path
    if ctx.run.is_main:
        checkpoint.save_weights(path, ctx.final_module(name).state_dict())
    distributed.barrier()
    return path
