"""Dense CRF refinement (pydensecrf) of class probabilities or label maps.

Two presets, as in the P-NOC reference (SPEC §6, METHODS §15):

* :func:`crf_inference_probs`: DeepLab-v2 softmax CRF, unary ``-log p``; Gaussian ``sxy=1, compat=3``; bilateral
  ``sxy=67, srgb=3, compat=4``; ``t=10`` mean-field iterations. Used on score maps (segmentation predictions, or
  evaluation with ``--crf_gt_prob 1``).
* :func:`crf_inference_labels`: label CRF, unary from a hard label map trusted with probability ``gt_prob``
  (``zero_unsure=False``: label 0 is a class like any other); Gaussian ``sxy=3, compat=3``; bilateral ``sxy=50,
  srgb=5, compat=10``; ``t=10``, ``gt_prob=0.7``. Used on thresholded CAMs, affinity labels and pseudo masks.

``pydensecrf`` (PyPI package ``pydensecrf2``) is imported lazily, so nothing but the CRF itself needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from core.errors import WSSSError

logger = logging.getLogger(__name__)


def _densecrf() -> tuple[ModuleType, ModuleType]:
    """The ``pydensecrf.densecrf`` and ``pydensecrf.utils`` modules, or a WSSSError saying how to install them."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError as e:
        raise WSSSError(f"dense CRF needs pydensecrf ({e}); pip install pydensecrf2, or run with --crf_t 0") from e
    return densecrf, utils


def _check_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 C-contiguous writable [H, W, 3] (what DenseCRF2D.addPairwiseBilateral requires: its memoryview refuses
    read-only arrays such as ``np.asarray(PIL image)``)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != (height, width):
        raise ValueError(f"CRF image must be [{height}, {width}, 3] RGB, got shape {image.shape}")
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return image if image.flags.writeable else image.copy()


def _run(
    crf: Any,
    image: np.ndarray,
    t: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
) -> np.ndarray:
    """Add both pairwise terms, run ``t`` mean-field steps; returns marginals float32 [n_labels, H*W]."""
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
    return np.asarray(crf.inference(int(t)), dtype=np.float32)


def crf_inference_probs(
    image: np.ndarray,
    probs: np.ndarray,
    t: int = 10,
    gaussian_sxy: float = 1,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 67,
    bilateral_srgb: float = 3,
    bilateral_compat: float = 4,
) -> np.ndarray:
    """Refine class probabilities with the DeepLab-v2 softmax CRF.

    Args:
        image: uint8 [H, W, 3] RGB.
        probs: float [K, H, W], K >= 2, non-negative scores (not necessarily normalised; values are clipped to
            [1e-5, 1] before ``-log``, as ``unary_from_softmax`` does).
        t: mean-field iterations.

    Returns:
        float32 [K, H, W], the CRF marginals (each pixel sums to 1).
    """
    densecrf, utils = _densecrf()
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"probs must be [K >= 2, H, W], got shape {probs.shape}")
    n_labels, height, width = probs.shape
    image = _check_image(image, height, width)
    crf = densecrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probs)))
    marginals = _run(crf, image, t, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat)
    return marginals.reshape(n_labels, height, width)


def crf_inference_labels(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    t: int = 10,
    gt_prob: float = 0.7,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 50,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 10,
) -> np.ndarray:
    """Refine a hard label map with the label CRF.

    Args:
        image: uint8 [H, W, 3] RGB.
        labels: int [H, W], compact label indices 0..n_labels-1 (map class ids to compact indices first).
        n_labels: number of labels, >= 2.
        t: mean-field iterations.
        gt_prob: confidence in the given labels, in (0, 1).

    Returns:
        int64 [H, W], refined compact labels (argmax of the marginals).
    """
    pairwise = (gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat)
    return crf_inference_label_maps(image, [labels], n_labels, t, gt_prob, *pairwise)[0]


def crf_inference_label_maps(
    image: np.ndarray,
    label_maps: Sequence[np.ndarray],
    n_labels: int,
    t: int = 10,
    gt_prob: float = 0.7,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 50,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 10,
) -> list[np.ndarray]:
    """:func:`crf_inference_labels` of several label maps of one image (same ``n_labels``), with the pairwise terms
    built once: the bilateral lattice is most of a label CRF's time at t <= 10, so two maps (e.g. the foreground and
    background decodings of affinity labels) cost little more than one. Each result equals a separate call's.

    Returns:
        int64 [H, W] per map, refined compact labels.
    """
    densecrf, utils = _densecrf()
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must lie in (0, 1), got {gt_prob}; use crf_inference_probs for probabilities")
    n_labels = int(n_labels)
    maps = [np.asarray(labels) for labels in label_maps]
    if not maps or any(labels.ndim != 2 or labels.shape != maps[0].shape for labels in maps):
        raise ValueError(f"label maps must be [H, W] of one size, got shapes {[m.shape for m in maps]}")
    if n_labels < 2 or any(m.size and (m.min() < 0 or m.max() >= n_labels) for m in maps):
        raise ValueError(f"labels must lie in 0..{n_labels - 1} with n_labels >= 2")
    height, width = maps[0].shape
    image = _check_image(image, height, width)
    crf = densecrf.DenseCRF2D(width, height, n_labels)
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
    refined = []
    for labels in maps:
        unary = utils.unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
        crf.setUnaryEnergy(np.ascontiguousarray(unary))
        marginals = np.asarray(crf.inference(int(t)), dtype=np.float32)
        refined.append(np.argmax(marginals.reshape(n_labels, height, width), axis=0))
    return refined


def crf_refine_label_map(
    image: np.ndarray, label_map: np.ndarray, t: int = 10, gt_prob: float = 0.7, **kwargs: Any
) -> np.ndarray:
    """Label CRF on a map of arbitrary class ids (e.g. {0, 3, 15, 255}), returning the same ids.

    The ids present are mapped to compact indices, refined with :func:`crf_inference_labels` over
    ``max(#ids, 2)`` labels, and mapped back (so a refined pixel only takes an id already in the map).

    Args:
        image: uint8 [H, W, 3] RGB.
        label_map: int [H, W], any ids.

    Returns:
        [H, W] with the dtype of ``label_map``.
    """
    label_map = np.asarray(label_map)
    ids, compact = np.unique(label_map, return_inverse=True)
    refined = crf_inference_labels(
        image, compact.reshape(label_map.shape), max(len(ids), 2), t=t, gt_prob=gt_prob, **kwargs
    )
    return ids[np.minimum(refined, len(ids) - 1)].astype(label_map.dtype, copy=False)


def describe_crf(t: int, gt_prob: float, probabilities: bool) -> str:
    """One-line name of the CRF setting for result headers, e.g. ``label CRF t=10 gt_prob=0.7``."""
    if t <= 0:
        return "off"
    if probabilities:
        return f"DeepLab-v2 softmax CRF t={t} (gaussian sxy 1 compat 3; bilateral sxy 67 srgb 3 compat 4)"
    return f"label CRF t={t} gt_prob={gt_prob} (gaussian sxy 3 compat 3; bilateral sxy 50 srgb 5 compat 10)"
