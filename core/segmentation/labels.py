"""The label folder DeepLabV3+ trains on: where it is, and the check that it can be trained on at all.

Users train on folders of pseudo masks that were written with the wrong path, size or encoding and get an mIoU near
zero hours later (USERS §1.15); :func:`check_label_folder` reads every mask once before training and refuses such a
folder with one line naming the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import paths
from core.datasets.base import DataSource, decode_mask_file
from core.errors import WSSSError, first_ids
from core.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: A folder where fewer than this share of the masks has a foreground pixel is refused ("all black" labels).
MIN_FOREGROUND_SHARE = 0.05


def label_folder(label_name: str | None, masks_dir: str | None) -> Path | None:
    """The folder of training masks: ``experiments/predictions/<label_name>``, ``masks_dir``, or None (ground truth).

    Raises:
        WSSSError: both are given, or the folder does not exist.
    """
    if label_name and masks_dir:
        raise WSSSError(f"pass --label_name ({label_name}) or --masks_dir ({masks_dir}), not both")
    if not label_name and not masks_dir:
        return None
    folder = paths.PREDICTIONS_DIR / label_name if label_name else Path(masks_dir)
    if not folder.is_dir():
        flag = "--label_name" if label_name else "--masks_dir"
        raise WSSSError(
            f"label folder {folder} ({flag}) does not exist; make the pseudo masks first "
            "(scripts/cam/make_pseudo_masks.py or the random-walk stage) or leave both flags empty to train on GT"
        )
    return folder


@dataclass(frozen=True)
class LabelStats:
    """What :func:`check_label_folder` found: masks read, masks with a foreground pixel, and pixel shares."""

    masks: int
    with_foreground: int
    foreground_share: float
    ignored_share: float


def check_label_folder(source: DataSource, what: str = "training labels") -> LabelStats:
    """Read every mask of ``source`` and refuse a folder that cannot be trained on.

    Checks, in this order, each failure one :class:`WSSSError` line naming the first files: every id has a mask;
    every mask decodes with values in ``0..C`` and 255; every mask has its image's size; at least
    :data:`MIN_FOREGROUND_SHARE` of the masks have a foreground pixel.

    Args:
        source: the id list, reading masks from its ``masks_dir`` (pseudo labels) or its GT layout.
        what: how the message names the folder.

    Returns:
        :class:`LabelStats` of the folder.
    """
    where = source.masks_dir if source.masks_dir is not None else source.data_dir
    missing = [i for i in source.ids if source.mask_path(i) is None]
    if missing:
        raise WSSSError(
            f"{what}: {len(missing)} of {len(source.ids)} ids of {source.domain} have no mask <id>.png in {where} "
            f"(first: {first_ids(missing)}); make masks for the whole --domain_train or pick the domain they cover"
        )
    bad_values: list[str] = []
    wrong_size: list[str] = []
    with_foreground, foreground, ignored, total = 0, 0, 0, 0
    for image_id in source.ids:
        path = source.mask_path(image_id)
        try:
            mask = decode_mask_file(path, source.palette, source.num_classes)
        except WSSSError:
            bad_values.append(path.name)
            continue
        if mask.shape != tuple(source.image_size(image_id)):
            wrong_size.append(path.name)
            continue
        counts = np.bincount(mask.ravel(), minlength=256)
        fg = int(counts[1 : source.num_classes + 1].sum())
        with_foreground += fg > 0
        foreground += fg
        ignored += int(counts[IGNORE_INDEX])
        total += mask.size
    if bad_values:
        raise WSSSError(
            f"{what}: {len(bad_values)} masks in {where} are unreadable or have values outside 0..{source.num_classes} "
            f"and 255 (first: {first_ids(bad_values)}); write class-index PNGs for this dataset's classes"
        )
    if wrong_size:
        raise WSSSError(
            f"{what}: {len(wrong_size)} masks in {where} differ in size from their images (first: "
            f"{first_ids(wrong_size)}); regenerate them at the image size"
        )
    stats = LabelStats(len(source.ids), with_foreground, foreground / max(1, total), ignored / max(1, total))
    if stats.with_foreground < MIN_FOREGROUND_SHARE * stats.masks:
        raise WSSSError(
            f"{what}: only {stats.with_foreground} of {stats.masks} masks in {where} have a foreground pixel (values "
            f"1..{source.num_classes}); the labels are almost all background: check how they were made "
            "(threshold, class ids rather than colours)"
        )
    logger.info(
        "%s in %s: %d masks, %d with foreground; pixels %.1f%% foreground, %.1f%% ignored",
        what, where, stats.masks, stats.with_foreground, 100 * stats.foreground_share, 100 * stats.ignored_share,
    )  # fmt: skip
    return stats
