"""Score a folder of predictions against ground truth: CAM files (with a background-threshold sweep), label-map PNGs
or saliency PNGs, optionally after a dense CRF.

One pass over the files: each worker reads every prediction file and its GT once and accumulates the confusion
matrices of all thresholds (:class:`core.metrics.ThresholdSweep`); the parent merges the partial sweeps. Nothing is
read before every expected file has been found, and a failing file stops the run with its name (no partial mIoU).

Modes:
    * ``npy``: CAM files ``<id>.npz`` (legacy ``<id>.npy`` with ``allow_pickle``); background = a constant
      threshold (swept) or a saliency map from ``sal_dir`` (``1 - s``, or ``1[s < sal_threshold]``);
    * ``png``: label maps ``<id>.png`` (0..C, 255); a predicted 255 counts per ``pred_ignore``;
    * ``saliency``: saliency PNGs, or CAM files whose foreground score is the max over their maps (one-plane C²AM
      files, or class CAMs made class-agnostic), thresholds swept on that score. ``eval_mode="saliency"`` scores
      foreground vs background (GT foreground = any class 1..C) and adds MAE and max F-beta of the maps
      (:class:`core.metrics.SaliencyScores`); ``eval_mode="segmentation"`` is the oracle upper bound of SPEC §7.5:
      salient pixels take their true class (:func:`oracle_labels`), scored over the dataset's classes.
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
from core.labels import IGNORE_INDEX, compact_labels, saliency_background
from core.metrics import SaliencyScores, ThresholdSweep, best_index
from core.parallel import chunked, parallel_map

logger = logging.getLogger(__name__)

MODES = ("npy", "png", "saliency")
PRED_IGNORE_POLICIES = ("miss", "background", "exclude")
SALIENCY_CLASSES = ("background", "foreground")
EVAL_MODES = ("saliency", "segmentation")
SAL_MODES = artifacts.SALIENCY_KINDS


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
    eval_mode: str = "saliency"
    sal_mode: str = "saliency"
    sal_threshold: float | None = None

    @property
    def oracle(self) -> bool:
        return self.mode == "saliency" and self.eval_mode == "segmentation"

    def new_sweep(self) -> ThresholdSweep:
        # A predicted 255 counted as a miss, and the oracle's false positives in an image without any class, need
        # the extra "no class" column.
        void = (self.mode == "png" and self.pred_ignore == "miss") or self.oracle
        return ThresholdSweep(self.num_classes, self.thresholds, void_column=void)

    def new_partial(self) -> PartialScores:
        return PartialScores(self.new_sweep(), SaliencyScores() if self.mode == "saliency" else None)


@dataclass
class PartialScores:
    """What a worker returns: the threshold sweep, and in saliency mode the MAE / F-beta sums."""

    sweep: ThresholdSweep
    saliency: SaliencyScores | None = None

    def merge(self, other: PartialScores) -> PartialScores:
        self.sweep.merge(other.sweep)
        if self.saliency is not None and other.saliency is not None:
            self.saliency.merge(other.saliency)
        return self


@dataclass
class EvaluationResult:
    """Scores of every threshold, which one is best, and the protocol that produced them."""

    class_names: list[str]
    results: list[dict[str, Any]]
    best: int
    confusion: np.ndarray  # int64 [T, K, K(+1)]
    protocol: dict[str, Any] = field(default_factory=dict)
    saliency: dict[str, Any] | None = None  # saliency mode: SaliencyScores.scores() (values in [0, 1])

    def summary(self) -> dict[str, Any]:
        """The JSON document of ``scripts/evaluate.py --json``; percentages in [0, 100] (saliency mode adds ``mae``
        and ``max_fbeta`` in [0, 1], as the saliency literature reports them, and ``saliency_scores``)."""
        best = self.results[self.best]
        extra: dict[str, Any] = {}
        if self.saliency is not None:
            extra = {"mae": self.saliency["mae"], "max_fbeta": self.saliency["max_fbeta"]}
            extra["saliency_scores"] = self.saliency
        if self.protocol.get("mode") == "png" and self.protocol.get("pred_ignore") == "miss":
            extra.update(labelled_pixel_scores(self.confusion[self.best]))
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
            **extra,
            "uses_saliency": self.protocol.get("saliency", "not used") != "not used",
            "protocol": self.protocol,
        }


def labelled_pixel_scores(confusion: np.ndarray) -> dict[str, float]:
    """How much of the image a label map with ignore (255) pixels labels, and how well: affinity labels and pseudo
    masks leave uncertain pixels out, so mIoU alone (which counts them as misses) undersells their precision.

    Args:
        confusion: int [K, K+1] of one threshold, GT rows (ignored GT already left out), the last column counting
            pixels predicted 255.

    Returns:
        ``labelled``: % of the GT pixels that carry a class or background; ``labelled_accuracy``: % of those that
        are right (pixel precision of the confident labels).
    """
    total = int(confusion.sum())
    labelled = total - int(confusion[:, -1].sum())
    right = int(np.trace(confusion[:, :-1]))
    return {
        "labelled": 100.0 * labelled / max(total, 1),
        "labelled_accuracy": 100.0 * right / labelled if labelled else float("nan"),
    }


# --------------------------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------------------------


def prediction_paths(
    ids: Sequence[str], pred_dir: Path, mode: str, allow_pickle: bool, domain: str, source: Any = None
) -> list[Path]:
    """The prediction file of every id, or a WSSSError listing the missing ones before any work starts.

    In ``npy`` mode ``<id>.npz`` is preferred and a legacy ``<id>.npy`` accepted (it needs ``allow_pickle``); in
    ``saliency`` mode ``<id>.png`` or a CAM file, one kind for the whole folder. With ``source``, missing ids whose
    image-level label has no foreground class are told apart: CAM inference writes no file for them by default, so
    "run inference" would not help.
    """
    if not pred_dir.is_dir():
        raise WSSSError(f"prediction folder {pred_dir} does not exist; check --experiment_name/--pred_dir")
    suffixes = {
        "npy": (artifacts.CAM_SUFFIX, artifacts.LEGACY_CAM_SUFFIX),
        "png": (artifacts.PNG_SUFFIX,),
        "saliency": (artifacts.PNG_SUFFIX, artifacts.CAM_SUFFIX, artifacts.LEGACY_CAM_SUFFIX),
    }[mode]
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
    pngs = [p for p in paths if p.suffix == artifacts.PNG_SUFFIX]
    if mode == "saliency" and 0 < len(pngs) < len(paths):
        other = next(p for p in paths if p.suffix != artifacts.PNG_SUFFIX)
        raise WSSSError(
            f"{pred_dir} mixes saliency PNGs ({pngs[0].name}, ...) and CAM files ({other.name}, ...) for different "
            "ids; evaluate a folder of one kind"
        )
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
        elif mode == "saliency":
            fix = "evaluate the output of scripts/ccam/inference_crf.py, which gives them all-zero masks"
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


def _decode(job: EvalJob, cams: np.ndarray, background: float | np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """Compact labels int [H, W] (0 = background, i = plane i - 1) for one background score, CRF-refined when an
    image is given (label CRF, or with ``crf_gt_prob >= 1`` the probability CRF on ``[background, cams...]``)."""
    if image is None:
        return compact_labels(cams, background)
    if job.crf_gt_prob >= 1:
        plane = np.broadcast_to(np.asarray(background, dtype=np.float32), cams.shape[1:])[None]
        return crf_inference_probs(image, np.concatenate([plane, cams]), t=job.crf_t).argmax(axis=0)
    labels = compact_labels(cams, background)
    return crf_inference_labels(image, labels, max(len(cams) + 1, 2), t=job.crf_t, gt_prob=job.crf_gt_prob)


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
        compact = _decode(job, cams, background, image)
        sweep.add_labels(lookup[np.minimum(compact, len(keys))], gt, index=index)


def oracle_labels(foreground: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The oracle's label map (``--eval_mode segmentation``, SPEC §7.5): salient pixels take their true class.

    A predicted-salient pixel whose GT is a class keeps that class. One whose GT is background (a false positive)
    takes the lowest class present in the image's GT (the reference draws a random class of the image; the lowest
    one makes the score deterministic); in an image without any class it takes ``IGNORE_INDEX``, which the sweep's
    void column counts as a miss of the background. Non-salient pixels are background, so the score is an upper
    bound of what the saliency maps allow, not a result of a method (it reads the GT classes).

    Args:
        foreground: bool [H, W], the predicted salient pixels.
        gt: uint8 [H, W], classes 0..C and 255.

    Returns:
        uint8 [H, W]: 0, the GT classes, or 255 for false positives in images without a class.
    """
    gt = np.asarray(gt)
    is_class = (gt != 0) & (gt != IGNORE_INDEX)
    present = gt[is_class]
    fallback = int(present.min()) if present.size else IGNORE_INDEX
    return np.where(foreground, np.where(is_class, gt, fallback), 0).astype(np.uint8)


def _load_cams(job: EvalJob, image_id: str, path: Path, gt: np.ndarray) -> artifacts.CamFile:
    mask = job.source.mask_path(image_id) if hasattr(job.source, "mask_path") else image_id
    return artifacts.load_cam(
        path,
        allow_pickle=job.allow_pickle,
        with_cam=False,
        size=gt.shape,
        num_classes=len(job.source.classes) - 1,
        size_of=f"the ground truth {mask}",
    )


def _read_foreground(job: EvalJob, image_id: str, path: Path, gt: np.ndarray) -> np.ndarray:
    """Saliency mode: float32 [H, W] in [0, 1], a PNG's value / 255 or the max over a CAM file's maps."""
    if path.suffix == artifacts.PNG_SUFFIX:
        saliency = artifacts.load_saliency(path)
        _check_size(path, "the saliency map", saliency.shape, gt, job.source, image_id)
        return saliency
    cams = _load_cams(job, image_id, path, gt)
    return cams.hr_cam.max(axis=0) if len(cams.keys) else np.zeros(gt.shape, dtype=np.float32)


def _score_saliency(job: EvalJob, partial: PartialScores, image_id: str, path: Path, gt: np.ndarray) -> None:
    saliency = _read_foreground(job, image_id, path, gt)
    salient_gt = np.where(gt == IGNORE_INDEX, IGNORE_INDEX, np.minimum(gt, 1)).astype(np.uint8)
    if partial.saliency is not None:
        partial.saliency.add(saliency, salient_gt)  # the maps as read, before any CRF
    image = job.source.read_image(image_id) if job.crf_t > 0 else None
    one_plane, foreground_key = saliency[None], np.array([1], dtype=np.int64)
    if job.oracle:
        for index, threshold in enumerate(job.thresholds):
            foreground = _decode(job, one_plane, threshold, image) == 1
            partial.sweep.add_labels(oracle_labels(foreground, gt), gt, index=index)
    elif image is not None:
        _add_cams_with_crf(job, partial.sweep, one_plane, foreground_key, salient_gt, image, None)
    else:
        partial.sweep.add(one_plane, foreground_key, salient_gt)


def _score_cams(job: EvalJob, sweep: ThresholdSweep, image_id: str, path: Path, gt: np.ndarray) -> None:
    cam_file = _load_cams(job, image_id, path, gt)
    cams, keys = cam_file.hr_cam, cam_file.keys
    bg = None
    if job.sal_dir is not None:
        sal_path = job.sal_dir / f"{image_id}{artifacts.PNG_SUFFIX}"
        saliency = artifacts.load_saliency(sal_path, job.sal_mode)
        _check_size(sal_path, "the saliency map", saliency.shape, gt, job.source, image_id)
        bg = saliency_background(saliency, job.sal_threshold)
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


def score_files(job: EvalJob, items: Sequence[tuple[str, Path]]) -> PartialScores:
    """Partial scores over ``(image_id, prediction path)`` pairs; any unexpected failure names the file."""
    partial = job.new_partial()
    for image_id, path in items:
        try:
            gt = job.source.read_mask(image_id)
            if job.mode == "png":
                _score_label_map(job, partial.sweep, image_id, path, gt)
            elif job.mode == "saliency":
                _score_saliency(job, partial, image_id, path, gt)
            else:
                _score_cams(job, partial.sweep, image_id, path, gt)
        except WSSSError:
            raise
        except Exception as e:
            raise RuntimeError(f"while scoring {path}: {type(e).__name__}: {e}") from e
    return partial


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
    sal_mode: str = "saliency",
    sal_threshold: float | None = None,
    eval_mode: str = "saliency",
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
        pred_dir: folder of ``<id>.npz``/``<id>.npy`` (npy, saliency) or ``<id>.png`` (png, saliency).
        mode: ``npy``, ``png`` or ``saliency``.
        thresholds: background thresholds to sweep (npy/saliency); ``(None,)`` for png or a saliency background.
        sal_dir: npy mode: the background is the saliency ``<sal_dir>/<id>.png`` (one prediction, no sweep).
        sal_mode: how those PNGs are read: ``saliency`` (value / 255) or ``segmentation`` (classes 1..254 -> 1).
        sal_threshold: None: background = 1 - s; a number t: background = 1 where s < t, else 0.
        eval_mode: saliency mode: ``saliency`` (foreground vs background, MAE, max F-beta) or ``segmentation`` (the
            oracle upper bound, :func:`oracle_labels`).
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
    _check_choices(mode, pred_ignore, eval_mode, sal_mode)
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
    oracle = mode == "saliency" and eval_mode == "segmentation"
    class_names = list(SALIENCY_CLASSES) if mode == "saliency" and not oracle else list(source.classes)
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
        eval_mode=eval_mode,
        sal_mode=sal_mode,
        sal_threshold=sal_threshold,
    )
    job.new_sweep()  # validates the thresholds before any worker starts
    items = list(zip(ids, paths, strict=True))
    chunks = chunked(items, max(1, num_workers) * 8)
    worker = functools.partial(score_files, job)
    partials = parallel_map(worker, chunks, num_workers, desc="evaluate", progress=progress)
    scores = functools.reduce(lambda a, b: a.merge(b), partials)
    results = scores.sweep.scores(class_names)
    best = best_index(results)
    protocol = describe_protocol(
        getattr(source, "name", type(source).__name__),
        getattr(source, "domain", "?"),
        job,
        pred_dir,
        len(ids),
        left_out=results[best]["left_out"],
        inputs=_describe_inputs(mode, paths[0]),
    )
    saliency = scores.saliency.scores() if scores.saliency is not None else None
    return EvaluationResult(class_names, results, best, scores.sweep.confusion, protocol, saliency)


def _describe_inputs(mode: str, first: Path) -> str:
    if mode == "png":
        return "label-map PNGs"
    if first.suffix == artifacts.PNG_SUFFIX:
        return "saliency PNGs (foreground score = value / 255)"
    return "CAM files (foreground score = max over their maps)" if mode == "saliency" else "CAM files"


def _check_choices(mode: str, pred_ignore: str, eval_mode: str, sal_mode: str) -> None:
    for flag, value, choices in (
        ("--mode", mode, MODES),
        ("--pred_ignore", pred_ignore, PRED_IGNORE_POLICIES),
        ("--eval_mode", eval_mode, EVAL_MODES),
        ("--sal_mode", sal_mode, SAL_MODES),
    ):
        if value not in choices:
            raise WSSSError(f"unknown {flag} {value!r}; use one of {', '.join(choices)}")


def describe_saliency(job: EvalJob) -> str:
    """Whether and how saliency enters a result (every report and JSON says it, USERS §1.14)."""
    if job.mode == "saliency":
        return "evaluated: the predictions are class-agnostic saliency (foreground) maps"
    if job.sal_dir is None:
        return "not used"
    rule = "1 - s" if job.sal_threshold is None else f"1 where s < {job.sal_threshold:g}, else 0"
    read = "s = PNG / 255" if job.sal_mode == "saliency" else "s = 1 on classes 1..254 of a label map"
    return f"background = {rule} ({read}) from {job.sal_dir}"


def _describe_eval_mode(job: EvalJob) -> str:
    if job.mode != "saliency":
        return "classes"
    if job.oracle:
        return (
            "segmentation (oracle upper bound: salient pixels take their GT class, false positives the lowest GT "
            "class of the image)"
        )
    return "saliency (foreground vs background; MAE and max F-beta, beta^2 0.3, on the maps before any CRF)"


def describe_protocol(
    dataset: str,
    domain: str,
    job: EvalJob,
    pred_dir: Path,
    num_images: int,
    *,
    left_out: Sequence[str],
    inputs: str,
) -> dict[str, Any]:
    """The facts a reader needs to compare this result with another (printed as the header, stored in JSON)."""
    numeric = [t for t in job.thresholds if t is not None]
    if job.mode == "png":
        background, chosen = "predicted label 0", "n/a (label maps)"
    elif job.sal_dir is not None:
        background, chosen = "from saliency (see saliency)", "n/a (saliency background)"
    elif len(numeric) == 1:
        background, chosen = f"constant {numeric[0]}", "fixed by --threshold"
    else:
        background = f"constant, swept {numeric[0]}..{numeric[-1]} ({len(numeric)} thresholds)"
        chosen = f"best mIoU on the ground truth of {dataset}/{domain} (GT-selected)"
    if job.mode == "saliency":  # the same thresholds, on the foreground score
        background = f"foreground score <= threshold ({background})"
    return {
        "dataset": dataset,
        "domain": domain,
        "num_images": num_images,
        "mode": job.mode,
        "inputs": inputs,
        "eval_mode": _describe_eval_mode(job),
        "pred_dir": str(pred_dir),
        "pred_ignore": job.pred_ignore if job.mode == "png" else "n/a",
        "crf": describe_crf(job.crf_t, job.crf_gt_prob, probabilities=job.crf_gt_prob >= 1 and job.mode != "png"),
        "saliency": describe_saliency(job),
        "sal_dir": str(job.sal_dir) if job.sal_dir is not None else None,
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
    if result.saliency is not None:
        lines.append(format_saliency_scores(result.saliency))
    return "\n".join(lines)


def format_saliency_scores(scores: dict[str, Any]) -> str:
    """``MAE 0.0512, max F-beta 0.8531 at level 0.502 (...)``: the saliency line of a report, values in [0, 1]."""
    level = "-" if scores["fbeta_threshold"] is None else f"{scores['fbeta_threshold']:.3f}"
    return (
        f"MAE {scores['mae']:.4f}, max F-beta {scores['max_fbeta']:.4f} at level {level} "
        f"(beta^2 {scores['beta_squared']:g}; precision {scores['precision']:.4f}, recall {scores['recall']:.4f}; "
        f"{scores['images']} images, {scores['images_with_foreground']} with foreground; maps before any CRF)"
    )
