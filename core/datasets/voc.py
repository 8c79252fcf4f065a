"""Pascal VOC 2012 (``voc12``), with the SBD augmentation.

Layout under ``data_dir`` (``.../VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml                   image-level labels: the <name> of every <object>
    SegmentationClass/<id>.png             original VOC ground truth (palette PNG, 255 boundary band)
    SegmentationClassAug/<id>.png          SBD masks as index PNGs (``tools/prepare_voc12.py`` writes them)
    ImageSets/Segmentation/<domain>.txt    id lists: train, val, trainval, test, train_aug (from the tool)

Ground truth of an id is ``SegmentationClass`` when that file exists, else ``SegmentationClassAug``: the
original VOC masks (with their ignore band) are what train-set CAMs are evaluated against (USERS.md §1.6).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from core.datasets.base import PACKAGED_LISTS_DIR, DataSource, read_id_list, voc_palette
from core.errors import WSSSError

logger = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def find_list_file(data_dir: Path, local_dir: str, packaged_dir: str, domain: str) -> Path | None:
    """The id list for ``domain``: ``<data_dir>/<local_dir>/<domain>.txt``, else the packaged copy, else None.

    A ``domain`` that is itself the path of an existing ``.txt`` file is used as is.
    """
    if domain.endswith(".txt") and Path(domain).is_file():
        return Path(domain)
    for candidate in (data_dir / local_dir / f"{domain}.txt", PACKAGED_LISTS_DIR / packaged_dir / f"{domain}.txt"):
        if candidate.is_file():
            return candidate
    return None


def parse_voc_xml(path: Path, class_index: dict[str, int], num_classes: int) -> np.ndarray:
    """Multi-hot label from a VOC annotation file.

    Returns:
        float32 [C]; one for the class of every ``<object>`` (duplicates collapse).
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise WSSSError(f"cannot parse annotation {path} ({e}); replace the file or delete it to use the mask") from e
    label = np.zeros(num_classes, dtype=np.float32)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise WSSSError(f"annotation {path} names an unknown class {name!r}; known: {', '.join(class_index)}")
        label[class_index[name]] = 1.0
    return label


class VOCSource(DataSource):
    """Pascal VOC 2012 layout (see the module docstring)."""

    name = "voc12"
    image_extensions = (".jpg", ".jpeg", ".png")

    def __init__(
        self,
        data_dir: Path | str,
        domain: str,
        *,
        images_dir: Path | str | None = None,
        masks_dir: Path | str | None = None,
    ) -> None:
        data_dir = Path(data_dir)
        list_path = find_list_file(data_dir, "ImageSets/Segmentation", "voc12", domain)
        if list_path is None:
            expected = data_dir / "ImageSets" / "Segmentation" / f"{domain}.txt"
            hint = (
                f"; run `python tools/prepare_voc12.py --voc_dir {data_dir} --sbd_dir .../benchmark_RELEASE/dataset`"
                if "aug" in domain
                else "; pass an existing --domain (train, val, trainval, train_aug) or check --data_dir"
            )
            raise WSSSError(f"id list {expected} does not exist{hint}")
        super().__init__(
            data_dir,
            domain,
            read_id_list(list_path),
            list(VOC_CLASSES),
            list_path=list_path,
            images_dir=Path(images_dir) if images_dir else None,
            masks_dir=Path(masks_dir) if masks_dir else None,
            palette=voc_palette(),
        )
        self._class_index = {name: i for i, name in enumerate(VOC_CLASSES[1:])}

    def default_image_path(self, image_id: str) -> Path:
        return self.data_dir / "JPEGImages" / f"{image_id}.jpg"

    def default_mask_path(self, image_id: str) -> Path | None:
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            candidate = self.data_dir / folder / f"{image_id}.png"
            if candidate.is_file():
                return candidate
        return None

    def compute_label(self, image_id: str) -> np.ndarray | None:
        xml_path = self.data_dir / "Annotations" / f"{image_id}.xml"
        if xml_path.is_file():
            return parse_voc_xml(xml_path, self._class_index, self.num_classes)
        # The dataset's own ground truth, even when --masks_dir points read_mask at pseudo labels.
        gt_path = self.default_mask_path(image_id)
        return None if gt_path is None else self.label_from_mask_file(image_id, gt_path)
