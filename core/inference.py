"""Plumbing shared by the per-image stages (CAM inference, pseudo masks, and later RW/segmentation inference).

* :func:`predictions_dir` names an output folder ``experiments/predictions/<tag>@<domain>@scale=<scales>/`` with the
  FULL domain name (the reference folded every domain into ``train``/``val``, SPEC §13.2.12).
* :func:`run_over_images` runs a per-image writer over a domain: ids are sharded over torchrun ranks
  (``ids[rank::world]``), finished ids are skipped (resume), images are decoded ahead by DataLoader workers, rank 0
  shows a progress bar, and a CUDA out-of-memory error stops with the image's name (:func:`stop_on_oom`).
* :func:`pseudo_mask` and :class:`PseudoMaskJob` turn CAM files into label-map PNGs (threshold or saliency
  background, optional uncertain band, optional label CRF).

Every file is written through :mod:`core.artifacts`, i.e. atomically: a file that exists is complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core import artifacts, distributed
from core.crf import crf_inference_labels
from core.errors import WSSSError

logger = logging.getLogger(__name__)

PREDICTIONS_DIR = Path("experiments") / "predictions"
IGNORE_INDEX = 255
_SHOWN_IDS = 3

ItemWriter = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------------


def format_scales(scales: Sequence[float]) -> str:
    """``[0.5, 1, 1.5, 2]`` -> ``"0.5,1.0,1.5,2.0"`` (the spelling of the reference's folder names)."""
    return ",".join(str(float(s)) for s in scales)


def domain_name(domain: str) -> str:
    """The domain as it appears in folder names: the list's stem when ``--domain`` is a ``.txt`` path."""
    return Path(domain).stem if domain.endswith(".txt") else domain


def predictions_dir(tag: str, domain: str, scales: Sequence[float], root: str | Path = PREDICTIONS_DIR) -> Path:
    """``<root>/<tag>@<domain>@scale=<scales>/``, e.g. ``experiments/predictions/pnoc@train_aug@scale=0.5,1.0``.

    The full domain name is used, so ``train`` and ``train_aug`` (or ``val`` and ``test``) never share a folder.
    """
    if not tag or tag.startswith("/") or ".." in Path(tag).parts:
        raise WSSSError(f"--tag {tag!r} must be a relative name such as pnoc/voc12-rs269 (no leading '/', no '..')")
    return Path(root) / f"{tag}@{domain_name(domain)}@scale={format_scales(scales)}"


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


def foreground_keys(label: np.ndarray) -> np.ndarray:
    """Label-map keys (1..C) of the classes present in a multi-hot label float [C]: int64 [n]."""
    return np.flatnonzero(np.asarray(label) > 0).astype(np.int64) + 1


def split_background_only(labels: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """(ids with at least one foreground class, ids whose label is all zero), both in input order."""
    with_fg = [i for i, label in labels.items() if np.any(np.asarray(label) > 0)]
    keep = set(with_fg)
    return with_fg, [i for i in labels if i not in keep]


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
    for item in tqdm(loader, total=len(todo), desc=desc, disable=hide, leave=False):
        if "error" in item:
            raise WSSSError(item["error"])
        fn(item)
        if not (out_dir / f"{item['id']}{suffix}").is_file():
            raise RuntimeError(f"{desc}: the writer returned without creating {out_dir / (item['id'] + suffix)}")
        written += 1
    seconds = time.perf_counter() - start
    return _gather_summary(written, len(mine) - len(todo), seconds)


def _gather_summary(written: int, skipped: int, seconds: float) -> LoopSummary:
    if not distributed.is_distributed():
        return LoopSummary(written, skipped, seconds)
    counts = distributed.all_reduce_sum_(torch.tensor([written, skipped], dtype=torch.float64))
    mean_seconds = distributed.all_reduce_mean({"seconds": seconds})["seconds"]
    return LoopSummary(int(counts[0]), int(counts[1]), mean_seconds)


@contextmanager
def stop_on_oom(image_id: str, size: tuple[int, int], hint: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into a WSSSError naming the image (no silent skipping, SPEC §13.2.16).

    Args:
        image_id: the image being processed.
        size: its (H, W).
        hint: what to change, e.g. ``"--resize 512 or fewer --scales"``.
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        raise WSSSError(
            f"CUDA out of memory on image {image_id} ({size[0]}x{size[1]}); files written so far are kept: "
            f"rerun the same command with {hint}"
        ) from e


# --------------------------------------------------------------------------------------------------------------------
# Pseudo masks from CAM files
# --------------------------------------------------------------------------------------------------------------------


def compact_labels(hr_cam: np.ndarray, background: float | np.ndarray) -> np.ndarray:
    """0 where no plane beats ``background`` (ties go to the background), else 1 + the arg-max plane.

    The evaluator's decision rule (``core.evaluation``), with a constant or per-pixel background.

    Args:
        hr_cam: float [n, H, W] (n >= 0).
        background: a constant threshold or float [H, W] (e.g. ``1 - saliency``).

    Returns:
        int64 [H, W] in 0..n.
    """
    hr_cam = np.asarray(hr_cam, dtype=np.float32)
    if hr_cam.shape[0] == 0:
        return np.zeros(hr_cam.shape[1:], dtype=np.int64)
    winner = hr_cam.argmax(axis=0) + 1
    return np.where(hr_cam.max(axis=0) > np.asarray(background, dtype=np.float32), winner, 0).astype(np.int64)


def _labels_after_crf(
    hr_cam: np.ndarray,
    keys: np.ndarray,
    background: float | np.ndarray,
    image: np.ndarray | None,
    crf_t: int,
    crf_gt_prob: float,
) -> np.ndarray:
    """Label map int64 [H, W] (ids 0..C) for one background score, label-CRF-refined when ``crf_t > 0``."""
    compact = compact_labels(hr_cam, background)  # 0 = background, i = plane i - 1
    if crf_t > 0:
        if image is None:
            raise ValueError("the label CRF needs the image")
        compact = crf_inference_labels(image, compact, max(len(keys) + 1, 2), t=crf_t, gt_prob=crf_gt_prob)
        compact = np.minimum(compact, len(keys))
    lookup = np.concatenate([[0], np.asarray(keys, dtype=np.int64)])
    return lookup[compact]


def pseudo_mask(
    hr_cam: np.ndarray,
    keys: np.ndarray,
    background: float | np.ndarray,
    *,
    bg_threshold: float | None = None,
    image: np.ndarray | None = None,
    crf_t: int = 0,
    crf_gt_prob: float = 0.7,
) -> np.ndarray:
    """Pseudo label map from CAMs, as the evaluator decodes them (ties go to the background).

    Without a band: ``argmax([background, cams...])`` mapped to keys, optionally label-CRF refined over
    ``max(n + 1, 2)`` labels (the evaluator's ``--crf_t``). With ``bg_threshold`` (IRN's two-threshold scheme):
    the foreground map at ``background`` and the background map at ``bg_threshold`` are decoded (and CRF'd)
    separately; a pixel is its class where the first is foreground, 0 where the second is background, else 255.

    Args:
        hr_cam: float [n, H, W] in [0, 1], planes of ``keys``.
        keys: int [n], label-map ids 1..C of the planes.
        background: constant background score (threshold) or float [H, W] (e.g. ``1 - saliency``).
        bg_threshold: lower threshold of the uncertain band (<= ``background``); None = no band.
        image: uint8 [H, W, 3] RGB, needed when ``crf_t > 0``.
        crf_t: label-CRF iterations (0 = off).
        crf_gt_prob: label-CRF confidence in (0, 1).

    Returns:
        uint8 [H, W] with values in {0} U keys U {255}.
    """
    keys = np.asarray(keys, dtype=np.int64)
    labels = _labels_after_crf(hr_cam, keys, background, image, crf_t, crf_gt_prob)
    if bg_threshold is not None:
        if np.ndim(background) or bg_threshold > float(background):
            raise ValueError(f"bg_threshold {bg_threshold} needs a constant background threshold >= it")
        low = _labels_after_crf(hr_cam, keys, bg_threshold, image, crf_t, crf_gt_prob)
        labels = np.where(labels == 0, IGNORE_INDEX, labels)
        labels = np.where(low == 0, 0, labels)
    return labels.astype(np.uint8)


@dataclass(frozen=True)
class PseudoMaskJob:
    """Settings of a pseudo-mask run, sent once to each worker process.

    Attributes:
        source: data source (``read_image``, ``image_path``, ``palette``, ``num_classes``).
        cam_dir: folder of ``<id>.npz`` (or legacy ``<id>.npy``) CAM files.
        out_dir: folder of the ``<id>.png`` label maps.
        threshold: background score (foreground threshold of the band).
        bg_threshold: lower threshold of the uncertain band, or None.
        sal_dir: folder of saliency PNGs (background = 1 - saliency), or None.
        crf_t, crf_gt_prob: label CRF.
        allow_pickle: read legacy pickled ``.npy`` CAM files.
        background_only: ids without any foreground class; they get an all-zero mask without a CAM file.
    """

    source: Any
    cam_dir: Path
    out_dir: Path
    threshold: float = 0.25
    bg_threshold: float | None = None
    sal_dir: Path | None = None
    crf_t: int = 0
    crf_gt_prob: float = 0.7
    allow_pickle: bool = False
    background_only: frozenset[str] = frozenset()

    def cam_file(self, image_id: str) -> Path | None:
        """The CAM file of ``image_id`` (``.npz`` preferred, legacy ``.npy`` accepted), or None."""
        for suffix in (artifacts.CAM_SUFFIX, artifacts.LEGACY_CAM_SUFFIX):
            path = self.cam_dir / f"{image_id}{suffix}"
            if path.is_file():
                return path
        return None

    def label_map(self, image_id: str) -> np.ndarray:
        """The pseudo mask of one id: uint8 [H, W], values in {0..C, 255}."""
        path = self.cam_file(image_id)
        if path is None:
            if image_id not in self.background_only:
                raise WSSSError(f"CAM file {self.cam_dir / image_id}.npz not found; run scripts/cam/inference.py first")
            height, width = self.source.read_image(image_id).shape[:2]
            return np.zeros((height, width), dtype=np.uint8)
        cams = artifacts.load_cam(path, allow_pickle=self.allow_pickle, with_cam=False)
        if cams.keys.size and cams.keys.max() > self.source.num_classes:
            raise WSSSError(
                f"{path} has class keys {cams.keys.tolist()} beyond the {self.source.num_classes} classes "
                "of --dataset; check --dataset and --pred_dir"
            )
        background: float | np.ndarray = self.threshold
        if self.sal_dir is not None:
            saliency = artifacts.load_saliency(self.sal_dir / f"{image_id}{artifacts.PNG_SUFFIX}")
            if saliency.shape != cams.size:
                raise WSSSError(
                    f"saliency map of {image_id} in {self.sal_dir} is {saliency.shape} but its CAMs are "
                    f"{cams.size}; the folders belong to different images"
                )
            background = 1.0 - saliency
        image = self.source.read_image(image_id) if self.crf_t > 0 else None
        if image is not None and image.shape[:2] != cams.size:
            raise WSSSError(
                f"{path} is {cams.size[0]}x{cams.size[1]} but image {image_id} is {image.shape[0]}x{image.shape[1]}; "
                "the CAMs belong to other images (check --dataset, --domain and --pred_dir)"
            )
        return pseudo_mask(
            cams.hr_cam,
            cams.keys,
            background,
            bg_threshold=self.bg_threshold,
            image=image,
            crf_t=self.crf_t,
            crf_gt_prob=self.crf_gt_prob,
        )


def write_pseudo_masks(job: PseudoMaskJob, ids: Sequence[str]) -> int:
    """Write ``<out_dir>/<id>.png`` (palette PNG, atomic) for each id; returns how many were written."""
    for image_id in ids:
        artifacts.save_label_map(
            job.out_dir / f"{image_id}{artifacts.PNG_SUFFIX}", job.label_map(image_id), palette=job.source.palette
        )
    return len(ids)


def missing_cam_files(job: PseudoMaskJob, ids: Sequence[str]) -> list[str]:
    """Ids that have neither a CAM file nor a background-only label (they cannot get a mask)."""
    return [i for i in ids if i not in job.background_only and job.cam_file(i) is None]


def describe_missing(missing: Sequence[str], total: int, folder: Path) -> str:
    """``"3 of 24 CAM files missing in DIR (first: a, b, c, ...)"``."""
    shown = ", ".join(missing[:_SHOWN_IDS]) + (", ..." if len(missing) > _SHOWN_IDS else "")
    return f"{len(missing)} of {total} CAM files missing in {folder} (first: {shown})"
