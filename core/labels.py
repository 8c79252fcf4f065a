"""The CAM -> label-map rules that CAM, random-walk and evaluation code share.

Conventions: ``keys`` are 1-based label-map indices (class ``c`` of a 0-based classifier output is key ``c + 1``;
0 is the background, :data:`IGNORE_INDEX` marks uncertain or unlabelled pixels). CAM planes exist only for the keys;
the background is a score chosen when the maps are read: a constant threshold or a per-pixel map such as
``1 - saliency``. Everywhere a pixel is foreground only where its best plane *beats* the background (ties go to the
background), as the reference's evaluator decides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.crf import crf_inference_label_maps

IGNORE_INDEX = 255


def foreground_keys(label: np.ndarray) -> np.ndarray:
    """Label-map keys (1..C) of the classes present in a multi-hot label float [C]: int64 [n]."""
    return np.flatnonzero(np.asarray(label) > 0).astype(np.int64) + 1


def check_keys(keys: Sequence[int] | np.ndarray) -> np.ndarray:
    """Keys as int64 [n], each a 1-based label-map index in 1..254 (0 is background, 255 ignore)."""
    key_array = np.asarray(keys, dtype=np.int64).reshape(-1)
    if key_array.size and (key_array.min() < 1 or key_array.max() >= IGNORE_INDEX):
        raise ValueError(f"keys must be label-map indices in 1..254 (0 is the background), got {key_array.tolist()}")
    return key_array


def _split_keys(hr_cam: np.ndarray, keys: Sequence[int] | np.ndarray) -> np.ndarray:
    """Keys as int64 [n] matching the planes; a leading background 0 (the ``.npy`` format's) is dropped."""
    key_array = np.asarray(keys, dtype=np.int64).reshape(-1)
    if key_array.size == hr_cam.shape[0] + 1 and key_array[0] == 0:
        key_array = key_array[1:]
    key_array = check_keys(key_array)
    if key_array.size != hr_cam.shape[0]:
        raise ValueError(f"{key_array.size} keys for {hr_cam.shape[0]} CAM planes")
    return key_array


def _argmax_labels(hr_cam: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max score float [H, W] (0 without planes) and the key of the best plane, uint8 [H, W]."""
    if hr_cam.ndim != 3:
        raise ValueError(f"expected CAMs [n, H, W], got shape {hr_cam.shape}")
    if hr_cam.shape[0] == 0:
        zeros = np.zeros(hr_cam.shape[1:], dtype=np.float32)
        return zeros, zeros.astype(np.uint8)
    lookup = keys.astype(np.uint8)
    return hr_cam.max(axis=0), lookup[hr_cam.argmax(axis=0)]


def cams_to_label_map(hr_cam: np.ndarray, keys: Sequence[int] | np.ndarray, threshold: float) -> np.ndarray:
    """Label map from CAMs with a constant background score: argmax of ``[threshold, cams...]``, ties to background.

    Args:
        hr_cam: float [n, H, W] in [0, 1].
        keys: int [n] 1-based label indices of the planes (or [n + 1] with a leading 0, as stored in ``.npy``).
        threshold: background score.

    Returns:
        uint8 [H, W]: 0 where the max CAM <= threshold, else the key of the arg-max plane.
    """
    key_array = _split_keys(hr_cam, keys)
    best, labels = _argmax_labels(hr_cam, key_array)
    return np.where(best > threshold, labels, 0).astype(np.uint8)


def label_map_with_ignore(
    hr_cam: np.ndarray, keys: Sequence[int] | np.ndarray, fg_threshold: float, bg_threshold: float
) -> np.ndarray:
    """Label map with an uncertain band: background, ignore (255) or the arg-max key.

    Args:
        hr_cam: float [n, H, W] in [0, 1].
        keys: int [n] 1-based label indices (or [n + 1] with a leading 0).
        fg_threshold: a pixel is foreground where its max CAM > fg_threshold.
        bg_threshold: a pixel is background where its max CAM <= bg_threshold; must be <= fg_threshold.

    Returns:
        uint8 [H, W]: 0 where max <= bg_threshold, 255 where bg_threshold < max <= fg_threshold, else the key.
    """
    if bg_threshold > fg_threshold:
        raise ValueError(f"bg_threshold {bg_threshold} must not exceed fg_threshold {fg_threshold}")
    key_array = _split_keys(hr_cam, keys)
    best, labels = _argmax_labels(hr_cam, key_array)
    out = np.where(best > fg_threshold, labels, np.uint8(IGNORE_INDEX))
    return np.where(best <= bg_threshold, 0, out).astype(np.uint8)


def compact_labels(hr_cam: np.ndarray, background: float | np.ndarray) -> np.ndarray:
    """0 where no plane beats ``background`` (ties go to the background), else 1 + the arg-max plane.

    The evaluator's decision rule (``core.evaluation``), with a constant or per-pixel background.

    Args:
        hr_cam: float [n, H, W] (n >= 0).
        background: a constant threshold or float [H, W] (e.g. ``1 - saliency``).

    Returns:
        int64 [H, W] in 0..n.
    """
    hr_cam = np.asarray(hr_cam, dtype=np.float32)
    if hr_cam.shape[0] == 0:
        return np.zeros(hr_cam.shape[1:], dtype=np.int64)
    winner = hr_cam.argmax(axis=0) + 1
    return np.where(hr_cam.max(axis=0) > np.asarray(background, dtype=np.float32), winner, 0).astype(np.int64)


def saliency_background(saliency: np.ndarray, sal_threshold: float | None = None) -> np.ndarray:
    """The background score a saliency map gives CAMs (the reference's ``--sal_dir`` rules, USERS §1.14).

    Args:
        saliency: float [H, W] in [0, 1], 1 = salient.
        sal_threshold: None: ``1 - s`` (a CAM must beat the non-saliency); a number t: 1 where ``s < t`` (there no
            CAM can win, ties go to the background) and 0 elsewhere (there any CAM above 0 wins).

    Returns:
        float32 [H, W] in [0, 1].
    """
    saliency = np.asarray(saliency, dtype=np.float32)
    if sal_threshold is None:
        return 1.0 - saliency
    return (saliency < np.float32(sal_threshold)).astype(np.float32)


def labels_after_crf(
    hr_cam: np.ndarray,
    keys: np.ndarray,
    backgrounds: Sequence[float | np.ndarray],
    image: np.ndarray | None,
    crf_t: int,
    crf_gt_prob: float,
) -> list[np.ndarray]:
    """Label maps int64 [H, W] (ids 0 and ``keys``), one per background score: ``argmax([background, cams...])``
    (ties go to the background), label-CRF-refined over ``max(n + 1, 2)`` labels when ``crf_t > 0`` (the maps share
    one CRF's pairwise terms, :func:`core.crf.crf_inference_label_maps`), mapped to keys.

    Args:
        hr_cam: float [n, H, W] in [0, 1], planes of ``keys``.
        keys: int [n], label-map ids 1..C.
        backgrounds: constant background scores or float [H, W] maps.
        image: uint8 [H, W, 3] RGB, needed when ``crf_t > 0``.
        crf_t: label-CRF iterations (0 = off).
        crf_gt_prob: label-CRF confidence in (0, 1).
    """
    compacts = [compact_labels(hr_cam, background) for background in backgrounds]  # 0 = bg, i = plane i - 1
    if crf_t > 0:
        if image is None:
            raise ValueError("the label CRF needs the image")
        n_labels = max(len(keys) + 1, 2)
        refined = crf_inference_label_maps(image, compacts, n_labels, t=crf_t, gt_prob=crf_gt_prob)
        compacts = [np.minimum(compact, len(keys)) for compact in refined]
    lookup = np.concatenate([[0], np.asarray(keys, dtype=np.int64)])
    return [lookup[compact] for compact in compacts]


def pseudo_mask(
    hr_cam: np.ndarray,
    keys: np.ndarray,
    background: float | np.ndarray,
    *,
    bg_threshold: float | None = None,
    image: np.ndarray | None = None,
    crf_t: int = 0,
    crf_gt_prob: float = 0.7,
) -> np.ndarray:
    """Pseudo label map from CAMs, as the evaluator decodes them (ties go to the background).

    Without a band: ``argmax([background, cams...])`` mapped to keys, optionally label-CRF refined over
    ``max(n + 1, 2)`` labels (the evaluator's ``--crf_t``). With ``bg_threshold`` (IRN's two-threshold scheme):
    the foreground map at ``background`` and the background map at ``bg_threshold`` are decoded (and CRF'd)
    separately; a pixel is its class where the first is foreground, 0 where the second is background, else 255.

    Args:
        hr_cam: float [n, H, W] in [0, 1], planes of ``keys``.
        keys: int [n], label-map ids 1..C of the planes.
        background: constant background score (threshold) or float [H, W] (e.g. ``1 - saliency``).
        bg_threshold: lower threshold of the uncertain band (<= ``background``); None = no band.
        image: uint8 [H, W, 3] RGB, needed when ``crf_t > 0``.
        crf_t: label-CRF iterations (0 = off).
        crf_gt_prob: label-CRF confidence in (0, 1).

    Returns:
        uint8 [H, W] with values in {0} U keys U {255}.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if bg_threshold is None:
        return labels_after_crf(hr_cam, keys, [background], image, crf_t, crf_gt_prob)[0].astype(np.uint8)
    if np.ndim(background) or bg_threshold > float(background):
        raise ValueError(f"bg_threshold {bg_threshold} needs a constant background threshold >= it")
    labels, low = labels_after_crf(hr_cam, keys, [background, bg_threshold], image, crf_t, crf_gt_prob)
    labels = np.where(labels == 0, IGNORE_INDEX, labels)
    labels = np.where(low == 0, 0, labels)
    return labels.astype(np.uint8)
