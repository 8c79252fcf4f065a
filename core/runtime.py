"""Per-run set-up, the first call of every training ``main``: processes, seeds, folders, logging, args.json.

``setup(args, stage)`` turns the parsed flags into a :class:`Run` that knows where the run writes
(``experiments/models/<tag>/``), which device and rank it is, and whether it resumes a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import artifacts, checkpoint, distributed, paths, runlog
from core.distributed import DistInfo
from core.errors import WSSSError

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training script needs to know about the current run.

    Attributes:
        args: the parsed flags.
        stage: ``cam``, ``ccam``, ``rw`` or ``seg`` (W&B job type, log prefix).
        dist: rank, world size and device.
        run_dir: ``experiments/models/<tag>/`` (checkpoint, logs, args.json).
        checkpoint_path: ``run_dir/last.pth``.
        final_path: ``experiments/models/<tag>.pth``.
        resume: True when ``checkpoint_path`` exists and ``--resume true`` was given.
        local_batch_size: per-process batch (``--batch_size // world_size``).
        metrics: the ``metrics.jsonl`` writer (disabled off rank 0).
        wandb: the optional W&B logger (no-op unless enabled, and off rank 0).
    """

    args: argparse.Namespace
    stage: str
    dist: DistInfo
    run_dir: Path
    checkpoint_path: Path
    final_path: Path
    resume: bool
    local_batch_size: int
    metrics: runlog.MetricsWriter
    wandb: runlog.WandbLogger

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def close(self) -> None:
        """Finish W&B, close the log files and leave the process group."""
        self.wandb.finish()
        runlog.close_logging()
        distributed.cleanup()


def detached_run(
    args: argparse.Namespace, device: torch.device, local_batch_size: int, stage: str = "benchmark"
) -> Run:
    """A single-process :class:`Run` that writes nothing (no run folder, metrics or W&B), for benchmarks and probes."""
    nowhere = Path(tempfile.gettempdir()) / "wsss-detached-run"
    return Run(
        args=args,
        stage=stage,
        dist=DistInfo(device=device),
        run_dir=nowhere,
        checkpoint_path=nowhere / paths.CHECKPOINT_NAME,
        final_path=nowhere.with_suffix(".pth"),
        resume=False,
        local_batch_size=local_batch_size,
        metrics=runlog.MetricsWriter(None, enabled=False),
        wandb=runlog.WandbLogger(False, name=stage, job_type=stage, config={}),
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A well-mixed seed for one (run seed, rank, epoch): each epoch's random streams depend only on these."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint32)[0])


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (slower; errors on ops that have none) when ``--deterministic true``."""
    if not enabled:
        return
    # cuBLAS needs this workspace setting before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _remove_stale_state(run_dir: Path, last_path: Path) -> None:
    # A fresh start (--overwrite) must not leave an older run's checkpoint for a later --resume to pick up,
    # nor mix its metrics into the new metrics.jsonl.
    for stale in (last_path, run_dir / "metrics.jsonl"):
        if stale.exists():
            logger.info("starting over: removing %s", stale)
            stale.unlink()


def _remove_stale_temp_files(run_dir: Path, final_path: Path) -> None:
    # A job killed inside atomic_write leaves its .<name>.tmp-* file; the final weights' folder is shared with
    # other tags, so there only this run's names (<tag>.pth and a companion such as <tag>-oc.pth) are cleaned.
    artifacts.remove_stale_temp_files(run_dir)
    stem, suffix = final_path.stem, final_path.suffix

    def ours(name: str) -> bool:
        return name == final_path.name or (name.startswith(f"{stem}-") and name.endswith(suffix))

    artifacts.remove_stale_temp_files(final_path.parent, ours)


def setup(args: argparse.Namespace, stage: str, models_dir: str | Path = paths.MODELS_DIR) -> Run:
    """Prepare a training run from its flags.

    Joins the process group (torchrun) or stays single-process, checks the global batch splits over the
    processes, refuses to overwrite a finished run, seeds ``seed + rank``, creates
    ``experiments/models/<tag>/``, starts logging and writes ``args.json`` (rank 0).

    Args:
        args: flags from :func:`core.engine.add_training_args` (needs ``tag``, ``seed``, ``batch_size``,
            ``device``, ``overwrite``, ``resume``, ``deterministic``, ``wandb``).
        stage: stage name used for W&B ``job_type`` and the first log line.
        models_dir: root of run folders (tests pass a temporary folder).

    Raises:
        WSSSError: bad batch size, missing tag, or outputs that would be overwritten.
    """
    if not getattr(args, "tag", None):
        raise WSSSError("--tag is required: it names the run folder experiments/models/<tag>/")
    info = distributed.init_distributed(getattr(args, "device", "auto"))
    local_batch = distributed.per_rank_batch(args.batch_size, info.world_size)
    run_dir = paths.run_dir(args.tag, models_dir)
    last_path = paths.checkpoint_path(args.tag, models_dir)
    final_path = paths.final_weights_path(args.tag, models_dir)
    # Every rank sees the same files, so every rank reaches the same verdict (no rank hangs in a barrier).
    resume = checkpoint.check_outputs(final_path, last_path, bool(args.overwrite), bool(args.resume))

    seed_everything(int(args.seed) + info.rank)
    set_deterministic(bool(getattr(args, "deterministic", False)))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(run_dir, final_path)
        if not resume:
            _remove_stale_state(run_dir, last_path)
    distributed.barrier()
    runlog.setup_logging(run_dir, info.rank)
    plain = checkpoint.plain_args(args)
    if info.is_main:
        runlog.save_args(run_dir / "args.json", plain)
    metrics = runlog.MetricsWriter(run_dir / "metrics.jsonl", enabled=info.is_main)
    use_wandb = info.is_main and runlog.wandb_requested(getattr(args, "wandb", None))
    wandb = runlog.WandbLogger(use_wandb, name=args.tag, job_type=stage, config=plain)
    logger.info(
        "%s run %s: %d process(es) on %s, global batch %d (%d per process)%s",
        stage,
        args.tag,
        info.world_size,
        info.device,
        args.batch_size,
        local_batch,
        f", resuming {last_path}" if resume else "",
    )
    return Run(args, stage, info, run_dir, last_path, final_path, resume, local_batch, metrics, wandb)
