"""Score a folder of predictions against ground truth: CAM files (with a background-threshold sweep), label-map PNGs
or saliency PNGs, optionally after a dense CRF.

One pass over the files: each worker reads every prediction file and its GT once and accumulates the confusion
matrices of all thresholds (:class:`core.metrics.ThresholdSweep`); the parent merges the partial sweeps. Nothing is
read before every expected file has been found, and a failing file stops the run with its name (no partial mIoU).

Modes:
    * ``npy``: CAM files ``<id>.npz`` (legacy ``<id>.npy`` with ``allow_pickle``); background = a constant
      threshold (swept) or ``1 - saliency`` from ``sal_dir``;
    * ``png``: label maps ``<id>.png`` (0..C, 255); a predicted 255 counts per ``pred_ignore``;
    * ``saliency``: saliency PNGs scored as a 2-class problem (foreground = any class 1..C), thresholds on the
      saliency.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import artifacts
from core.crf import crf_inference_labels, crf_inference_probs, crf_refine_label_map, describe_crf
from core.errors import WSSSError, first_ids
from core.labels import IGNORE_INDEX, compact_labels
from core.metrics import ThresholdSweep, best_index
from core.parallel import chunked, parallel_map

logger = logging.getLogger(__name__)

MODES = ("npy", "png", "saliency")
PRED_IGNORE_POLICIES = ("miss", "background", "exclude")
SALIENCY_CLASSES = ("background", "foreground")


def threshold_range(min_th: float, max_th: float, step_th: float) -> list[float]:
    """Thresholds ``min_th, min_th + step_th, ...`` up to ``max_th`` inclusive, free of float-step drift.

    ``threshold_range(0.05, 0.80, 0.05)`` gives the 16 values 0.05 ... 0.80 (``np.arange`` would give 15 or 16
    depending on rounding).
    """
    if not step_th > 0 or not max_th >= min_th:  # `not` also catches NaN
        raise WSSSError(f"empty threshold range {min_th}..{max_th} step {step_th}; check --min_th/--max_th/--step_th")
    count = int(math.floor((max_th - min_th) / step_th + 1e-6)) + 1
    return [round(min_th + i * step_th, 10) for i in range(count)]


@dataclass(frozen=True)
class EvalJob:
    """Everything a worker needs to score its share of the ids (sent to each worker once)."""

    source: Any  # core.datasets.DataSource: read_mask(id), read_image(id), classes
    mode: str
    thresholds: tuple[float | None, ...]
    num_classes: int
    sal_dir: Path | None = None
    crf_t: int = 0
    crf_gt_prob: float = 0.7
    pred_ignore: str = "miss"
    allow_pickle: bool = False

    def new_sweep(self) -> ThresholdSweep:
        # Only a predicted 255 counted as a miss needs the extra "no class" column.
        miss_column = self.mode == "png" and self.pred_ignore == "miss"
        return ThresholdSweep(self.num_classes, self.thresholds, void_column=miss_column)


@dataclass
class EvaluationResult:
    """Scores of every threshold, which one is best, and the protocol that produced them."""

    class_names: list[str]
    results: list[dict[str, Any]]
    best: int
    confusion: np.ndarray  # int64 [T, K, K(+1)]
    protocol: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The JSON document of ``scripts/evaluate.py --json``; percentages in [0, 100]."""
        best = self.results[self.best]
        return {
            "miou": best["miou"],
            "miou_fg": best["miou_fg"],
            "iou": best["iou"],
            "threshold": best["threshold"],
            "fp": best["fp"],
            "fn": best["fn"],
            "precision": best["precision"],
            "recall": best["recall"],
            "fp_class": best["fp_class"],
            "fn_class": best["fn_class"],
            "left_out": best["left_out"],
            "sweep": [{key: r[key] for key in ("threshold", "miou", "fp", "fn")} for r in self.results],
            "protocol": self.protocol,
        }


# --------------------------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------------------------


def prediction_paths(
    ids: Sequence[str], pred_dir: Path, mode: str, allow_pickle: bool, domain: str, source: Any = None
) -> list[Path]:
    """The prediction file of every id, or a WSSSError listing the missing ones before any work starts.

    In ``npy`` mode ``<id>.npz`` is preferred and a legacy ``<id>.npy`` accepted (it needs ``allow_pickle``). With
    ``source``, missing ids whose image-level label has no foreground class are told apart: CAM inference writes no
    file for them by default, so "run inference" would not help.
    """
    if not pred_dir.is_dir():
        raise WSSSError(f"prediction folder {pred_dir} does not exist; check --experiment_name/--pred_dir")
    suffixes = (artifacts.CAM_SUFFIX, artifacts.LEGACY_CAM_SUFFIX) if mode == "npy" else (artifacts.PNG_SUFFIX,)
    paths: list[Path] = []
    missing: list[str] = []
    for image_id in ids:
        found = next((p for p in (pred_dir / f"{image_id}{s}" for s in suffixes) if p.is_file()), None)
        if found is None:
            missing.append(image_id)
        else:
            paths.append(found)
    if missing:
        raise WSSSError(_describe_missing(missing, len(ids), pred_dir, mode, domain, source))
    legacy = next((p for p in paths if p.suffix == artifacts.LEGACY_CAM_SUFFIX), None)
    if legacy is not None and not allow_pickle:
        raise WSSSError(
            f"{pred_dir} holds legacy pickled .npy CAM files (e.g. {legacy.name}); "
            "pass --allow_pickle to read them (only for files you trust)"
        )
    return paths


def _without_foreground(source: Any, image_id: str) -> bool:
    """True when the id's image-level label is known and has no foreground class (e.g. a VOC XML without objects)."""
    try:
        label = source.label(image_id) if hasattr(source, "label") else None
    except WSSSError:
        return False
    return label is not None and not np.any(np.asarray(label) > 0)


def _describe_missing(missing: list[str], total: int, pred_dir: Path, mode: str, domain: str, source: Any) -> str:
    no_foreground = [i for i in missing if _without_foreground(source, i)] if source is not None else []
    others = [i for i in missing if i not in set(no_foreground)]
    parts = []
    if others:
        parts.append(
            f"{len(others)} of {total} predictions missing in {pred_dir} (first: {first_ids(others)}); "
            f"run inference for domain {domain} first"
        )
    if no_foreground:
        if mode == "npy":
            fix = "rerun scripts/cam/inference.py with --exclude_bg_images false to score them as all background"
        else:
            fix = "rerun scripts/cam/make_pseudo_masks.py with --fill_missing_as_background true"
        parts.append(
            f"{len(no_foreground)} of {total} ids have no prediction in {pred_dir} because their image-level labels "
            f"have no foreground class (first: {first_ids(no_foreground)}), so no file was written for them: {fix}, "
            "or evaluate a --domain list without them"
        )
    return "; ".join(parts)


def saliency_paths(ids: Sequence[str], sal_dir: Path) -> None:
    """Raise a WSSSError unless every ``<sal_dir>/<id>.png`` exists."""
    if not sal_dir.is_dir():
        raise WSSSError(f"saliency folder {sal_dir} does not exist; check --sal_dir")
    missing = [i for i in ids if not (sal_dir / f"{i}{artifacts.PNG_SUFFIX}").is_file()]
    if missing:
        raise WSSSError(
            f"{len(missing)} of {len(ids)} saliency maps missing in {sal_dir} (first: {first_ids(missing)}); "
            "make them first"
        )


# --------------------------------------------------------------------------------------------------------------------
# Scoring one file (runs in the workers)
# --------------------------------------------------------------------------------------------------------------------


def _check_size(path: Path, what: str, size: tuple[int, ...], gt: np.ndarray, source: Any, image_id: str) -> None:
    if tuple(size) != gt.shape:
        mask = source.mask_path(image_id) if hasattr(source, "mask_path") else image_id
        raise WSSSError(
            f"{path}: {what} is {size[0]}x{size[1]} but the ground truth {mask} is {gt.shape[0]}x{gt.shape[1]}; "
            "the predictions belong to other images (check --dataset, --domain and --pred_dir)"
        )


def _add_cams_with_crf(
    job: EvalJob,
    sweep: ThresholdSweep,
    cams: np.ndarray,
    keys: np.ndarray,
    gt: np.ndarray,
    image: np.ndarray,
    bg: np.ndarray | None,
) -> None:
    """CRF each threshold's prediction (or the saliency-background one), then count it."""
    lookup = np.concatenate([[0], keys]).astype(np.int64)
    backgrounds = [bg] if bg is not None else list(job.thresholds)
    for index, background in enumerate(backgrounds):
        if job.crf_gt_prob >= 1:
            # Probability CRF on the score planes [background, cams...] (DeepLab-v2 settings).
            plane = np.broadcast_to(np.asarray(background, dtype=np.float32), gt.shape)[None]
            marginals = crf_inference_probs(image, np.concatenate([plane, cams]), t=job.crf_t)
            compact = marginals.argmax(axis=0)
        else:
            compact = crf_inference_labels(
                image, compact_labels(cams, background), max(len(keys) + 1, 2), t=job.crf_t, gt_prob=job.crf_gt_prob
            )
        sweep.add_labels(lookup[np.minimum(compact, len(keys))], gt, index=index)


def _score_cams(job: EvalJob, sweep: ThresholdSweep, image_id: str, path: Path, gt: np.ndarray) -> None:
    if job.mode == "saliency":
        saliency = artifacts.load_saliency(path)
        _check_size(path, "the saliency map", saliency.shape, gt, job.source, image_id)
        cams, keys = saliency[None], np.array([1], dtype=np.int64)
        gt = np.where(gt == IGNORE_INDEX, IGNORE_INDEX, np.minimum(gt, 1)).astype(np.uint8)
    else:
        mask = job.source.mask_path(image_id) if hasattr(job.source, "mask_path") else image_id
        cam_file = artifacts.load_cam(
            path,
            allow_pickle=job.allow_pickle,
            with_cam=False,
            size=gt.shape,
            num_classes=job.num_classes - 1,
            size_of=f"the ground truth {mask}",
        )
        cams, keys = cam_file.hr_cam, cam_file.keys
    bg = None
    if job.sal_dir is not None:
        sal_path = job.sal_dir / f"{image_id}{artifacts.PNG_SUFFIX}"
        saliency = artifacts.load_saliency(sal_path)
        _check_size(sal_path, "the saliency map", saliency.shape, gt, job.source, image_id)
        bg = 1.0 - saliency
    if job.crf_t > 0:
        _add_cams_with_crf(job, sweep, cams, keys, gt, job.source.read_image(image_id), bg)
    else:
        sweep.add(cams, keys, gt, bg=bg)


def _score_label_map(job: EvalJob, sweep: ThresholdSweep, image_id: str, path: Path, gt: np.ndarray) -> None:
    pred = artifacts.load_label_map(path)
    _check_size(path, "the label map", pred.shape, gt, job.source, image_id)
    if job.crf_t > 0:
        pred = crf_refine_label_map(job.source.read_image(image_id), pred, t=job.crf_t, gt_prob=job.crf_gt_prob)
    unknown = (pred >= job.num_classes) & (pred != IGNORE_INDEX)
    if unknown.any():
        found = np.unique(pred[unknown]).tolist()
        raise WSSSError(f"{path} has class ids {found} beyond the {job.num_classes - 1} classes of --dataset")
    void = pred == IGNORE_INDEX
    if job.pred_ignore == "background":
        pred = np.where(void, 0, pred)
    elif job.pred_ignore == "exclude":
        gt = np.where(void, IGNORE_INDEX, gt).astype(np.uint8)
    sweep.add_labels(pred, gt, index=0)


def score_files(job: EvalJob, items: Sequence[tuple[str, Path]]) -> ThresholdSweep:
    """Partial sweep over ``(image_id, prediction path)`` pairs; any unexpected failure names the file."""
    sweep = job.new_sweep()
    for image_id, path in items:
        try:
            gt = job.source.read_mask(image_id)
            if job.mode == "png":
                _score_label_map(job, sweep, image_id, path, gt)
            else:
                _score_cams(job, sweep, image_id, path, gt)
        except WSSSError:
            raise
        except Exception as e:
            raise RuntimeError(f"while scoring {path}: {type(e).__name__}: {e}") from e
    return sweep


# --------------------------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------------------------


def evaluate_predictions(
    source: Any,
    pred_dir: str | Path,
    mode: str = "npy",
    thresholds: Sequence[float | None] = (None,),
    *,
    sal_dir: str | Path | None = None,
    crf_t: int = 0,
    crf_gt_prob: float = 0.7,
    pred_ignore: str = "miss",
    allow_pickle: bool = False,
    num_workers: int = 1,
    ids: Sequence[str] | None = None,
    progress: bool | None = None,
) -> EvaluationResult:
    """Score the predictions of ``source``'s ids in ``pred_dir``.

    Args:
        source: data source (``ids``, ``classes``, ``domain``, ``read_mask``, ``read_image``, ``mask_path``).
        pred_dir: folder of ``<id>.npz``/``<id>.npy`` (npy) or ``<id>.png`` (png, saliency).
        mode: ``npy``, ``png`` or ``saliency``.
        thresholds: background thresholds to sweep (npy/saliency); ``(None,)`` for png or a saliency background.
        sal_dir: npy mode: background = 1 - ``<sal_dir>/<id>.png`` (one prediction, no sweep).
        crf_t: dense-CRF iterations applied to each prediction before scoring (0 = off).
        crf_gt_prob: label-CRF confidence; 1 means the probability CRF on the score planes (npy/saliency).
        pred_ignore: png mode, how a predicted 255 counts: ``miss`` (wrong for every class), ``background``, or
            ``exclude`` (pixel not scored).
        allow_pickle: read legacy pickled ``.npy`` CAM files.
        num_workers: processes (<= 1: in this process).
        ids: subset of ``source.ids`` (default all).

    Returns:
        :class:`EvaluationResult` (its ``protocol`` holds what was fixed by the arguments).
    """
    if mode not in MODES:
        raise WSSSError(f"unknown --mode {mode!r}; use one of {', '.join(MODES)}")
    if pred_ignore not in PRED_IGNORE_POLICIES:
        raise WSSSError(f"unknown --pred_ignore {pred_ignore!r}; use one of {', '.join(PRED_IGNORE_POLICIES)}")
    if mode == "png" and crf_t > 0 and crf_gt_prob >= 1:
        raise WSSSError("png predictions carry no scores for the probability CRF; use --crf_gt_prob below 1")
    ids = list(source.ids if ids is None else ids)
    if not ids:
        raise WSSSError("no ids to evaluate; check --domain")
    pred_dir = Path(pred_dir)
    sal_dir = Path(sal_dir) if sal_dir is not None and mode == "npy" else None
    if mode == "png" or sal_dir is not None:
        thresholds = (None,)
    paths = prediction_paths(ids, pred_dir, mode, allow_pickle, getattr(source, "domain", "?"), source)
    if sal_dir is not None:
        saliency_paths(ids, sal_dir)
    class_names = list(SALIENCY_CLASSES) if mode == "saliency" else list(source.classes)
    job = EvalJob(
        source=source,
        mode=mode,
        thresholds=tuple(thresholds),
        num_classes=len(class_names),
        sal_dir=sal_dir,
        crf_t=int(crf_t),
        crf_gt_prob=float(crf_gt_prob),
        pred_ignore=pred_ignore,
        allow_pickle=allow_pickle,
    )
    job.new_sweep()  # validates the thresholds before any worker starts
    items = list(zip(ids, paths, strict=True))
    chunks = chunked(items, max(1, num_workers) * 8)
    worker = functools.partial(score_files, job)
    partials = parallel_map(worker, chunks, num_workers, desc="evaluate", progress=progress)
    sweep = functools.reduce(lambda a, b: a.merge(b), partials)
    results = sweep.scores(class_names)
    best = best_index(results)
    protocol = describe_protocol(
        getattr(source, "name", type(source).__name__),
        getattr(source, "domain", "?"),
        mode,
        pred_dir,
        job.thresholds,
        len(ids),
        sal_dir=sal_dir,
        crf_t=job.crf_t,
        crf_gt_prob=job.crf_gt_prob,
        pred_ignore=pred_ignore,
        left_out=results[best]["left_out"],
    )
    return EvaluationResult(class_names, results, best, sweep.confusion, protocol)


def describe_protocol(
    dataset: str,
    domain: str,
    mode: str,
    pred_dir: Path,
    thresholds: Sequence[float | None],
    num_images: int,
    *,
    sal_dir: Path | None,
    crf_t: int,
    crf_gt_prob: float,
    pred_ignore: str,
    left_out: Sequence[str],
) -> dict[str, Any]:
    """The facts a reader needs to compare this result with another (printed as the header, stored in JSON)."""
    numeric = [t for t in thresholds if t is not None]
    if mode == "png":
        background, chosen = "predicted label 0", "n/a (label maps)"
    elif sal_dir is not None and mode == "npy":
        background, chosen = f"1 - saliency from {sal_dir}", "n/a (saliency background)"
    elif len(numeric) == 1:
        background, chosen = f"constant {numeric[0]}", "fixed by --threshold"
    else:
        background = f"constant, swept {numeric[0]}..{numeric[-1]} ({len(numeric)} thresholds)"
        chosen = f"best mIoU on the ground truth of {dataset}/{domain} (GT-selected)"
    return {
        "dataset": dataset,
        "domain": domain,
        "num_images": num_images,
        "mode": mode,
        "pred_dir": str(pred_dir),
        "pred_ignore": pred_ignore if mode == "png" else "n/a",
        "crf": describe_crf(crf_t, crf_gt_prob, probabilities=crf_gt_prob >= 1 and mode != "png"),
        "background": background,
        "thresholds": numeric,
        "threshold_chosen_on": chosen,
        "classes_left_out": list(left_out),
    }


def _fmt(value: float | None, width: int = 9) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:{width}.2f}"


def format_report(result: EvaluationResult) -> str:
    """Multi-line text: protocol header, one line per threshold, and the per-class table at the best threshold."""
    best = result.results[result.best]
    lines = [f"{key:>20}: {value}" for key, value in result.protocol.items()]
    if len(result.results) > 1:
        lines.append("threshold      mIoU        FP        FN")
        for i, r in enumerate(result.results):
            marker = "  <- best" if i == result.best else ""
            lines.append(f"{r['threshold']:9.3f}{_fmt(r['miou'])} {_fmt(r['fp'])} {_fmt(r['fn'])}{marker}")
    width = max(12, *(len(n) for n in result.class_names))
    lines.append(f"{'class':<{width}}       IoU precision    recall        FP        FN")
    for name in result.class_names:
        lines.append(
            f"{name:<{width}} {_fmt(best['iou'][name])} {_fmt(best['precision'][name])} {_fmt(best['recall'][name])} "
            f"{_fmt(best['fp_class'][name])} {_fmt(best['fn_class'][name])}"
        )
    threshold = "" if best["threshold"] is None else f" at threshold {best['threshold']:.3f}"
    lines.append(
        f"mIoU {best['miou']:.2f}{threshold} (foreground {best['miou_fg']:.2f}, "
        f"FP {best['fp']:.2f}, FN {best['fn']:.2f}; "
        f"{len(result.class_names) - len(best['left_out'])} of {len(result.class_names)} classes averaged)"
    )
    return "\n".join(lines)
