"""Losses of the CAM stage: multilabel soft margin with binary label smoothing, Puzzle-CAM's reconstruction loss,
Mixup-CAM's entropy and concentration terms.

All functions are pure: they take tensors and return a scalar tensor, with no module state.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

RECONSTRUCTION_KINDS = {"l1": "l1", "l1_loss": "l1", "l2": "l2", "l2_loss": "l2"}
RECONSTRUCTION_OPTIONS = {"masked": "masked", "masking": "masked", "selection": "selection", "none": "none"}


def smooth_labels(y: torch.Tensor, eps: float) -> torch.Tensor:
    """Binary-target label smoothing ``(1 - eps) * y + eps * 0.5`` (the P-NOC convention, not the K-way one).

    Args:
        y: labels, any shape, values in [0, 1].
        eps: smoothing in [0, 1]; 0 returns ``y`` unchanged.

    Returns:
        Tensor like ``y`` with values in [eps/2, 1 - eps/2].
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label smoothing must be in [0, 1], got {eps}")
    if eps == 0.0:
        return y
    return (1.0 - eps) * y + eps * 0.5


def multilabel_soft_margin(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multilabel soft-margin loss: per-class binary cross-entropy, mean over classes, then mean over the batch.

    Equals ``torch.nn.MultiLabelSoftMarginLoss(weight=class_weight)`` on smoothed targets. The loss is computed in
    float32 so that it stays stable under autocast.

    Args:
        logits: float [B, C], unbounded.
        targets: float [B, C] in [0, 1] (soft values from mixing allowed).
        label_smoothing: binary smoothing applied to ``targets`` (see :func:`smooth_labels`).
        class_weight: optional float [C] multiplying each class's term (the mean still divides by C).

    Returns:
        Scalar float32 tensor, >= 0.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"logits and targets must both be [B, C], got {shapes}")
    z = logits.float()
    t = smooth_labels(targets.float(), label_smoothing)
    per_class = -(t * F.logsigmoid(z) + (1.0 - t) * F.logsigmoid(-z))  # [B, C]
    if class_weight is not None:
        per_class = per_class * class_weight.to(per_class)
    return per_class.mean(dim=1).mean()


def reconstruction_loss(
    maps: torch.Tensor,
    merged_maps: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "l1",
    option: str = "masked",
) -> torch.Tensor:
    """Puzzle-CAM's reconstruction loss between full-image maps and maps stitched from tiles.

    * ``masked``: ``mean_{b,c,i,j} d(A, A_re) * y[b,c]`` — the mean is over ALL B*C*h*w entries, absent classes count
      as zeros (the reference's ``masking``);
    * ``selection``: per sample, mean of ``d`` over the entries of its present classes (``y != 0``), then mean over
      the batch; a sample without any present class contributes 0 (the reference returns NaN there);
    * ``none``: plain mean of ``d``, no class mask.

    Args:
        maps: float [B, C, h, w], raw (pre-ReLU) class maps of the full images.
        merged_maps: float [B, C, h, w], the tile maps merged back (:func:`core.cam.puzzle.merge_tiles`).
        labels: float [B, C] in [0, 1], UNSMOOTHED image labels.
        kind: ``l1`` (absolute difference) or ``l2`` (squared difference); ``L1_Loss``/``L2_Loss`` also accepted.
        option: ``masked`` (alias ``masking``), ``selection`` or ``none``.

    Returns:
        Scalar tensor, >= 0.
    """
    kind_key = RECONSTRUCTION_KINDS.get(kind.lower())
    option_key = RECONSTRUCTION_OPTIONS.get(option.lower())
    if kind_key is None:
        raise ValueError(f"unknown reconstruction loss kind {kind!r}; use one of l1, l2")
    if option_key is None:
        raise ValueError(f"unknown reconstruction loss option {option!r}; use one of masked, selection, none")
    if maps.shape != merged_maps.shape:
        raise ValueError(
            f"full-image maps {tuple(maps.shape)} and merged tile maps {tuple(merged_maps.shape)} differ: "
            "the image height and width must be divisible by 2 x the output stride"
        )
    if labels.shape != maps.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match maps {tuple(maps.shape)} in [B, C]")

    diff = maps - merged_maps
    distance = diff.abs() if kind_key == "l1" else diff.pow(2)  # [B, C, h, w]
    if option_key == "none":
        return distance.mean()
    if option_key == "masked":
        return (distance * labels[:, :, None, None].to(distance)).mean()

    present = (labels != 0).to(distance)  # [B, C]
    per_class = distance.mean(dim=(2, 3))  # [B, C]
    per_sample = (per_class * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)
    return per_sample.mean()


def sigmoid_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of the sigmoid outputs, Mixup-CAM's uncertainty term ``L_ent`` (METHODS §12).

    ``-mean_{b,c} [p log p + (1 - p) log(1 - p)]`` with ``p = σ(z)``, computed from log-sigmoids in float32 so it
    stays finite for saturated logits. Maximal (``log 2``) at ``p = 0.5``, zero as ``|z| -> ∞``.

    Args:
        logits: float [B, C], unbounded (the classifier's outputs, not the labels).

    Returns:
        Scalar float32 tensor in [0, log 2] (nats).
    """
    z = logits.float()
    p = torch.sigmoid(z)
    return -(p * F.logsigmoid(z) + (1.0 - p) * F.logsigmoid(-z)).mean()


def concentration_loss(attention: torch.Tensor, weights: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """SCOPS' concentration loss: the spatial variance of each weighted class map around its centroid.

    Each map becomes a distribution ``π_c = (a_c + eps) / Σ(a_c + eps)`` over a grid spanning [-1, 1]² (row and
    column coordinates), with centroid ``μ_c = Σ π_c·(u, v)``; the loss is
    ``(1/B) Σ_b Σ_c w_bc Σ_{u,v} π_c(u, v) ‖(u, v) - μ_c‖²``. Zero for a single-pixel map with ``eps = 0``; grows
    with the map's spread (a uniform map on a large grid gives about 2/3 per unit weight).

    Args:
        attention: float [B, C, h, w] >= 0, e.g. the class-softmax of the ReLU'd CAMs.
        weights: float [B, C] >= 0, e.g. the (mixed) image labels: which classes count, and how much.
        eps: added to every entry before normalising (1e-3 in SCOPS and Mixup-CAM); keeps empty maps defined.

    Returns:
        Scalar float32 tensor >= 0.
    """
    if attention.dim() != 4 or weights.shape != attention.shape[:2]:
        raise ValueError(
            f"attention [B, C, h, w] and weights [B, C] expected, got {tuple(attention.shape)} and "
            f"{tuple(weights.shape)}"
        )
    batch, _, height, width = attention.shape
    mass = attention.float() + eps
    probs = mass / mass.sum(dim=(2, 3), keepdim=True)  # π: [B, C, h, w], sums to 1 per map
    rows = torch.linspace(-1.0, 1.0, height, device=probs.device) if height > 1 else probs.new_zeros(1)
    cols = torch.linspace(-1.0, 1.0, width, device=probs.device) if width > 1 else probs.new_zeros(1)
    row_mass, col_mass = probs.sum(dim=3), probs.sum(dim=2)  # marginals [B, C, h], [B, C, w]
    mean_row = (row_mass * rows).sum(dim=2, keepdim=True)  # [B, C, 1]
    mean_col = (col_mass * cols).sum(dim=2, keepdim=True)
    # ‖(u, v) - μ‖² separates into the row and column terms, each weighted by its marginal.
    variance = (row_mass * (rows - mean_row) ** 2).sum(dim=2) + (col_mass * (cols - mean_col) ** 2).sum(dim=2)
    return (variance * weights.float()).sum() / batch
