"""A user's own dataset (``custom``), readable without writing code.

Layout under ``data_dir``::

    images/<id>.jpg | .jpeg | .png     the images (the id is the file name without extension)
    masks/<id>.png                     optional ground truth: index PNG, 0 = background, 1..C, 255 = ignore
                                       (RGB masks are accepted when their colours are the VOC palette's)
    classes.txt                        one class name per line, background first (K lines, C = K - 1)
    lists/<domain>.txt                 one id per line; ``--domain all`` uses every image in images/
    labels.csv                         optional ``id,class_a|class_b`` rows (an empty field = background
                                       only; a header row starting with ``id`` is skipped)

Image-level labels come from ``labels.csv`` when it lists the id, else from the id's mask, else they are
unknown (None). ``images_dir``, ``masks_dir`` and ``class_names`` override the three default locations.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from core.datasets.base import DataSource, read_class_names, read_id_list, voc_palette
from core.errors import WSSSError

logger = logging.getLogger(__name__)

ALL_IMAGES_DOMAIN = "all"


def read_labels_csv(path: Path, class_names: list[str]) -> dict[str, np.ndarray]:
    """Parse ``id,class_a|class_b`` rows into ``{id: float32 [C]}`` over the foreground classes."""
    index = {name: i for i, name in enumerate(class_names[1:])}
    labels: dict[str, np.ndarray] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_number, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip() or (line_number == 1 and row[0].strip().lower() == "id"):
                continue
            names = [n.strip() for n in (row[1] if len(row) > 1 else "").split("|") if n.strip()]
            label = np.zeros(len(index), dtype=np.float32)
            for name in names:
                if name == class_names[0]:
                    continue
                if name not in index:
                    raise WSSSError(
                        f"{path} line {line_number} names class {name!r}, which is not in the class list "
                        f"({', '.join(class_names[1:])}); fix the row or classes.txt"
                    )
                label[index[name]] = 1.0
            labels[row[0].strip()] = label
    return labels


def scan_images(images_dir: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Map id -> image path for every file of ``images_dir`` with one of ``extensions``."""
    found: dict[str, Path] = {}
    with os.scandir(images_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in extensions and entry.is_file() and stem not in found:
                found[stem] = Path(entry.path)
    return found


class CustomSource(DataSource):
    """The custom layout (see the module docstring)."""

    name = "custom"

    def __init__(
        self,
        data_dir: Path | str,
        domain: str,
        *,
        images_dir: Path | str | None = None,
        masks_dir: Path | str | None = None,
        class_names: Path | str | None = None,
    ) -> None:
        data_dir = Path(data_dir)
        images_dir = Path(images_dir) if images_dir else data_dir / "images"
        if not images_dir.is_dir():
            raise WSSSError(f"images folder {images_dir} does not exist; put the images there or pass --images_dir")
        default_masks = data_dir / "masks"
        masks_dir = Path(masks_dir) if masks_dir else (default_masks if default_masks.is_dir() else None)
        classes = read_class_names(Path(class_names) if class_names else data_dir / "classes.txt")
        self._image_index = scan_images(images_dir, self.image_extensions)
        list_path = data_dir / "lists" / f"{domain}.txt"
        if domain.endswith(".txt") and Path(domain).is_file():
            list_path = Path(domain)
        if list_path.is_file():
            ids = read_id_list(list_path)
        elif domain == ALL_IMAGES_DOMAIN:
            ids, list_path = sorted(self._image_index), None
            if not ids:
                raise WSSSError(
                    f"images folder {images_dir} holds no .jpg/.jpeg/.png file; add images or fix --images_dir"
                )
        else:
            raise WSSSError(f"id list {list_path} does not exist; write one id per line there, or pass --domain all")
        super().__init__(
            data_dir,
            domain,
            ids,
            classes,
            list_path=list_path,
            images_dir=images_dir,
            masks_dir=masks_dir,
            palette=voc_palette(),
        )
        csv_path = data_dir / "labels.csv"
        self._csv_labels = read_labels_csv(csv_path, classes) if csv_path.is_file() else {}

    def image_path(self, image_id: str) -> Path:
        return self._image_index.get(image_id, self.images_dir / f"{image_id}.jpg")

    def default_image_path(self, image_id: str) -> Path:
        return self.image_path(image_id)

    def default_mask_path(self, image_id: str) -> Path | None:
        return None  # masks only exist through masks_dir (set to <data_dir>/masks when that folder exists)

    def compute_label(self, image_id: str) -> np.ndarray | None:
        if image_id in self._csv_labels:
            return self._csv_labels[image_id].copy()
        return self.label_from_mask_file(image_id)
