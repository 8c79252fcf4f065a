"""AffinityNet's training data: images with their affinity labels (``scripts/rw/make_affinity_labels.py``), and the
checks of a label folder.

An affinity label is a uint8 PNG at the image's size: 0 = confident background, 1..C = confident class, 255 =
uncertain. Image and label go through the joint training transform (random long side, flip, crop; the crop pads the
label with 255), then the label is reduced to the stride-4 grid of the edge map by nearest neighbour (IRN), or to
the stride-8 grid of PSA's features.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core import manifest
from core.datasets.base import DataSource, decode_mask_file
from core.datasets.transforms import resize_mask
from core.errors import WSSSError, first_ids
from core.rw.network import EDGE_STRIDE

logger = logging.getLogger(__name__)

LABEL_SUFFIX = ".png"


def label_path(label_dir: Path, image_id: str) -> Path:
    return label_dir / f"{image_id}{LABEL_SUFFIX}"


def labelled_ids(source: DataSource, label_dir: Path) -> list[str]:
    """The ids of ``source`` to train on, after checking ``label_dir`` (one line per problem).

    Every id needs a label PNG except those whose image-level label is known to hold no class (affinity labels are
    made from CAMs, which such images do not have): these are used when their PNG exists and left out otherwise.
    Each PNG must have its image's size (read from the file headers; the values are checked when read).

    Raises:
        WSSSError: folder missing or empty, PNGs missing (how many, the first ids, the domain the folder was made
            for when that differs), or PNGs of another size than their images (the first few named).
    """
    if not label_dir.is_dir():
        raise WSSSError(
            f"--label_dir {label_dir} does not exist; run scripts/rw/make_affinity_labels.py --domain {source.domain} "
            "first and pass its output folder"
        )
    present = {p.name[: -len(LABEL_SUFFIX)] for p in label_dir.glob(f"*{LABEL_SUFFIX}")}
    background_only = {i for i, label in source.labels().items() if label is not None and not np.any(label > 0)}
    missing = [i for i in source.ids if i not in present and i not in background_only]
    if missing:
        recorded = ((manifest.read_manifest(label_dir) or {}).get("context") or {}).get("domain")
        other = f"; the folder was made for --domain {recorded}" if recorded and recorded != source.domain else ""
        raise WSSSError(
            f"{len(missing)} of {len(source.ids)} affinity labels of --domain {source.domain} missing in {label_dir} "
            f"(first: {first_ids(missing)}){other}; run scripts/rw/make_affinity_labels.py --domain {source.domain} "
            "for them"
        )
    ids = [i for i in source.ids if i in present]
    if len(ids) < len(source.ids):
        logger.info("%d background-only images without affinity labels are left out", len(source.ids) - len(ids))
    if not ids:
        raise WSSSError(f"--label_dir {label_dir} holds no affinity label of --domain {source.domain}")
    wrong = [i for i in ids if _png_size(label_path(label_dir, i)) != source.image_size(i)]
    if wrong:
        first = wrong[0]
        height, width = _png_size(label_path(label_dir, first))
        image_h, image_w = source.image_size(first)
        raise WSSSError(
            f"{len(wrong)} affinity labels in {label_dir} do not have their image's size (first: "
            f"{label_path(label_dir, first)} is {width}x{height}, its image {image_w}x{image_h}; all: "
            f"{first_ids(wrong)}); remake them with scripts/rw/make_affinity_labels.py for this dataset"
        )
    return ids


def _png_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError as e:
        raise WSSSError(f"cannot read affinity label {path} (corrupt or not a PNG); remake or remove it") from e
    return height, width


def reduce_labels(labels: np.ndarray, stride: int = EDGE_STRIDE) -> np.ndarray:
    """Nearest-neighbour reduction of a label map to the edge map's grid: uint8 [H, W] -> [ceil(H/s), ceil(W/s)]."""
    height, width = labels.shape
    return resize_mask(labels, math.ceil(height / stride), math.ceil(width / stride))


class AffinityLabelSet(Dataset):
    """Training images with their affinity labels.

    Item: ``id``, ``image`` float32 [3, S, S] and ``labels`` int64 [ceil(S/s), ceil(S/s)] (0, 1..C, 255), ``s`` =
    ``stride`` (4 for IRN's edge map, 8 for PSA's features).

    Args:
        source: the images (and the class count the label values are checked against: 0..C, 255).
        ids: the ids to use (see :func:`labelled_ids`).
        label_dir: the folder of ``<id>.png`` affinity labels.
        transform: joint transform ``(image, uint8 mask) -> (float32 [3, S, S], int64 [S, S])``.
    """

    def __init__(
        self, source: DataSource, ids: Sequence[str], label_dir: Path, transform: Any, stride: int = EDGE_STRIDE
    ) -> None:
        self.source, self.ids, self.label_dir, self.transform = source, list(ids), Path(label_dir), transform
        self.stride = stride

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        labels = decode_mask_file(label_path(self.label_dir, image_id), self.source.palette, self.source.num_classes)
        image, labels = self.transform(self.source.read_image(image_id), labels)
        reduced = reduce_labels(labels.astype(np.uint8), self.stride).astype(np.int64)
        return {"id": image_id, "image": torch.from_numpy(image), "labels": torch.from_numpy(reduced)}
