"""Label maps from CAM-format folders (class CAMs, or random-walk scores stored as CAM files), written as palette
PNGs, and a summary of what a folder of label maps holds.

The decoding rule itself is :func:`core.labels.pseudo_mask`; this module reads the files (CAMs, saliency, images),
checks that they belong together and writes ``<out_dir>/<id>.png`` atomically. The CAM stage
(``scripts/cam/make_pseudo_masks.py``) and the random-walk stage (affinity labels, RW pseudo labels) share it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import artifacts, paths
from core.errors import WSSSError, first_ids
from core.inference import CamFolderJob
from core.labels import IGNORE_INDEX, pseudo_mask
from core.manifest import read_manifest
from core.parallel import chunked, parallel_map


@dataclass(frozen=True)
class PseudoMaskJob(CamFolderJob):
    """Settings of a pseudo-mask run, sent once to each worker process (``source``: ``read_image``, ``image_path``,
    ``palette``, ``num_classes``; ``out_dir``: the ``<id>.png`` label maps; ``background_only`` ids get an all-zero
    mask without a CAM file).

    Attributes:
        threshold: background score (foreground threshold of the band).
        bg_threshold: lower threshold of the uncertain band, or None.
        sal_dir: folder of saliency PNGs (background = 1 - saliency), or None.
        crf_t, crf_gt_prob: label CRF.
        producer: the script that writes the CAM folder, named in the messages about missing files.
    """

    threshold: float = 0.25
    bg_threshold: float | None = None
    sal_dir: Path | None = None
    crf_t: int = 0
    crf_gt_prob: float = 0.7
    producer: str = "scripts/cam/inference.py"

    def read_cams(self, image_id: str, size: tuple[int, int]) -> artifacts.CamFile:
        """The checked CAM file of one id (``hr_cam`` of the image's ``size``, keys within the dataset's classes)."""
        path = self.cam_file(image_id)
        if path is None:
            raise WSSSError(f"CAM file {self.cam_dir / image_id}.npz not found; run {self.producer} first")
        return artifacts.load_cam(
            path,
            allow_pickle=self.allow_pickle,
            with_cam=False,
            size=size,
            num_classes=self.source.num_classes,
            size_of=f"image {image_id}",
        )

    def read_saliency(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        """The saliency map of one id from ``sal_dir``: float32 [H, W] in [0, 1], checked against ``size``."""
        assert self.sal_dir is not None
        saliency = artifacts.load_saliency(self.sal_dir / f"{image_id}{artifacts.PNG_SUFFIX}")
        if saliency.shape != tuple(size):
            raise WSSSError(
                f"saliency map of {image_id} in {self.sal_dir} is {saliency.shape} but its CAMs are "
                f"{tuple(size)}; the folders belong to different images"
            )
        return saliency

    def background_mask(self, image_id: str) -> np.ndarray | None:
        """uint8 [H, W] zeros for an id without a CAM file whose label has no foreground class, else None."""
        if self.cam_file(image_id) is not None:
            return None
        if image_id not in self.background_only:
            raise WSSSError(f"CAM file {self.cam_dir / image_id}.npz not found; run {self.producer} first")
        return np.zeros(self.source.image_size(image_id), dtype=np.uint8)

    def label_map(self, image_id: str) -> np.ndarray:
        """The pseudo mask of one id: uint8 [H, W], values in {0..C, 255}."""
        zeros = self.background_mask(image_id)
        if zeros is not None:
            return zeros
        image = self.source.read_image(image_id) if self.crf_t > 0 else None
        size = image.shape[:2] if image is not None else self.source.image_size(image_id)
        cams = self.read_cams(image_id, size)
        background: float | np.ndarray = self.threshold
        if self.sal_dir is not None:
            background = 1.0 - self.read_saliency(image_id, cams.size)
        return pseudo_mask(
            cams.hr_cam,
            cams.keys,
            background,
            bg_threshold=self.bg_threshold,
            image=image,
            crf_t=self.crf_t,
            crf_gt_prob=self.crf_gt_prob,
        )

    def check_files(self, ids: Sequence[str], domain: str, hint: str = "") -> None:
        """Every id needs a CAM file (or a background-only label), and with ``sal_dir`` the ids that are decoded a
        saliency map; else a one-line WSSSError naming the folder, the first missing ids, the domain the folder was
        made for when its manifest names another one, and ``producer``.

        Args:
            ids: the ids of the run.
            domain: the ``--domain`` the folder should have been made for (named in the message).
            hint: appended to the message about missing CAM files.
        """
        missing = self.missing_cam_files(ids)
        if missing:
            raise WSSSError(
                f"{self.describe_missing(missing, len(ids))}{folder_domain_hint(self.cam_dir, domain)}; "
                f"run {self.producer} for --domain {domain} first{hint}"
            )
        if self.sal_dir is not None:
            decoded = [i for i in ids if i not in self.background_only or self.cam_file(i) is not None]
            no_saliency = [i for i in decoded if not (self.sal_dir / f"{i}{artifacts.PNG_SUFFIX}").is_file()]
            if no_saliency:
                raise WSSSError(
                    f"{len(no_saliency)} of {len(decoded)} saliency maps missing in {self.sal_dir} "
                    f"(first: {first_ids(no_saliency)}); make them first or fix --sal_dir"
                )


def known_background_only(source: Any) -> frozenset[str]:
    """Ids whose image-level label is known and has no foreground class (ids without a label, e.g. of VOC
    ``test``, are not among them: they need a CAM file)."""
    return frozenset(i for i, label in source.labels().items() if label is not None and not np.any(label > 0))


def folder_domain_hint(folder: Path, domain: str) -> str:
    """``" (the folder was made for --domain val)"`` when ``folder``'s manifest records another domain, else ``""``."""
    made = (read_manifest(folder) or {}).get("context", {}).get("domain")
    if made and paths.domain_name(str(made)) != paths.domain_name(domain):
        return f" (the folder was made for --domain {made})"
    return ""


def write_pseudo_masks(job: PseudoMaskJob, ids: Sequence[str]) -> int:
    """Write ``<out_dir>/<id>.png`` (palette PNG, atomic) of ``job.label_map`` for each id; returns how many."""
    for image_id in ids:
        artifacts.save_label_map(
            job.out_dir / f"{image_id}{artifacts.PNG_SUFFIX}", job.label_map(image_id), palette=job.source.palette
        )
    return len(ids)


# --------------------------------------------------------------------------------------------------------------------
# What a folder of label maps holds
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelStats:
    """Pixel and image counts of a set of label maps (0 = background, 1..C = classes, 255 = uncertain).

    Attributes:
        images: label maps read.
        images_with_class: maps with at least one pixel of a class 1..C.
        pixels: all pixels.
        background: pixels labelled 0.
        foreground: pixels labelled 1..C.
    """

    images: int = 0
    images_with_class: int = 0
    pixels: int = 0
    background: int = 0
    foreground: int = 0

    def __add__(self, other: LabelStats) -> LabelStats:
        return LabelStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return self.images, self.images_with_class, self.pixels, self.background, self.foreground

    @property
    def foreground_fraction(self) -> float:
        """Class pixels / all pixels (0 for no pixels)."""
        return self.foreground / self.pixels if self.pixels else 0.0

    @property
    def labelled_fraction(self) -> float:
        """Pixels that are not uncertain (255) / all pixels."""
        return (self.background + self.foreground) / self.pixels if self.pixels else 0.0

    def describe(self) -> str:
        """``"1464 maps: 31.2% class pixels, 60.1% background, 8.7% uncertain; 1460 maps have a class"``."""
        if not self.pixels:
            return f"{self.images} maps, no pixels"
        uncertain = 1.0 - self.labelled_fraction
        return (
            f"{self.images} maps: {100 * self.foreground_fraction:.1f}% class pixels, "
            f"{100 * self.background / self.pixels:.1f}% background, {100 * uncertain:.1f}% uncertain; "
            f"{self.images_with_class} maps have a class"
        )

    def as_dict(self) -> dict[str, float]:
        """The counts and fractions, for manifests and result JSONs."""
        return {
            "images": self.images,
            "images_with_class": self.images_with_class,
            "foreground_fraction": round(self.foreground_fraction, 6),
            "labelled_fraction": round(self.labelled_fraction, 6),
        }


def _stats_of(folder: Path, ids: Sequence[str]) -> LabelStats:
    total = LabelStats()
    for image_id in ids:
        labels = artifacts.load_label_map(folder / f"{image_id}{artifacts.PNG_SUFFIX}")
        counts = np.bincount(labels.reshape(-1), minlength=256)
        foreground = int(counts[1:IGNORE_INDEX].sum())
        total += LabelStats(1, int(foreground > 0), int(labels.size), int(counts[0]), foreground)
    return total


def label_stats(folder: str | Path, ids: Sequence[str], num_workers: int = 1) -> LabelStats:
    """Count the pixels of ``<folder>/<id>.png`` over ``ids`` (in ``num_workers`` processes)."""
    chunks = chunked(list(ids), max(1, num_workers) * 4) if ids else []
    parts = parallel_map(functools.partial(_stats_of, Path(folder)), chunks, num_workers, desc="label statistics")
    return sum(parts, LabelStats())


def require_classes(stats: LabelStats, folder: str | Path, min_foreground: float, remedy: str) -> None:
    """Stop when a folder of label maps is almost all background (USERS §1.15: "my pseudo labels are all black").

    Args:
        stats: :func:`label_stats` of the folder.
        folder: the folder, for the message.
        min_foreground: the smallest acceptable fraction of class pixels (0 disables the check).
        remedy: what to try, e.g. ``"lower --threshold"``.

    Raises:
        WSSSError: fewer than ``min_foreground`` of the pixels carry a class.
    """
    if min_foreground <= 0 or not stats.images or stats.foreground_fraction >= min_foreground:
        return
    raise WSSSError(
        f"{folder} is almost all background ({stats.describe()}; at least {100 * min_foreground:g}% class pixels "
        f"expected): {remedy}, or pass --min_foreground 0 to accept these masks"
    )
