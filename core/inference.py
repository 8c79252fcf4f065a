"""Plumbing shared by the per-image stages (CAM inference, pseudo masks, and later RW/segmentation inference).

* :func:`run_over_images` runs a per-image writer over a domain: ids are sharded over torchrun ranks
  (``ids[rank::world]``), finished ids are skipped (resume), images are decoded ahead by DataLoader workers, rank 0
  shows a progress bar, and a CUDA out-of-memory error stops with the image's name (:func:`stop_on_oom`).
  :func:`run_over_image_batches` is the same loop with a writer that takes several images of one size at once.

Every file is written through :mod:`core.artifacts`, i.e. atomically: a file that exists is complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core import artifacts, distributed
from core.errors import WSSSError, first_ids
from core.parallel import chunked, parallel_map

logger = logging.getLogger(__name__)


ItemWriter = Callable[[dict[str, Any]], None]
BatchWriter = Callable[[list[dict[str, Any]]], None]


# --------------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------------


def require_labels(source: Any, purpose: str) -> dict[str, np.ndarray]:
    """Image-level labels of every id, or a WSSSError when some id has none (e.g. VOC ``test``, SPEC §13.1.20).

    Args:
        source: a data source (``ids``, ``labels()``, ``list_path``, ``domain``).
        purpose: what needs them, for the message (e.g. ``"CAM inference"``).

    Returns:
        id -> float32 [C] multi-hot label, in id-list order.
    """
    labels = source.labels()
    unlabeled = [i for i, label in labels.items() if label is None]
    if unlabeled:
        where = source.list_path or source.domain
        raise WSSSError(
            f"{purpose} needs image-level labels, but {len(unlabeled)} of {len(labels)} ids of {where} have none "
            f"(first: {unlabeled[0]}); use a labelled --domain such as train or val"
        )
    return labels  # type: ignore[return-value]


def split_background_only(labels: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """(ids with at least one foreground class, ids whose label is all zero), both in input order."""
    with_fg = [i for i, label in labels.items() if np.any(np.asarray(label) > 0)]
    keep = set(with_fg)
    return with_fg, [i for i in labels if i not in keep]


# --------------------------------------------------------------------------------------------------------------------
# Jobs over a CAM folder
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolSummary:
    """What :func:`run_over_chunks` did on this rank.

    Attributes:
        todo: ids of this rank's shard that had no output yet (all written now).
        skipped: ids of the shard whose output already existed.
        written: the sum of the writer's counts.
        seconds: wall time of the pool.
        workers: processes that had a chunk (at least 1).
    """

    todo: list[str]
    skipped: int
    written: int
    seconds: float
    workers: int


def run_over_chunks(
    fn: Callable[[list[str]], int],
    ids: Sequence[str],
    out_dir: Path,
    suffix: str,
    *,
    dist: Any,
    num_workers: int,
    desc: str,
    log: logging.Logger,
    source_dir: Path,
) -> PoolSummary:
    """Run ``fn`` (writes the files of a chunk of ids, returns how many) over the ids of this rank's shard whose
    ``<out_dir>/<id><suffix>`` does not exist yet, in a process pool; ``log`` (the stage's logger) first announces
    ``"<desc> of N ids (M done before) from <source_dir> -> <out_dir>"``. ``dist``: the run's ``rank`` and
    ``world_size``."""
    mine = distributed.shard(list(ids), dist.rank, dist.world_size)
    todo = artifacts.pending_ids(mine, out_dir, suffix)
    log.info("%s of %d ids (%d done before) from %s -> %s", desc, len(todo), len(mine) - len(todo), source_dir, out_dir)
    start = time.perf_counter()
    chunks = chunked(todo, max(1, num_workers) * 8) if todo else []  # about eight chunks a worker
    written = sum(parallel_map(fn, chunks, num_workers, desc=desc))
    workers = max(1, min(num_workers, len(chunks)))
    return PoolSummary(todo, len(mine) - len(todo), written, time.perf_counter() - start, workers)


@dataclass(frozen=True)
class CamFolderJob:
    """What every stage that turns a CAM folder into per-image files sends once to each worker process.

    Attributes:
        source: data source (``read_image``, ``image_size``, ...).
        cam_dir: folder of ``<id>.npz`` (or legacy ``<id>.npy``) CAM files.
        out_dir: folder of the per-image outputs.
        allow_pickle: read legacy pickled ``.npy`` CAM files.
        background_only: ids whose image-level label has no foreground class; they need no CAM file.
    """

    source: Any
    cam_dir: Path
    out_dir: Path
    allow_pickle: bool = False
    background_only: frozenset[str] = frozenset()

    def cam_file(self, image_id: str) -> Path | None:
        """The CAM file of ``image_id`` (``.npz`` preferred, legacy ``.npy`` accepted), or None."""
        return artifacts.find_cam_file(self.cam_dir, image_id)

    def missing_cam_files(self, ids: Sequence[str]) -> list[str]:
        """Ids that have neither a CAM file nor a background-only label."""
        return [i for i in ids if i not in self.background_only and self.cam_file(i) is None]

    def describe_missing(self, missing: Sequence[str], total: int) -> str:
        """``"3 of 24 CAM files missing in DIR (first: a, b, c, ...)"``."""
        return f"{len(missing)} of {total} CAM files missing in {self.cam_dir} (first: {first_ids(missing)})"


# --------------------------------------------------------------------------------------------------------------------
# The per-image loop
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopSummary:
    """What :func:`run_over_images` did, summed over ranks.

    Attributes:
        written: ids processed (files written) in this run.
        skipped: ids whose output already existed.
        seconds: wall time of the loop (data loading included), averaged over ranks.
    """

    written: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


class _ImageItems(Dataset):
    """Decoded images of some ids; a user-fixable read error travels back as an item instead of a worker traceback."""

    def __init__(self, source: Any, ids: Sequence[str]) -> None:
        self.source = source
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        try:
            return {"id": image_id, "image": self.source.read_image(image_id), "label": self.source.label(image_id)}
        except WSSSError as e:
            return {"id": image_id, "error": str(e)}


def _keep_item(item: dict[str, Any]) -> dict[str, Any]:
    # batch_size=None would otherwise convert the numpy image to a tensor.
    return item


def build_image_loader(source: Any, ids: Sequence[str], num_workers: int) -> DataLoader:
    """Loader yielding ``{"id", "image" uint8 [H, W, 3], "label" float32 [C] | None}`` (or ``{"id", "error"}``)."""
    workers = max(0, int(num_workers))
    return DataLoader(
        _ImageItems(source, ids),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_keep_item,
        prefetch_factor=2 if workers else None,
    )


def run_over_images(
    source: Any,
    ids: Sequence[str],
    fn: ItemWriter,
    out_dir: str | Path,
    suffix: str,
    *,
    num_workers: int = 0,
    desc: str = "images",
    progress: bool | None = None,
) -> LoopSummary:
    """Call ``fn`` on every id of this rank's shard whose ``<out_dir>/<id><suffix>`` does not exist yet.

    Args:
        source: data source that reads the images (``read_image``, ``label``).
        ids: all ids of the run (every rank passes the same list; each takes ``ids[rank::world_size]``).
        fn: writes the output of one item ``{"id", "image" uint8 [H, W, 3], "label" float32 [C] | None}``
            through an atomic writer of :mod:`core.artifacts`; it must create ``<out_dir>/<id><suffix>``.
        out_dir: output folder (created).
        suffix: extension of the file that marks an id as done, e.g. ``.npz``.
        num_workers: DataLoader processes decoding images ahead (0 = in this process).
        desc: progress-bar label.
        progress: show the bar on rank 0 (default: when stderr is a terminal).

    Returns:
        :class:`LoopSummary` summed over ranks (all ranks wait for each other at the end).

    Raises:
        WSSSError: an image cannot be read; outputs written before it are kept.
    """
    return run_over_image_batches(
        source, ids, lambda items: fn(items[0]), out_dir, suffix, num_workers=num_workers, desc=desc, progress=progress
    )


def image_shape(item: dict[str, Any]) -> tuple[int, ...]:
    """The default grouping key of :func:`run_over_image_batches`: the decoded image's shape."""
    return item["image"].shape


def run_over_image_batches(
    source: Any,
    ids: Sequence[str],
    fn: BatchWriter,
    out_dir: str | Path,
    suffix: str,
    *,
    batch_size: int = 1,
    group_key: Callable[[dict[str, Any]], Hashable] = image_shape,
    num_workers: int = 0,
    desc: str = "images",
    progress: bool | None = None,
) -> LoopSummary:
    """:func:`run_over_images` with ``fn`` taking a list of up to ``batch_size`` items of one ``group_key``.

    Decoded images wait in one group per key (the image shape by default, so that they can share a forward pass);
    a full group goes to ``fn`` at once, and when more than four batches' worth wait, the fullest group goes as it
    is. An unreadable image first sends every waiting group, so that all images read before it are written.

    Args:
        fn: writes the output of every item of the list (each ``{"id", "image", "label"}``), each through an atomic
            writer; it must create ``<out_dir>/<id><suffix>`` for every item.
        batch_size: most items per call (1: one call per image, in id order).
        group_key: items with equal keys may share a call.
        source, ids, out_dir, suffix, num_workers, desc, progress: as :func:`run_over_images`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    # Shard before looking at the files: every rank then agrees on who owns which id, whatever has been written.
    mine = distributed.shard(list(ids), rank, world_size)
    todo = artifacts.pending_ids(mine, out_dir, suffix)
    logger.info(
        "%s: %d of %d ids to do on rank %d (%d already done)", desc, len(todo), len(mine), rank, len(mine) - len(todo)
    )
    hide = True if rank != 0 else (None if progress is None else not progress)  # None: tqdm decides (a tty)
    start = time.perf_counter()
    written = 0
    loader = build_image_loader(source, todo, num_workers)
    with tqdm(total=len(todo), desc=desc, disable=hide, leave=False) as bar:
        for group in group_items(loader, batch_size, group_key):
            if "error" in group[0]:
                raise WSSSError(group[0]["error"])
            fn(group)
            for item in group:
                if not (path := out_dir / f"{item['id']}{suffix}").is_file():
                    raise RuntimeError(f"{desc}: the writer returned without creating {path}")
            written += len(group)
            bar.update(len(group))
    seconds = time.perf_counter() - start
    return gather_summary(written, len(mine) - len(todo), seconds)


def group_items(
    items: Iterable[dict[str, Any]], batch_size: int, key: Callable[[dict[str, Any]], Hashable]
) -> Iterator[list[dict[str, Any]]]:
    """Lists of up to ``batch_size`` items with equal ``key``, as :func:`run_over_image_batches` describes; an item
    with an ``"error"`` comes alone, after every waiting group."""
    waiting: dict[Hashable, list[dict[str, Any]]] = {}
    most_waiting = 4 * batch_size
    for item in items:
        if "error" in item:
            yield from waiting.values()
            waiting.clear()
            yield [item]
            continue
        item_key = key(item)
        group = waiting.setdefault(item_key, [])
        group.append(item)
        if len(group) == batch_size:
            yield waiting.pop(item_key)
        elif sum(map(len, waiting.values())) > most_waiting:
            yield waiting.pop(max(waiting, key=lambda k: len(waiting[k])))
    yield from waiting.values()


def gather_summary(written: int, skipped: int, seconds: float) -> LoopSummary:
    """This rank's counts summed over ranks, its seconds averaged (every rank must call it)."""
    if not distributed.is_distributed():
        return LoopSummary(written, skipped, seconds)
    counts = distributed.all_reduce_sum_(torch.tensor([written, skipped], dtype=torch.float64))
    mean_seconds = distributed.all_reduce_mean({"seconds": seconds})["seconds"]
    return LoopSummary(int(counts[0]), int(counts[1]), mean_seconds)


@contextmanager
def stop_on_oom(image_ids: str | Sequence[str], size: tuple[int, int], hint: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into a WSSSError naming the image (no silent skipping, SPEC §13.2.16).

    Args:
        image_ids: the image being processed, or the images of a batch (all of one size).
        size: their (H, W).
        hint: what to change, e.g. ``"--resize 512 or fewer --scales"``; a batch of several images adds
            ``--batch_size 1``.
    """
    ids = [image_ids] if isinstance(image_ids, str) else list(image_ids)
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        what = f"image {ids[0]}" if len(ids) == 1 else f"a batch of {len(ids)} images (first: {first_ids(ids)})"
        fix = hint if len(ids) == 1 else f"--batch_size 1, or {hint}"
        raise WSSSError(
            f"CUDA out of memory on {what} ({size[0]}x{size[1]}); files written so far are kept: "
            f"rerun the same command with {fix}"
        ) from e
