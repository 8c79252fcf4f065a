"""Pseudo masks from CAM files: the evaluator's decoding at one background threshold, written as label PNGs.

The decoding rule itself is :func:`core.labels.pseudo_mask`; this module reads the files (CAMs, saliency, images),
checks that they belong together and writes ``<out_dir>/<id>.png`` atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import artifacts
from core.errors import WSSSError
from core.inference import CamFolderJob
from core.labels import pseudo_mask


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
    """

    threshold: float = 0.25
    bg_threshold: float | None = None
    sal_dir: Path | None = None
    crf_t: int = 0
    crf_gt_prob: float = 0.7

    def label_map(self, image_id: str) -> np.ndarray:
        """The pseudo mask of one id: uint8 [H, W], values in {0..C, 255}."""
        path = self.cam_file(image_id)
        if path is None:
            if image_id not in self.background_only:
                raise WSSSError(f"CAM file {self.cam_dir / image_id}.npz not found; run scripts/cam/inference.py first")
            height, width = self.source.read_image(image_id).shape[:2]
            return np.zeros((height, width), dtype=np.uint8)
        image = self.source.read_image(image_id) if self.crf_t > 0 else None
        size = image.shape[:2] if image is not None else self.source.image_size(image_id)
        cams = artifacts.load_cam(
            path,
            allow_pickle=self.allow_pickle,
            with_cam=False,
            size=size,
            num_classes=self.source.num_classes,
            size_of=f"image {image_id}",
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
