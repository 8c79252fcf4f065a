"""Datasets: data sources (VOC 2012, COCO 2014, custom), torch datasets and transforms.

The data sources need only numpy/OpenCV/Pillow; the torch datasets (:class:`ClassificationDataset`,
:class:`SegmentationDataset`, :class:`ImageDataset`) are imported on first access, so tools that only read
files do not import torch.

Example:
    >>> source = build_source("voc12", "/data/VOCdevkit/VOC2012", "train_aug")
    >>> image, label = source.read_image(source.ids[0]), source.label(source.ids[0])
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.datasets.base import DataSource, voc_palette
from core.datasets.coco import COCO_CLASSES, COCOSource
from core.datasets.custom import CustomSource
from core.datasets.voc import VOC_CLASSES, VOCSource
from core.errors import WSSSError

SOURCES: dict[str, type[DataSource]] = {"voc12": VOCSource, "coco14": COCOSource, "custom": CustomSource}
_TORCH_EXPORTS = ("ClassificationDataset", "SegmentationDataset", "ImageDataset")

__all__ = [
    "COCO_CLASSES",
    "SOURCES",
    "VOC_CLASSES",
    "ClassificationDataset",
    "COCOSource",
    "CustomSource",
    "DataSource",
    "ImageDataset",
    "SegmentationDataset",
    "VOCSource",
    "build_source",
    "source_from_args",
    "voc_palette",
]


def build_source(
    dataset: str,
    data_dir: str | Path,
    domain: str,
    *,
    images_dir: str | Path | None = None,
    masks_dir: str | Path | None = None,
    class_names: str | Path | None = None,
) -> DataSource:
    """Open the id list ``domain`` of a dataset laid out as ``dataset`` ("voc12", "coco14" or "custom").

    ``images_dir``/``masks_dir`` replace the layout's image and mask folders (e.g. pseudo-label PNGs);
    ``class_names`` is the class-names file of a custom dataset.
    """
    if dataset not in SOURCES:
        raise WSSSError(f"unknown dataset {dataset!r}; pass --dataset with one of {', '.join(SOURCES)}")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise WSSSError(f"data folder {data_dir} does not exist; pass --data_dir with the {dataset} root")
    kwargs: dict[str, Any] = {"images_dir": images_dir, "masks_dir": masks_dir}
    if dataset == "custom":
        kwargs["class_names"] = class_names
    elif class_names:
        raise WSSSError(f"--class_names only applies to --dataset custom; {dataset} has fixed classes")
    return SOURCES[dataset](data_dir, domain, **kwargs)


def source_from_args(args: argparse.Namespace, domain: str | None = None) -> DataSource:
    """Build the source named by the flags of :func:`core.cli.add_dataset_args` (``domain`` overrides ``--domain``)."""
    data_dir = getattr(args, "data_dir", None)
    if not data_dir:
        raise WSSSError("no dataset folder given; pass --data_dir or set WSSS_DATA_DIR")
    return build_source(
        getattr(args, "dataset", "voc12"),
        data_dir,
        domain if domain is not None else args.domain,
        images_dir=getattr(args, "images_dir", None),
        masks_dir=getattr(args, "masks_dir", None),
        class_names=getattr(args, "class_names", None),
    )


def __getattr__(name: str) -> Any:
    # Lazy torch import: `from core.datasets import ClassificationDataset` works, plain imports stay light.
    if name in _TORCH_EXPORTS:
        from core.datasets import torch_datasets

        return getattr(torch_datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
