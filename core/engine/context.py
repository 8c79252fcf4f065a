"""The training context: networks, optimizers, AMP, accumulation and step counters of one run."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from core import distributed
from core.ema import ModelEMA
from core.errors import WSSSError
from core.parallel import training_workers_context
from core.precision import ComputeFormat, compute_format, log_compute_format
from core.runtime import Run

logger = logging.getLogger(__name__)

StepFn = Callable[["TrainContext", Any, int], Mapping[str, Any]]
ValidateFn = Callable[["TrainContext", int], Mapping[str, Any]]


class NonFiniteLossError(WSSSError):
    """A loss became NaN or infinite; the checkpoint of the last finished epoch is left untouched."""


class StatefulObject(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


def total_optimizer_steps(steps_per_epoch: int, epochs: int, accumulate_steps: int) -> int:
    """``T`` of the poly schedule: optimizer steps in the whole run (accumulation spans epoch ends)."""
    return max(1, epochs * steps_per_epoch // max(1, accumulate_steps))


def build_loader(
    dataset: Dataset,
    run: Run,
    train: bool,
    num_workers: int | None = None,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A per-process DataLoader.

    Training: shuffled by a sampler seeded with ``(--seed, epoch)`` (``fit`` sets the epoch), last partial batch
    dropped. Evaluation: this rank's shard ``ids[rank::world]`` in order, every sample exactly once.
    ``collate_fn`` replaces the default stacking (e.g. padding images of different sizes). On CPU the workers come
    from a forkserver (:func:`core.parallel.training_workers_context`).
    """
    workers = run.args.num_workers if num_workers is None else num_workers
    local_batch = run.local_batch_size if batch_size is None else batch_size
    pin = run.device.type == "cuda"
    workers_context = training_workers_context(run.device.type, workers)
    if train:
        sampler = distributed.build_sampler(dataset, run.dist, shuffle=True, seed=int(run.args.seed))
        loader = DataLoader(
            dataset,
            batch_size=local_batch,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            drop_last=True,
            collate_fn=collate_fn,
            multiprocessing_context=workers_context,
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
        collate_fn=collate_fn,
        multiprocessing_context=workers_context,
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
        channels_last: keep networks and image batches channels-last (default: :func:`core.precision.compute_format`
            decides, i.e. on CUDA, and on CPU with bf16).
    """

    def __init__(self, run: Run, steps_per_epoch: int, channels_last: bool | None = None) -> None:
        args = run.args
        self.run = run
        self.args = args
        self.device = run.device
        self.steps_per_epoch = steps_per_epoch
        self.max_epoch = int(args.max_epoch)
        self.accumulate_steps = max(1, int(args.accumulate_steps))
        self.accumulate_mean = bool(args.accumulate_mean)
        self.compute: ComputeFormat = compute_format(bool(args.mixed_precision), self.device, channels_last)
        log_compute_format(self.compute, "training")
        self.members: dict[str, Member] = {}
        self.states: dict[str, StatefulObject] = {}
        self.epoch = 0  # finished epochs
        self.step = 0  # finished micro-steps (batches) over the whole run
        self.main = ""
        self.resumed = False  # set by core.engine.state.resume

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
        """Move a network to the run's device (in the run's memory format) without registering it."""
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
        needs_scaler = optimizer is not None and self.compute.needs_scaler
        scaler = torch.amp.GradScaler(self.device.type) if needs_scaler else None
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
    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the run (None: fp32)."""
        return self.compute.amp_dtype

    @property
    def channels_last(self) -> bool:
        """Whether networks and image batches are kept channels-last."""
        return self.compute.channels_last

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes and losses: autocast to the AMP dtype, or nothing when AMP is off."""
        return self.compute.autocast()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a batch tensor to the device (images [B, 3, H, W] become channels-last when the run uses it)."""
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4 and tensor.is_floating_point():
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def lr(self, name: str | None = None) -> float:
        """Current learning rate of the first parameter group of a network's optimizer."""
        member = self.members[name or self.main]
        return float(member.optimizer.param_groups[0]["lr"]) if member.optimizer else 0.0

    def begin_micro_step(self) -> None:
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

    def train_mode(self) -> None:
        """Trained networks to train mode (their own ``train()`` keeps frozen BN frozen); frozen ones to eval."""
        for member in self.members.values():
            member.model.train(member.optimizer is not None)
