"""torch ``Dataset`` wrappers over a :class:`~core.datasets.base.DataSource`.

Items are dicts so that collation keeps names: ``batch["image"]``, ``batch["label"]``, ``batch["id"]``.

* :class:`ClassificationDataset` -- ``id``, ``image`` float32 [3, h, w], ``label`` float32 [C]. Ids whose label
  has no foreground class are removed up front (the reference substituted the next sample, which duplicated
  images and failed on the last id).
* :class:`SegmentationDataset` -- adds ``mask`` int64 [h, w] (255 = ignore).
* :class:`ImageDataset` -- untransformed ``image`` uint8 [H, W, 3] and ``label`` (numpy or None) for inference
  scripts, used with ``batch_size=None``.

``skip_corrupt=True`` (off by default) makes the training datasets log a warning naming an unreadable image
and return the next readable sample instead of raising; the default stops with the file's name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from core.datasets.base import DataSource, label_from_mask
from core.datasets.transforms import normalize, to_chw
from core.errors import WSSSError

logger = logging.getLogger(__name__)

Transform = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]


def _plain_transform(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    # No transform given: normalise only (sizes vary, so use it with batch size 1).
    return to_chw(normalize(image)), None if mask is None else mask.astype(np.int64)


class _SourceDataset(Dataset):
    """Shared id bookkeeping and the corrupt-image policy."""

    def __init__(self, source: DataSource, ids: Sequence[str], transform: Transform | None, skip_corrupt: bool) -> None:
        self.source = source
        self.ids = list(ids)
        self.transform = transform if transform is not None else _plain_transform
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.skip_corrupt:
            return self.load(self.ids[index])
        for attempt in range(len(self.ids)):
            image_id = self.ids[(index + attempt) % len(self.ids)]
            try:
                return self.load(image_id)
            except WSSSError as e:
                logger.warning("skipping %s: %s", image_id, e)
        raise WSSSError(f"no readable image in {self.source.list_path or self.source.domain}; check the image files")

    def load(self, image_id: str) -> dict[str, Any]:
        raise NotImplementedError


class ClassificationDataset(_SourceDataset):
    """Images and multi-hot labels for training the CAM classifiers.

    Args:
        source: the id list to read.
        transform: ``(image, mask) -> (float32 [3, h, w], mask)``, e.g. ``build_classification_transform(...)``.
        skip_background_only: drop ids whose label is all zero (logged once).
        skip_corrupt: see the module docstring.

    Raises:
        WSSSError: when an id has no image-level label (e.g. VOC test, or a custom id without label/mask).
    """

    def __init__(
        self,
        source: DataSource,
        transform: Transform | None,
        skip_background_only: bool = True,
        skip_corrupt: bool = False,
    ) -> None:
        labels = source.labels()
        unlabeled = [i for i, label in labels.items() if label is None]
        if unlabeled:
            raise WSSSError(
                f"{len(unlabeled)} of {len(labels)} ids of {source.list_path or source.domain} have no image-level "
                f"label (first: {unlabeled[0]}); add its annotation or mask, or use a labelled --domain"
            )
        ids = list(source.ids)
        if skip_background_only:
            ids = [i for i in source.ids if labels[i].any()]
            if len(ids) < len(source.ids):
                logger.info(
                    "kept %d of %d images; %d have no foreground class and are left out of classification training",
                    len(ids),
                    len(source.ids),
                    len(source.ids) - len(ids),
                )
            if not ids:
                raise WSSSError(
                    f"no id of {source.list_path or source.domain} has a foreground class; check the labels"
                )
        super().__init__(source, ids, transform, skip_corrupt)
        self.labels = {i: labels[i] for i in ids}

    def load(self, image_id: str) -> dict[str, Any]:
        image, _ = self.transform(self.source.read_image(image_id), None)
        return {
            "id": image_id,
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(self.labels[image_id].copy()),
        }


class SegmentationDataset(_SourceDataset):
    """Images with their masks (ground truth or pseudo labels via the source's ``masks_dir``).

    Args:
        source: the id list to read; every id needs a mask.
        transform: joint transform, e.g. ``build_segmentation_transform(...)`` or ``build_validation_transform(...)``.
        skip_corrupt: see the module docstring.

    Item ``label`` is the source's label, or derived from the untransformed mask when the source has none.
    """

    def __init__(self, source: DataSource, transform: Transform | None, skip_corrupt: bool = False) -> None:
        super().__init__(source, source.ids, transform, skip_corrupt)

    def load(self, image_id: str) -> dict[str, Any]:
        image = self.source.read_image(image_id)
        mask = self.source.read_mask(image_id)
        if mask.shape != image.shape[:2]:
            raise WSSSError(
                f"mask {self.source.mask_path(image_id)} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}; regenerate the mask at the image size"
            )
        label = self.source.label(image_id)
        if label is None:
            label = label_from_mask(mask, self.source.num_classes)
        image, mask = self.transform(image, mask)
        return {
            "id": image_id,
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask),
            "label": torch.from_numpy(label),
        }


class ImageDataset(Dataset):
    """Untransformed images for inference: item ``id``, ``image`` uint8 [H, W, 3], ``label`` float32 [C] or None.

    Args:
        source: the id list to read.
        ids: a subset of ids (e.g. this rank's shard); default all ids of the source.
    """

    def __init__(self, source: DataSource, ids: Sequence[str] | None = None) -> None:
        self.source = source
        self.ids = list(source.ids if ids is None else ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        return {"id": image_id, "image": self.source.read_image(image_id), "label": self.source.label(image_id)}
