"""The loop: epochs of step-function calls, progress lines, metrics, checkpoints and the final weights."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from core import checkpoint, distributed, runtime
from core.engine import state
from core.engine.context import StepFn, TrainContext, ValidateFn

logger = logging.getLogger(__name__)


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
            ctx.begin_micro_step()
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
    ctx: TrainContext,
    loader: DataLoader,
    step_fn: StepFn,
    validate_fn: ValidateFn | None = None,
    also_save: Mapping[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Train from the current (possibly resumed) epoch to ``--max_epoch``, then write the final weights.

    At every epoch end: epoch means are logged (``metrics.jsonl``, W&B), ``validate_fn(ctx, epoch)`` runs
    if given (its dict is logged under ``val/``), and the full state is saved to ``last.pth``. A run
    resumed from ``last.pth`` produces the same weights as an uninterrupted one (same seed, CPU).

    Args:
        also_save: more networks whose final weights belong to the run, ``{name: path}`` (P-NOC's OC). They are
            written before the main ``<tag>.pth``, so that file's existence means the whole set is complete; a run
            killed in between resumes (``--resume true``) straight to writing them.

    Returns:
        The last epoch's ``train/*`` and ``val/*`` metrics, ``final_path`` and, with ``also_save``, ``also_saved``
        (name -> path).
    """
    if not ctx.members:
        raise ValueError("register at least one network with ctx.add() before fit()")
    state.resume(ctx)
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
        state.save_checkpoint(ctx)
    also_saved = {name: str(write_final_weights(ctx, name, path)) for name, path in (also_save or {}).items()}
    summary["final_path"] = str(write_final_weights(ctx))
    return summary | ({"also_saved": also_saved} if also_saved else {})


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
