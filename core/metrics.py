"""Segmentation scores from confusion matrices, and a one-pass background-threshold sweep (pure numpy).

Definitions (SPEC §6), per class c with T = GT pixels, P = predicted pixels, TP = both, all over pixels whose GT is
not ``ignore_index``:

* ``IoU_c = TP / (T + P - TP)``; mIoU averages the classes whose union ``T + P - TP`` is non-empty (a class absent
  from both GT and prediction is left out and listed, not counted as 0);
* ``fp_c = (P - TP) / (T + P - TP)``, ``fn_c = (T - TP) / (T + P - TP)``, averaged over foreground classes (c >= 1)
  with a non-empty union;
* precision ``TP / P``, recall ``TP / T``.

All reported numbers are percentages in [0, 100]; undefined values are NaN.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)


def _flat_gt_rows(gt: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """GT as row indices intp [N]: classes 0..K-1, ignored pixels -> K (an extra row dropped later).

    Raises:
        ValueError: a GT value is neither a class nor ``ignore_index`` (wrong dataset or class count).
    """
    gt = np.asarray(gt).reshape(-1)
    if gt.dtype == np.uint8 and 0 <= ignore_index <= 255:
        # One table lookup maps and validates in a single pass over the (usually uint8) masks.
        lookup = np.full(256, -1, dtype=np.intp)
        lookup[: min(num_classes, 256)] = np.arange(min(num_classes, 256))
        lookup[ignore_index] = num_classes
        rows = lookup[gt]
    else:
        values = gt.astype(np.intp)
        rows = np.where(values == ignore_index, num_classes, values)
        rows[(values < 0) | ((values >= num_classes) & (values != ignore_index))] = -1
    if rows.size and rows.min() < 0:
        bad = np.unique(gt[rows < 0])
        raise ValueError(f"ground truth has values {bad.tolist()} outside 0..{num_classes - 1} and {ignore_index}")
    return rows


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX, void_column: bool = False
) -> np.ndarray:
    """Count (GT class, predicted class) pairs with one ``np.bincount``.

    Args:
        gt: int [H, W] (any shape), values 0..K-1 or ``ignore_index`` (those pixels are skipped).
        pred: int, same shape as ``gt``. Values outside 0..K-1 are allowed only with ``void_column``.
        num_classes: K, background included.
        ignore_index: GT value that is not scored.
        void_column: add a last column counting GT pixels whose prediction is outside 0..K-1 (e.g. a predicted
            255 scored as a miss): they count in T but in no class's P.

    Returns:
        int64 [K, K] (or [K, K+1] with ``void_column``); entry [g, p] = pixels with GT g predicted as p.

    Raises:
        ValueError: mismatched shapes, GT values out of range, or predictions out of range without ``void_column``.
    """
    pred = np.asarray(pred).reshape(-1)
    if np.asarray(gt).size != pred.size:
        raise ValueError(f"gt and pred differ in size: {np.shape(gt)} vs {np.shape(pred)}")
    rows = _flat_gt_rows(gt, num_classes, ignore_index)
    cols = num_classes + 1 if void_column else num_classes
    columns = pred.astype(np.intp)
    outside = (columns < 0) | (columns >= num_classes)
    if outside.any():
        scored = outside & (rows != num_classes)  # predictions on ignored GT pixels never count
        if scored.any() and not void_column:
            raise ValueError(f"predictions {np.unique(pred[scored]).tolist()} are outside 0..{num_classes - 1}")
        columns[outside] = num_classes if void_column else 0
    counts = np.bincount(rows * cols + columns, minlength=(num_classes + 1) * cols)
    return counts.reshape(num_classes + 1, cols)[:num_classes].astype(np.int64)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator * 100, NaN where the denominator is 0."""
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator * 100.0, denominator, out=out, where=denominator > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class and mean scores of one confusion matrix (see the module docstring for definitions).

    Args:
        conf: int [K, K] or [K, K+1] (last column = GT pixels with no valid prediction), rows = GT, cols = prediction.
        class_names: K names, background first.

    Returns:
        ``miou``, ``miou_fg``, ``fp``, ``fn`` (floats), ``iou``, ``precision``, ``recall``, ``fp_class``,
        ``fn_class`` (dicts name -> float), ``left_out`` (names of classes with an empty union), ``pixels`` (int);
        percentages in [0, 100], NaN where undefined.
    """
    conf = np.asarray(conf, dtype=np.int64)
    k = conf.shape[0]
    if len(class_names) != k or conf.shape[1] not in (k, k + 1):
        raise ValueError(f"confusion matrix {conf.shape} does not match {len(class_names)} class names")
    gt_total = conf.sum(axis=1)
    pred_total = conf[:, :k].sum(axis=0)
    true_pos = np.diagonal(conf[:, :k])
    union = gt_total + pred_total - true_pos
    iou = _ratio(true_pos, union)
    fp_class = _ratio(pred_total - true_pos, union)
    fn_class = _ratio(gt_total - true_pos, union)
    names = list(class_names)
    as_dict = lambda values: dict(zip(names, values.tolist(), strict=True))  # noqa: E731
    return {
        "miou": _nanmean(iou),
        "miou_fg": _nanmean(iou[1:]),
        "fp": _nanmean(fp_class[1:]),
        "fn": _nanmean(fn_class[1:]),
        "iou": as_dict(iou),
        "precision": as_dict(_ratio(true_pos, pred_total)),
        "recall": as_dict(_ratio(true_pos, gt_total)),
        "fp_class": as_dict(fp_class),
        "fn_class": as_dict(fn_class),
        "left_out": [name for name, u in zip(names, union, strict=True) if u == 0],
        "pixels": int(gt_total.sum()),
    }


class ThresholdSweep:
    """Confusion matrices for many background thresholds, accumulated in one read of each CAM file.

    With a constant background score t, a pixel is predicted ``keys[argmax_c cams_c]`` when ``max_c cams_c > t``
    and background otherwise (ties go to background, like an argmax with the background plane first). Per image we
    compute the max and the winning plane once, count (GT, winning plane, number of thresholds below the max) with
    one bincount, and turn the counts into per-threshold matrices with a cumulative sum over thresholds at the end.
    Thresholds are compared in float32, the precision of the CAM files (as the reference does by padding the
    float32 maps with the threshold).

    Predictions that are already label maps (PNG predictions, CRF output, a saliency background) are added to one
    threshold's matrix with :meth:`add_labels`. Partial sweeps from worker processes are summed with :meth:`merge`.

    Attributes:
        thresholds: float64 [T], in the order given (NaN for "no threshold", e.g. a saliency background).
        num_classes: K, background included.
        void_column: matrices carry the extra "no valid prediction" column (see :func:`confusion_matrix`).
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float | None], void_column: bool = False) -> None:
        self.num_classes = int(num_classes)
        self.thresholds = np.array([np.nan if t is None else t for t in thresholds], dtype=np.float64)
        if self.thresholds.ndim != 1 or self.thresholds.size == 0:
            raise ValueError("ThresholdSweep needs at least one threshold")
        self.void_column = bool(void_column)
        self._order = np.argsort(self.thresholds, kind="stable")
        self._sorted32 = self.thresholds[self._order].astype(np.float32)
        n_thr = self.thresholds.size
        # _counts[g, c, b]: GT g (row K = ignored), winning class c, b = number of thresholds below the max score.
        self._counts = np.zeros((self.num_classes + 1, self.num_classes, n_thr + 1), dtype=np.int64)
        self._direct = np.zeros((n_thr, self.num_classes, self._cols), dtype=np.int64)

    @property
    def _cols(self) -> int:
        return self.num_classes + 1 if self.void_column else self.num_classes

    def add(self, cams: np.ndarray, keys: np.ndarray, gt: np.ndarray, bg: np.ndarray | None = None) -> None:
        """Accumulate one image for every threshold (or, with ``bg``, for the single entry).

        Args:
            cams: float [n, H, W] (n >= 0), class scores; compared with the thresholds in float32.
            keys: int [n], label-map index of each plane (1..K-1).
            gt: uint8 [H, W], values 0..K-1 or 255.
            bg: optional float [H, W] background score (e.g. 1 - saliency); then the sweep must hold one entry and
                a pixel is foreground where its max score is strictly above ``bg``.
        """
        cams = np.asarray(cams)
        keys = np.asarray(keys, dtype=np.intp).reshape(-1)
        gt = np.asarray(gt)
        if cams.ndim != 3 or cams.shape[0] != keys.size or cams.shape[1:] != gt.shape:
            raise ValueError(f"cams {cams.shape}, keys {keys.shape} and gt {gt.shape} do not match")
        if keys.size and (keys.min() < 1 or keys.max() >= self.num_classes or np.unique(keys).size != keys.size):
            raise ValueError(f"keys {keys.tolist()} must be distinct classes in 1..{self.num_classes - 1}")
        if bg is not None:
            if self.thresholds.size != 1:
                raise ValueError("a background plane gives one prediction; build the sweep with a single entry")
            best, plane = _max_and_plane(cams)
            fg = best.reshape(gt.shape) > np.asarray(bg, dtype=np.float32)  # ties go to background
            labels = keys[plane.reshape(gt.shape)] if keys.size else np.zeros(gt.shape, dtype=np.intp)
            self.add_labels(np.where(fg, labels, 0), gt, index=0)
            return
        if np.isnan(self.thresholds).any():
            raise ValueError("thresholds must be numbers when no background plane is given")
        self._add_sweep(cams, keys, gt)

    def _add_sweep(self, cams: np.ndarray, keys: np.ndarray, gt: np.ndarray) -> None:
        """One bincount over (GT value, winning plane, number of thresholds below the max score)."""
        if gt.dtype != np.uint8:
            gt = _as_uint8_mask(gt)
        n = max(keys.size, 1)  # an image without planes counts as one plane that never clears a threshold
        n_bins = self.thresholds.size + 1
        index = _sweep_index(cams, gt.reshape(-1), self._sorted32, _thread_scratch())
        # All 256 GT values are counted; rows other than 0..K-1 and 255 must stay empty.
        counts = np.bincount(index, minlength=256 * n * n_bins).reshape(256, n, n_bins)
        invalid = np.flatnonzero(counts[self.num_classes :].sum(axis=(1, 2))) + self.num_classes
        invalid = invalid[invalid != IGNORE_INDEX]
        if invalid.size:
            raise ValueError(f"ground truth has values {invalid.tolist()} outside 0..{self.num_classes - 1} and 255")
        counts = np.concatenate([counts[: self.num_classes], counts[IGNORE_INDEX : IGNORE_INDEX + 1]])
        if keys.size:
            self._counts[:, keys, :] += counts
        else:
            self._counts[:, 0, :] += counts[:, 0, :]

    def add_labels(self, pred: np.ndarray, gt: np.ndarray, index: int = 0) -> None:
        """Accumulate a finished label map into the matrix of threshold ``index``.

        Args:
            pred: int [H, W], class indices (outside 0..K-1 only with ``void_column``).
            gt: uint8 [H, W], values 0..K-1 or 255.
            index: position of the threshold in :attr:`thresholds`.
        """
        self._direct[index] += confusion_matrix(gt, pred, self.num_classes, void_column=self.void_column)

    def merge(self, other: ThresholdSweep) -> ThresholdSweep:
        """Add another sweep's counts (same classes and thresholds) into this one; returns self."""
        same = np.array_equal(self.thresholds, other.thresholds, equal_nan=True)
        if other.num_classes != self.num_classes or not same or other.void_column != self.void_column:
            raise ValueError("cannot merge sweeps with different classes, thresholds or void columns")
        self._counts += other._counts
        self._direct += other._direct
        return self

    @property
    def confusion(self) -> np.ndarray:
        """int64 [T, K, K] (or [T, K, K+1] with ``void_column``), one confusion matrix per threshold."""
        counts = self._counts[: self.num_classes]  # drop the ignored-GT row
        # Pixels whose max lies above sorted threshold j are foreground at j: reverse cumulative sum over bins.
        above_sorted = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # [K, K, T]
        fg = np.moveaxis(above_sorted, -1, 0).copy()  # [T(sorted), K, K]
        totals = counts.sum(axis=(1, 2))  # [K] scored pixels per GT class
        # Whatever no class took is background (column 0 only collects images without planes, all below).
        fg[:, :, 0] = totals[None, :] - fg[:, :, 1:].sum(axis=2)
        matrices = np.zeros_like(fg)
        matrices[self._order] = fg
        if self.void_column:
            matrices = np.concatenate([matrices, np.zeros(matrices.shape[:2] + (1,), np.int64)], axis=2)
        return matrices + self._direct

    def scores(self, class_names: Sequence[str]) -> list[dict[str, Any]]:
        """:func:`scores_from_confusion` for every threshold, each with its ``threshold`` (None if NaN)."""
        results = []
        for threshold, conf in zip(self.thresholds, self.confusion, strict=True):
            result = scores_from_confusion(conf, class_names)
            result["threshold"] = None if np.isnan(threshold) else float(threshold)
            results.append(result)
        return results


def best_index(results: Sequence[dict[str, Any]]) -> int:
    """Index of the highest mIoU (first one on ties; NaN never wins unless all are NaN)."""
    mious = np.array([r["miou"] for r in results], dtype=np.float64)
    if np.isnan(mious).all():
        return 0
    return int(np.nanargmax(mious))


def _max_and_plane(cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max score float32 [N] and the index of the first plane reaching it, uint8/uint16 [N].

    With no plane the max is -inf (never above a threshold) and the plane index 0. Ties keep the first plane, as
    ``np.argmax`` does; this loop over the (few) planes is several times faster than ``argmax(axis=0)``.
    """
    n = cams.shape[0]
    pixels = cams.shape[1] * cams.shape[2]
    index_type = np.uint8 if n <= 256 else np.uint16
    if n == 0:
        return np.full(pixels, -np.inf, dtype=np.float32), np.zeros(pixels, dtype=index_type)
    planes = cams.reshape(n, pixels)
    if planes.dtype != np.float32:
        planes = planes.astype(np.float32)
    best = planes[0].copy()
    plane = np.zeros(pixels, dtype=index_type)
    higher = np.empty(pixels, dtype=bool)
    for j in range(1, n):
        np.greater(planes[j], best, out=higher)  # strictly greater: the first plane wins ties
        np.maximum(best, planes[j], out=best)
        # plane = j where higher, else unchanged; arithmetic on small ints is faster than np.where.
        plane -= (plane - index_type(j)) * higher
    return best, plane


class _Scratch:
    """Per-pixel buffers reused from image to image.

    A sweep touches ~10 arrays of H*W elements per image; allocating them fresh costs page faults that take longer
    than the arithmetic, so they are kept (grown when a larger image comes).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type) -> np.ndarray:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.size < size:
            buffer = self._buffers[name] = np.empty(size, dtype=dtype)
        return buffer[:size]


_local = threading.local()


def _thread_scratch() -> _Scratch:
    """This thread's scratch buffers, shared by every sweep it runs (workers score many chunks in turn)."""
    if not hasattr(_local, "scratch"):
        _local.scratch = _Scratch()
    return _local.scratch


def _smallest_uint(max_value: int) -> type:
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if max_value <= np.iinfo(t).max)


def _sweep_index(cams: np.ndarray, gt: np.ndarray, sorted_thresholds: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """Per-pixel bin ``gt * group + plane * n_bins + below`` for one image, computed in reused small-int buffers.

    Args:
        cams: float [n, H, W]; ``plane`` is the first plane reaching the max score (ties -> first, as np.argmax).
        gt: uint8 [H*W].
        sorted_thresholds: float32 [T] ascending; ``below`` = how many are strictly below the max score.
        scratch: buffers to reuse.

    Returns:
        unsigned int [H*W] (a view of a scratch buffer, valid until the next call), with
        ``group = max(n, 1) * (T + 1)`` and ``n_bins = T + 1``.
    """
    n, pixels = cams.shape[0], gt.size
    n_bins = sorted_thresholds.size + 1
    group = max(n, 1) * n_bins
    code_type, index_type = _smallest_uint(group - 1), _smallest_uint(256 * group - 1)
    code = scratch.get("code", pixels, code_type)
    code.fill(0)
    if n:
        planes = cams.reshape(n, pixels)
        if planes.dtype != np.float32:
            planes = planes.astype(np.float32)
        mask = scratch.get("mask", pixels, np.bool_)
        step = scratch.get("step", pixels, code_type)
        best = planes[0]  # read-only use when there is one plane (most VOC images); copied before updating
        if n > 1:
            best = scratch.get("best", pixels, np.float32)
            np.copyto(best, planes[0])
        for j in range(1, n):
            np.greater(planes[j], best, out=mask)  # strictly greater: the first plane keeps ties
            np.maximum(best, planes[j], out=best)
            # code = j where mask, in place on small ints (several times faster than np.where or np.argmax(axis=0)).
            np.subtract(code, code_type(j), out=step)
            np.multiply(step, mask.view(np.uint8), out=step)
            np.subtract(code, step, out=code)
        if n > 1:
            np.multiply(code, code_type(n_bins), out=code)
        for threshold in sorted_thresholds:
            np.greater(best, threshold, out=mask)
            np.add(code, mask.view(np.uint8), out=code)
    index = scratch.get("index", pixels, index_type)
    np.multiply(gt, index_type(group), out=index, dtype=index_type)
    np.add(index, code, out=index)
    return index


def _as_uint8_mask(gt: np.ndarray) -> np.ndarray:
    """An integer mask as uint8 (ValueError if a value does not fit, which no valid mask has)."""
    if gt.size and (gt.min() < 0 or gt.max() > 255):
        raise ValueError(f"ground truth values must lie in 0..255, got [{gt.min()}, {gt.max()}]")
    return gt.astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Saliency maps: MAE and F-beta
# --------------------------------------------------------------------------------------------------------------------

SALIENCY_LEVELS = 256
FBETA_SQUARED = 0.3  # beta^2 of the salient-object-detection literature: precision weighs more than recall


class SaliencyScores:
    """MAE and the F-beta curve of saliency maps against binary ground truth, accumulated image by image.

    The conventions of salient-object detection (as in PoolNet's and EPS's tables), all values in [0, 1]:

    * MAE: per image the mean ``|s - g|`` over its scored pixels (``g`` in {0, 1}), averaged over images;
    * F-beta: a map is quantised to 256 levels ``round(255 s)``; at level ``k`` (0..255) a pixel is salient when its
      level is >= k. Per image ``precision_k = TP_k / P_k`` (0 when nothing is predicted) and ``recall_k = TP_k / T``;
      both are averaged over the images that have salient GT pixels (recall is undefined without them), then
      ``F_k = (1 + b²) P R / (b² P + R)`` with ``b² = 0.3``; the reported value is ``max_k F_k``.

    Each image costs two ``np.bincount`` over its pixels; worker partials are summed with :meth:`merge`.
    """

    def __init__(self, beta_squared: float = FBETA_SQUARED) -> None:
        self.beta_squared = float(beta_squared)
        self.precision_sum = np.zeros(SALIENCY_LEVELS, dtype=np.float64)
        self.recall_sum = np.zeros(SALIENCY_LEVELS, dtype=np.float64)
        self.curve_images = 0  # images with salient GT pixels (the F-beta curve averages over them)
        self.mae_sum = 0.0
        self.mae_images = 0  # images with any scored pixel

    def add(self, saliency: np.ndarray, gt: np.ndarray) -> None:
        """Accumulate one image.

        Args:
            saliency: float [H, W] in [0, 1], the foreground score.
            gt: uint8 [H, W]: 0 = background, ``IGNORE_INDEX`` = not scored, any other value = salient.
        """
        saliency = np.asarray(saliency, dtype=np.float32)
        gt = np.asarray(gt)
        if saliency.shape != gt.shape:
            raise ValueError(f"saliency {saliency.shape} and gt {gt.shape} differ in shape")
        valid = gt != IGNORE_INDEX
        scores = np.clip(saliency[valid], 0.0, 1.0)
        if scores.size == 0:
            return
        salient = gt[valid] != 0
        self.mae_sum += float(np.abs(scores - salient).mean(dtype=np.float64))
        self.mae_images += 1
        total = int(salient.sum())
        if total == 0:
            return
        levels = np.rint(scores * (SALIENCY_LEVELS - 1)).astype(np.intp)
        # predicted[k] = pixels at level >= k, hits[k] = salient ones among them: reversed cumulative histograms.
        predicted = np.cumsum(np.bincount(levels, minlength=SALIENCY_LEVELS)[::-1])[::-1]
        hits = np.cumsum(np.bincount(levels[salient], minlength=SALIENCY_LEVELS)[::-1])[::-1]
        precision = np.zeros(SALIENCY_LEVELS)
        np.divide(hits, predicted, out=precision, where=predicted > 0)
        self.precision_sum += precision
        self.recall_sum += hits / total
        self.curve_images += 1

    def merge(self, other: SaliencyScores) -> SaliencyScores:
        """Add another accumulator's sums (same beta) into this one; returns self."""
        if other.beta_squared != self.beta_squared:
            raise ValueError("cannot merge saliency scores with different beta")
        self.precision_sum += other.precision_sum
        self.recall_sum += other.recall_sum
        self.curve_images += other.curve_images
        self.mae_sum += other.mae_sum
        self.mae_images += other.mae_images
        return self

    def scores(self) -> dict[str, Any]:
        """``mae``, ``max_fbeta``, the level where it is reached (``fbeta_threshold`` = k/255) and its ``precision``
        and ``recall``, ``beta_squared``, and the image counts; NaN where no image defines the value."""
        mae = self.mae_sum / self.mae_images if self.mae_images else float("nan")
        result = {"mae": mae, "beta_squared": self.beta_squared, "images": self.mae_images}
        result["images_with_foreground"] = self.curve_images
        if not self.curve_images:
            nan = float("nan")
            return {**result, "max_fbeta": nan, "fbeta_threshold": None, "precision": nan, "recall": nan}
        precision = self.precision_sum / self.curve_images
        recall = self.recall_sum / self.curve_images
        denominator = self.beta_squared * precision + recall
        fbeta = np.zeros(SALIENCY_LEVELS)
        np.divide((1 + self.beta_squared) * precision * recall, denominator, out=fbeta, where=denominator > 0)
        best = int(np.argmax(fbeta))
        return {
            **result,
            "max_fbeta": float(fbeta[best]),
            "fbeta_threshold": best / (SALIENCY_LEVELS - 1),
            "precision": float(precision[best]),
            "recall": float(recall[best]),
        }
