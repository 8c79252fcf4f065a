"""Binary saliency masks from C²AM CAM files: the foreground map thresholded (or read as a probability), optionally
refined by a 2-label dense CRF, written as 0/255 PNGs (SPEC §7.4).

A C²AM CAM file holds one plane (``keys = [1]``, foreground) in the project's CAM format. Per image:

* ``relu`` activation (default): foreground where the map beats ``threshold`` (ties go to the background, as
  ``argmax([threshold, cam])`` decides), then the label CRF over 2 labels (``crf_t`` iterations, ``crf_gt_prob``);
* ``sigmoid`` activation: the map is a probability ``p``; planes ``(1 - p, p)``, foreground where ``p > 0.5``, or the
  argmax of the DeepLab-v2 softmax CRF on those planes (the reference wrote the two planes as an image when the CRF
  was off, SPEC §13.1.15);
* an image whose image-level label has no foreground class gets an all-zero mask without reading a CAM file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core import artifacts
from core.crf import crf_inference_labels, crf_inference_probs
from core.errors import WSSSError
from core.inference import CamFolderJob
from core.labels import compact_labels

ACTIVATIONS = ("relu", "sigmoid")
FOREGROUND = 255


@dataclass(frozen=True)
class SaliencyMaskJob(CamFolderJob):
    """Settings of a saliency-mask run, sent once to each worker process (``cam_dir``: one-plane CAM files;
    ``out_dir``: the ``<id>.png`` masks; ``background_only`` ids get all-zero masks, no CAM file needed).

    Attributes:
        threshold: relu activation: foreground where the map > threshold.
        activation: ``relu`` or ``sigmoid`` (see the module docstring).
        crf_t: CRF iterations (0 = off).
        crf_gt_prob: label-CRF confidence in the thresholded map, in (0, 1).
    """

    threshold: float = 0.3
    activation: str = "relu"
    crf_t: int = 0
    crf_gt_prob: float = 0.7

    def foreground_map(self, image_id: str) -> np.ndarray:
        """float32 [H, W] in [0, 1], the C²AM foreground map of one id (checked against the image's size)."""
        path = self.cam_file(image_id)
        if path is None:
            raise WSSSError(f"CAM file {self.cam_dir / image_id}.npz not found; run scripts/ccam/inference.py first")
        size = self.source.image_size(image_id)
        cams = artifacts.load_cam(
            path, allow_pickle=self.allow_pickle, with_cam=False, size=size, size_of=f"image {image_id}"
        )
        if len(cams.keys) > 1:
            raise WSSSError(
                f"{path} holds {len(cams.keys)} class maps, but a C²AM file has one foreground map (keys [1]); "
                "pass a folder written by scripts/ccam/inference.py"
            )
        return cams.hr_cam[0] if len(cams.keys) else np.zeros(size, dtype=np.float32)

    def mask(self, image_id: str) -> np.ndarray:
        """uint8 [H, W]: 0 = background, 255 = foreground."""
        if image_id in self.background_only:
            return np.zeros(self.source.image_size(image_id), dtype=np.uint8)
        foreground = binary_saliency(
            self.foreground_map(image_id),
            self.threshold,
            self.activation,
            image=self.source.read_image(image_id) if self.crf_t > 0 else None,
            crf_t=self.crf_t,
            crf_gt_prob=self.crf_gt_prob,
        )
        return np.where(foreground, FOREGROUND, 0).astype(np.uint8)


def binary_saliency(
    saliency: np.ndarray,
    threshold: float,
    activation: str = "relu",
    *,
    image: np.ndarray | None = None,
    crf_t: int = 0,
    crf_gt_prob: float = 0.7,
) -> np.ndarray:
    """The foreground of one map, as the module docstring describes.

    Args:
        saliency: float [H, W] in [0, 1].
        threshold: relu: foreground where ``saliency > threshold`` (unused for sigmoid).
        activation: ``relu`` or ``sigmoid``.
        image: uint8 [H, W, 3] RGB, needed when ``crf_t > 0``.
        crf_t: CRF iterations (0 = off).
        crf_gt_prob: label-CRF confidence, in (0, 1).

    Returns:
        bool [H, W].
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    saliency = np.asarray(saliency, dtype=np.float32)
    if crf_t > 0 and image is None:
        raise ValueError("the CRF needs the image")
    if activation == "sigmoid":
        planes = np.stack([1.0 - saliency, saliency])  # [2, H, W]
        if crf_t > 0:
            return crf_inference_probs(image, planes, t=crf_t).argmax(axis=0) == 1
        return planes.argmax(axis=0) == 1  # ties (p = 0.5) go to the background
    labels = compact_labels(saliency[None], threshold)  # 1 where saliency > threshold
    if crf_t > 0:
        labels = crf_inference_labels(image, labels, 2, t=crf_t, gt_prob=crf_gt_prob)
    return labels == 1


def write_saliency_masks(job: SaliencyMaskJob, ids: Sequence[str]) -> int:
    """Write ``<out_dir>/<id>.png`` (8-bit grey, 0/255, atomic) for each id; returns how many were written."""
    for image_id in ids:
        artifacts.save_saliency(job.out_dir / f"{image_id}{artifacts.PNG_SUFFIX}", job.mask(image_id))
    return len(ids)
