"""The one set-up path of every script: processes, seeds, folders, logging, ``args.json`` and the manifest.

Two context managers, one per kind of script:

* :func:`training_run` (training scripts) yields a :class:`Run` that knows where the run writes
  (``experiments/models/<tag>/``), which device and rank it is, and whether it resumes a checkpoint;
* :func:`stage_run` (inference, pseudo masks, evaluation and every later ``make_*`` script) yields a
  :class:`StageRun` writing into one output folder, resumable per file.

Both write ``manifest.json`` (:mod:`core.manifest`) when the work starts and again, marked complete, when it
ends; a rerun whose flags or inputs differ from the manifest's refuses unless ``--overwrite true``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import artifacts, checkpoint, distributed, manifest, paths, runlog
from core.distributed import DistInfo

logger = logging.getLogger(__name__)


class _OnDevice:
    """The device and rank-0 shortcuts of a run that has a ``dist`` (:class:`core.distributed.DistInfo`)."""

    dist: DistInfo

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


@dataclass
class Run(_OnDevice):
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
    provenance: manifest.Provenance | None = None
    started: str = ""

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


def setup(
    args: argparse.Namespace,
    stage: str,
    models_dir: str | Path = paths.MODELS_DIR,
    provenance: manifest.Provenance | None = None,
) -> Run:
    """Prepare a training run from its flags.

    Joins the process group (torchrun) or stays single-process, checks the global batch splits over the
    processes, refuses to overwrite a finished run, seeds ``seed + rank``, creates
    ``experiments/models/<tag>/``, starts logging and writes ``args.json`` (rank 0).

    Args:
        args: flags from :func:`core.engine.add_training_args` (needs ``tag``, ``seed``, ``batch_size``,
            ``device``, ``overwrite``, ``resume``, ``deterministic``, ``wandb``).
        stage: stage name used for W&B ``job_type`` and the first log line.
        models_dir: root of run folders (tests pass a temporary folder).
        provenance: what the run records in ``manifest.json``; a resumed run must match the manifest's.

    Raises:
        WSSSError: bad batch size, missing tag, outputs that would be overwritten, or a resume with other
            flags or inputs than the interrupted run.
    """
    paths.check_tag(getattr(args, "tag", None))
    info = distributed.init_distributed(getattr(args, "device", "auto"))
    local_batch = distributed.per_rank_batch(args.batch_size, info.world_size)
    run_dir = paths.run_dir(args.tag, models_dir)
    last_path = paths.checkpoint_path(args.tag, models_dir)
    final_path = paths.final_weights_path(args.tag, models_dir)
    # Every rank sees the same files, so every rank reaches the same verdict (no rank hangs in a barrier).
    resume = checkpoint.check_outputs(final_path, last_path, bool(args.overwrite), bool(args.resume))
    if resume and provenance is not None:
        manifest.check_folder(run_dir, provenance, overwrite=False)

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
    run = Run(args, stage, info, run_dir, last_path, final_path, resume, local_batch, metrics, wandb, provenance)
    run.started = manifest.utc_now()
    if info.is_main and provenance is not None:
        manifest.write_manifest(run_dir, provenance.record(run.started))
    return run


def data_context(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset a stage reads, as its manifest records it (not part of the identity: folders move)."""
    return {name: getattr(args, name, None) for name in ("dataset", "data_dir", "domain")}


def script_name(path: str | os.PathLike) -> str:
    """A script's path relative to the repository (``scripts/cam/inference.py``), as manifests record it."""
    path = Path(path).resolve()
    root = Path(__file__).resolve().parent.parent
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


@contextlib.contextmanager
def training_run(
    args: argparse.Namespace,
    stage: str,
    script: str | os.PathLike,
    inputs: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    models_dir: str | Path = paths.MODELS_DIR,
) -> Iterator[Run]:
    """:func:`setup` a training run, record its manifest, and close it whatever happens.

    The manifest is written when the run starts (``complete: false``) and, when the body returns, again with
    the finished time and the final weights' fingerprint.

    Args:
        args: the parsed flags.
        stage: ``cam``, ``ccam``, ``rw`` or ``seg``.
        script: the calling script's ``__file__``.
        inputs: weights the run starts from (name -> :func:`core.manifest.file_fingerprint`), part of its identity.
        context: recorded only, e.g. the dataset folder and domain.
        models_dir: root of run folders (tests pass a temporary folder).
    """
    flags = checkpoint.plain_args(args)
    provenance = manifest.Provenance(stage, script_name(script), flags, inputs or {}, context or {})
    run = setup(args, stage, models_dir, provenance)
    try:
        yield run
        distributed.barrier()
        if run.is_main:
            outputs = {"weights": manifest.file_fingerprint(run.final_path)} if run.final_path.is_file() else {}
            epochs = {"epochs": int(getattr(args, "max_epoch", 0))}
            record = provenance.record(run.started, epochs, finished=manifest.utc_now(), outputs=outputs)
            manifest.write_manifest(run.run_dir, record)
        distributed.barrier()  # leave together: gloo can abort a rank whose peer tears down mid-connection
    finally:
        run.close()


@dataclass
class StageRun(_OnDevice):
    """A running artifact stage (inference, pseudo masks, evaluation): where it writes and what it did.

    Attributes:
        args: the parsed flags.
        stage: stage name for the log and the manifest.
        dist: rank, world size and device.
        out_dir: the output folder (log.txt, args.json, manifest.json and the per-image files).
        resumed: True when earlier outputs of the same provenance are kept (only missing ids are done).
        counts: what the stage reports in its manifest, e.g. ``{"written": 1464, "skipped": 0}``; the body fills it.
    """

    args: argparse.Namespace
    stage: str
    dist: DistInfo
    out_dir: Path
    resumed: bool
    counts: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def stage_run(
    args: argparse.Namespace,
    stage: str,
    script: str | os.PathLike,
    out_dir: str | os.PathLike,
    inputs: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    ignore: Iterable[str] = (),
    outputs: Iterable[Path] | None = None,
    device: str = "cpu",
    resumable: bool = True,
) -> Iterator[StageRun]:
    """Set up an artifact stage writing into ``out_dir``, and record its manifest.

    Joins the process group (torchrun) or stays single-process, seeds ``--seed + rank`` (0 without the flag),
    checks the folder against the manifest of an earlier run (same provenance: resume; other flags or inputs:
    refuse; ``--overwrite true``: empty its files first), starts logging to ``<out_dir>/log.txt`` and writes
    ``args.json`` and ``manifest.json`` (rank 0). When the body returns, every rank waits and rank 0 marks the
    manifest complete with :attr:`StageRun.counts`.

    Args:
        args: the parsed flags (``--overwrite`` is read when present).
        stage: ``cam``, ``ccam``, ``rw``, ``seg`` or ``eval``.
        script: the calling script's ``__file__``.
        out_dir: the output folder.
        inputs: what decides the content besides the flags (weights files, input folders), see
            :class:`core.manifest.Provenance`.
        context: recorded only (dataset folder, domain, id count).
        ignore: flags that do not decide the content (e.g. the flag naming the output folder).
        outputs: the stage's files already in the folder, checked when it has no manifest (default: none).
        device: ``auto``, ``cpu`` or ``cuda``.
        resumable: False for stages that recompute everything on every run (evaluation): the folder's manifest is
            replaced instead of compared, and its log grows.
    """
    info = distributed.init_distributed(device)
    out_dir = Path(out_dir)
    flags = checkpoint.plain_args(args)
    provenance = manifest.Provenance(
        stage, script_name(script), flags, inputs or {}, context or {}, frozenset(ignore) | {"pred_dir", "output"}
    )
    try:
        overwrite = bool(getattr(args, "overwrite", False))
        resumed = False
        if resumable:
            resumed = manifest.check_folder(out_dir, provenance, overwrite, outputs or (), remove=info.is_main)
        seed_everything(int(getattr(args, "seed", 0) or 0) + info.rank)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            artifacts.remove_stale_temp_files(out_dir)  # leftovers of killed writes
        distributed.barrier()
        runlog.setup_logging(out_dir, info.rank)
        started = manifest.utc_now()
        if info.is_main:
            runlog.save_args(out_dir / "args.json", flags)
            manifest.write_manifest(out_dir, provenance.record(started))
        run = StageRun(args, stage, info, out_dir, resumed)
        yield run
        distributed.barrier()
        if info.is_main:
            manifest.write_manifest(out_dir, provenance.record(started, run.counts, finished=manifest.utc_now()))
        distributed.barrier()  # as in training_run: no rank tears the group down while another still uses it
    finally:
        runlog.close_logging()
        distributed.cleanup()
