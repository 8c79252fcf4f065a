"""MS COCO 2014 (``coco14``) with VOC-style semantic PNGs.

Layout under ``data_dir`` (``.../coco14``)::

    train2014/COCO_train2014_<12-digit id>.jpg
    val2014/COCO_val2014_<12-digit id>.jpg
    coco_seg_anno/<12-digit id>.png        index PNG: 0 background, 1..80 classes, 255 ignore
    lists/<domain>.txt                     ids with both image and PNG  (tools/prepare_coco14.py)
    lists/<domain>_labels.npz              ``ids`` str [N], ``labels`` uint8 [N, 80] (same tool)

Domains are ``train2014`` and ``val2014`` (``train``/``val`` are aliases). Labels come from the npz when it
lists the id, else from the id's PNG (computed lazily, once).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from core.datasets.base import DataSource, read_id_list, voc_palette
from core.datasets.voc import find_list_file
from core.errors import WSSSError

logger = logging.getLogger(__name__)

COCO_CLASSES: tuple[str, ...] = (
    "background",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

COCO_DOMAIN_ALIASES = {"train": "train2014", "val": "val2014", "valid": "val2014"}


def normalize_coco_id(token: str) -> str:
    """``9`` / ``COCO_train2014_000000000009`` / ``000000000009`` -> ``000000000009``."""
    token = token.rsplit("_", 1)[-1]
    return token.zfill(12) if token.isdigit() else token


def load_label_file(path: Path, num_classes: int) -> dict[str, np.ndarray]:
    """Read ``<domain>_labels.npz`` (``ids`` str [N], ``labels`` [N, C]) into ``{id: float32 [C]}``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, labels = data["ids"], data["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise WSSSError(f"cannot read label file {path} ({e}); delete it and rerun tools/prepare_coco14.py") from e
    if labels.ndim != 2 or labels.shape != (len(ids), num_classes):
        raise WSSSError(
            f"label file {path} holds labels of shape {labels.shape} for {len(ids)} ids, expected [N, {num_classes}]; "
            "rerun tools/prepare_coco14.py"
        )
    labels = labels.astype(np.float32)
    return {str(image_id): labels[i] for i, image_id in enumerate(ids)}


class COCOSource(DataSource):
    """MS COCO 2014 layout (see the module docstring)."""

    name = "coco14"

    def __init__(
        self,
        data_dir: Path | str,
        domain: str,
        *,
        images_dir: Path | str | None = None,
        masks_dir: Path | str | None = None,
    ) -> None:
        data_dir = Path(data_dir)
        domain = COCO_DOMAIN_ALIASES.get(domain, domain)
        list_path = find_list_file(data_dir, "lists", "coco14", domain)
        if list_path is None:
            raise WSSSError(
                f"id list {data_dir / 'lists' / (domain + '.txt')} does not exist; "
                f"run `python tools/prepare_coco14.py --data_dir {data_dir}`"
            )
        ids = [normalize_coco_id(i) for i in read_id_list(list_path)]
        super().__init__(
            data_dir,
            domain,
            ids,
            list(COCO_CLASSES),
            list_path=list_path,
            images_dir=Path(images_dir) if images_dir else None,
            masks_dir=Path(masks_dir) if masks_dir else None,
            palette=voc_palette(),
        )
        # The image folder/prefix follow the split name (train2014/val2014), also for custom list names.
        self._split = "val2014" if "val" in domain else "train2014"
        label_file = data_dir / "lists" / f"{domain}_labels.npz"
        self._file_labels = load_label_file(label_file, self.num_classes) if label_file.is_file() else {}
        if not self._file_labels:
            logger.info("no %s; labels of %s are computed from the PNGs when first needed", label_file, domain)

    def default_image_path(self, image_id: str) -> Path:
        return self.data_dir / self._split / f"COCO_{self._split}_{image_id}.jpg"

    def default_mask_path(self, image_id: str) -> Path | None:
        candidate = self.data_dir / "coco_seg_anno" / f"{image_id}.png"
        return candidate if candidate.is_file() else None

    def compute_label(self, image_id: str) -> np.ndarray | None:
        if image_id in self._file_labels:
            return self._file_labels[image_id].copy()
        # The dataset's own ground truth, even when --masks_dir points read_mask at pseudo labels.
        gt_path = self.default_mask_path(image_id)
        return None if gt_path is None else self.label_from_mask_file(image_id, gt_path)
