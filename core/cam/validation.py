"""End-of-epoch validation of CAM classifiers: classification scores and a CAM background-threshold sweep.

Shared by every CAM training script (vanilla, Puzzle, OC-CSE, P-OC, P-NOC). Each process validates its own shard
of the validation set (see :func:`core.engine.build_loader`); counts are summed over processes before scoring, so
the numbers do not depend on the number of processes.

CAM sweep (SPEC §4.1, with the GT kept at full resolution): CAMs of the ground-truth classes are ReLU'd,
upsampled bilinearly to the mask size, divided by their per-class maximum, and for every threshold ``t`` a pixel
is background when no class scores above ``t`` (:class:`core.metrics.ThresholdSweep`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from core import distributed
from core.cam.cams import max_normalize
from core.metrics import ThresholdSweep, best_index, scores_from_confusion

logger = logging.getLogger(__name__)


def normalized_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, bilinear upsampling to ``size`` and division by each map's maximum.

    Args:
        cams: float [B, C, h, w], raw class activation maps.
        size: (H, W) of the output.

    Returns:
        float32 [B, C, H, W] in [0, 1] (maps that are all <= 0 stay 0).
    """
    return max_normalize(F.interpolate(F.relu(cams.float()), size=size, mode="bilinear", align_corners=False))


def classification_counts(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-class true positives, false positives and false negatives of thresholded scores.

    Args:
        probs: float [B, C] in [0, 1] (sigmoid of the logits).
        labels: float [B, C], multi-hot (values > 0.5 are positive).

    Returns:
        int64 [3, C]: rows TP, FP, FN.
    """
    predicted = probs >= threshold
    positive = labels > 0.5
    return torch.stack(
        [(predicted & positive).sum(0), (predicted & ~positive).sum(0), (~predicted & positive).sum(0)]
    ).to(torch.int64)


def classification_scores(counts: np.ndarray) -> dict[str, float]:
    """Macro precision, recall and F1 (percent) from :func:`classification_counts` summed over the set.

    Classes whose score is undefined (no positive prediction for precision, no positive label for recall) are
    left out of the mean rather than counted as 0.
    """
    tp, fp, fn = (counts[i].astype(np.float64) for i in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)

    def mean(values: np.ndarray) -> float:
        return float(np.nanmean(values) * 100) if np.isfinite(values).any() else float("nan")

    return {"precision": mean(precision), "recall": mean(recall), "f1": mean(f1)}


def add_cams_to_sweep(sweep: ThresholdSweep, cams: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
    """Add a batch of CAMs restricted to each image's GT classes.

    Args:
        cams: float [B, C, H, W] in [0, 1], already at mask size.
        labels: float [B, C], multi-hot.
        masks: int [B, H, W], values 0..C or 255 (ignored).
    """
    cams_np = cams.cpu().numpy()
    labels_np = labels.cpu().numpy() > 0.5
    masks_np = masks.cpu().numpy().astype(np.uint8)
    for b in range(cams_np.shape[0]):  # per image: each has its own set of GT classes
        present = np.flatnonzero(labels_np[b])
        sweep.add(cams_np[b, present], present + 1, masks_np[b])


@torch.no_grad()
def validate_classifier(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    class_names: Sequence[str],
    thresholds: Sequence[float],
    max_steps: int | None = None,
    with_cams: bool = True,
    autocast: Any = None,
) -> dict[str, Any]:
    """Classification scores and (``with_cams``) the CAM threshold sweep over a validation loader.

    Args:
        model: a classifier with ``forward(x, with_cam=True) -> (logits [B, C], cams [B, C, h, w])``; put in eval mode.
        loader: batches with ``image`` float [B, 3, H, W], ``label`` float [B, C] and (for CAMs) ``mask`` int [B, H, W].
        class_names: the C foreground class names (background is added in front).
        thresholds: background thresholds of the sweep, e.g. 0.10..0.45.
        max_steps: stop after this many batches per process (None: all).
        autocast: a zero-argument callable returning the autocast context (``ctx.autocast``), or None.

    Returns:
        ``precision``, ``recall``, ``f1`` (percent) and, with CAMs, ``miou``, ``miou_fg``, ``threshold`` (best
        threshold) and ``iou`` (class name -> IoU at that threshold).
    """
    model.eval()
    num_classes = len(class_names)
    counts = torch.zeros(3, num_classes, dtype=torch.int64)
    sweep = ThresholdSweep(num_classes + 1, list(thresholds)) if with_cams else None
    for index, batch in enumerate(loader):
        if max_steps is not None and index >= max_steps:
            break
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"]
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits, cams = model(images, with_cam=True)
        counts += classification_counts(torch.sigmoid(logits.float()).cpu(), labels)
        if sweep is not None:
            masks = batch["mask"]
            add_cams_to_sweep(sweep, normalized_cams(cams, tuple(masks.shape[-2:])), labels, masks)
    results: dict[str, Any] = classification_scores(distributed.all_reduce_sum_(counts).numpy())
    if sweep is not None:
        results |= _best_threshold(sweep, thresholds, ["background", *class_names])
    return results


def _best_threshold(sweep: ThresholdSweep, thresholds: Sequence[float], names: Sequence[str]) -> dict[str, Any]:
    confusion = distributed.all_reduce_sum_(torch.from_numpy(sweep.confusion)).numpy()
    scored = [scores_from_confusion(conf, names) for conf in confusion]
    best = best_index(scored)
    return {
        "miou": scored[best]["miou"],
        "miou_fg": scored[best]["miou_fg"],
        "threshold": float(thresholds[best]),
        "iou": scored[best]["iou"],
    }
