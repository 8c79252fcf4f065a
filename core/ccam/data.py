"""Data of the saliency stage: the CAM-hint training set of C²AM-H, plain image sets, and the checks of a CAM folder.

A hint is the class-agnostic foreground evidence of a CAM file: the max over the image's CAM planes of ``hr_cam``
(float [H, W] in [0, 1]; an image without planes has an all-zero hint). It travels through the joint image+mask
transform quantised to uint8 (0..254, so that the transform's 255 padding reads as "no hint").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from core import artifacts, manifest
from core.datasets.base import DataSource
from core.errors import WSSSError, first_ids

logger = logging.getLogger(__name__)

HINT_LEVELS = 254  # uint8 hint value of 1.0; 255 marks padding
Transform = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]


def cam_file(cams_dir: Path, image_id: str, allow_pickle: bool = False) -> Path | None:
    """The CAM file of ``image_id`` in ``cams_dir`` (``.npz``; legacy ``.npy`` with ``allow_pickle``), or None."""
    suffixes = (artifacts.CAM_SUFFIX, artifacts.LEGACY_CAM_SUFFIX) if allow_pickle else (artifacts.CAM_SUFFIX,)
    return next((p for s in suffixes if (p := cams_dir / f"{image_id}{s}").is_file()), None)


def resolve_cams_dir(cams_dir: str | None, domain: str) -> Path:
    """``--cams_dir`` as given, or the one CAM inference folder ``<cams_dir>@<domain>@...`` beside it (the P-NOC
    README passes ``experiments/predictions/<tag>``); WSSSError when neither exists."""
    if not cams_dir:
        raise WSSSError("--cams_dir is required: a folder of CAM files made by scripts/cam/inference.py")
    folder = Path(cams_dir)
    if folder.is_dir():
        return folder
    candidates = sorted(p for p in folder.parent.glob(f"{folder.name}@{domain}@*") if p.is_dir())
    if len(candidates) == 1:
        logger.info("--cams_dir %s: using the CAM inference folder %s", folder, candidates[0])
        return candidates[0]
    raise WSSSError(
        f"--cams_dir {folder} does not exist; run scripts/cam/inference.py --domain {domain} first and pass its "
        "output folder (experiments/predictions/<tag>@<domain>@scale=...)"
    )


def hinted_ids(source: DataSource) -> tuple[list[str], list[str]]:
    """(ids that need a CAM file, background-only ids): CAM inference writes no file for an image whose label has
    no foreground class, so those are left out of hint training; ids without labels all need a file."""
    labels = source.labels()
    background_only = [i for i, label in labels.items() if label is not None and not np.any(label > 0)]
    skip = set(background_only)
    return [i for i in source.ids if i not in skip], background_only


def check_cams_dir(cams_dir: Path, source: DataSource, ids: Sequence[str], allow_pickle: bool = False) -> None:
    """Refuse, in one line, a CAM folder that cannot give every id a hint: empty, incomplete for the domain (how
    many missing, the first few), made for another domain, or with maps of another image size (checked on the
    first id; every file is checked again when read).
    """
    if not any(cams_dir.glob(f"*{artifacts.CAM_SUFFIX}")) and not (
        allow_pickle and any(cams_dir.glob(f"*{artifacts.LEGACY_CAM_SUFFIX}"))
    ):
        legacy = (
            ""
            if allow_pickle or not any(cams_dir.glob("*.npy"))
            else " (it has legacy .npy files: pass --allow_pickle true)"
        )
        raise WSSSError(
            f"--cams_dir {cams_dir} holds no CAM files{legacy}; run scripts/cam/inference.py --domain {source.domain} "
            "into it first"
        )
    missing = [i for i in ids if cam_file(cams_dir, i, allow_pickle) is None]
    if missing:
        recorded = (manifest.read_manifest(cams_dir) or {}).get("context", {}).get("domain")
        other = f"; the folder was made for --domain {recorded}" if recorded and recorded != source.domain else ""
        raise WSSSError(
            f"{len(missing)} of {len(ids)} CAM files of --domain {source.domain} missing in {cams_dir} "
            f"(first: {first_ids(missing)}){other}; run scripts/cam/inference.py --domain {source.domain} for them"
        )
    if ids:
        load_hint(cams_dir, source, ids[0], allow_pickle)


def load_hint(cams_dir: Path, source: DataSource, image_id: str, allow_pickle: bool = False) -> np.ndarray:
    """The hint of one id: float32 [H, W] in [0, 1] (max over its CAM planes), checked against the image size."""
    path = cam_file(cams_dir, image_id, allow_pickle)
    if path is None:
        raise WSSSError(f"CAM file {cams_dir / image_id}{artifacts.CAM_SUFFIX} not found; run CAM inference first")
    size = source.image_size(image_id)
    cams = artifacts.load_cam(
        path, allow_pickle=allow_pickle, with_cam=False, size=size, size_of=f"image {source.image_path(image_id)}"
    )
    if cams.hr_cam.shape[0] == 0:
        return np.zeros(size, np.float32)
    return cams.hr_cam.max(axis=0)


class HintDataset(Dataset):
    """Training images with their CAM hints.

    Item: ``id``, ``image`` float32 [3, S, S] and ``hint`` float32 [1, S, S] in [0, 1] (0 where the crop padded).

    Args:
        source: the training id list.
        ids: the ids to use (every one has a CAM file, see :func:`check_cams_dir`).
        cams_dir: the CAM folder.
        transform: joint transform ``(image, uint8 mask) -> (float32 [3, S, S], int64 [S, S])``.
    """

    def __init__(
        self, source: DataSource, ids: Sequence[str], cams_dir: Path, transform: Transform, allow_pickle: bool = False
    ) -> None:
        self.source, self.ids, self.cams_dir, self.transform = source, list(ids), cams_dir, transform
        self.allow_pickle = allow_pickle

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        hint = load_hint(self.cams_dir, self.source, image_id, self.allow_pickle)
        image = self.source.read_image(image_id)
        quantised = np.rint(hint * HINT_LEVELS).astype(np.uint8)
        image, mask = self.transform(image, quantised)
        hint = np.where(mask == 255, 0.0, mask / HINT_LEVELS).astype(np.float32)
        return {"id": image_id, "image": torch.from_numpy(image), "hint": torch.from_numpy(hint[None])}


class ImageSet(Dataset):
    """Transformed images of some ids without labels: item ``id``, ``image`` float32 [3, S, S] (unsupervised C²AM
    training, the polarity check)."""

    def __init__(self, source: DataSource, ids: Sequence[str], transform: Transform) -> None:
        self.source, self.ids, self.transform = source, list(ids), transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, _ = self.transform(self.source.read_image(self.ids[index]), None)
        return {"id": self.ids[index], "image": torch.from_numpy(image)}


def foreground_masks(masks: torch.Tensor) -> torch.Tensor:
    """Class masks int [B, H, W] (0 bg, 1..C, 255 ignore) -> saliency GT uint8 [B, H, W]: 0 bg, 1 fg, 255 ignore."""
    fg = ((masks > 0) & (masks != 255)).to(torch.uint8)
    return torch.where(masks == 255, torch.full_like(fg, 255), fg)
