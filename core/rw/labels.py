"""Affinity labels: the confident foreground, confident background and uncertain pixels AffinityNet learns from
(SPEC §9.1), and the rule that derives their thresholds from a CAM threshold sweep (USERS §1.9).

Label values: a class key 1..C (confident foreground), 0 (confident background), 255 (uncertain: AffinityNet draws
no pair from it).

* Without saliency (IRN / Puzzle-CAM): the CAMs decoded at ``fg_threshold`` and at ``bg_threshold`` (each
  ``argmax([threshold; cams])``, ties to the background, label-CRF-refined when ``crf_t > 0``); a pixel is its class
  where the first map has one, 0 where the second map is background, 255 elsewhere.
* With saliency (P-NOC): ``salient = CRF(1[saliency > bg_threshold])`` over 2 labels, ``fg = keys[CRF(salient ·
  argmax([fg_threshold; cams]))]``; a pixel is its class where ``fg`` has one, 0 where it is not salient either,
  255 elsewhere.

``--crf_t`` and ``--crf_gt_prob`` apply in both branches (the reference fixed t=10, gt 0.7 in the first,
SPEC §13.2.11).

PSA (``--method psa``, METHODS §2, §15, §16.14): two CRF score maps, "low alpha" and "high alpha", each the
probability CRF (``unary_from_softmax`` of the unnormalised scores ``[(1 - max cams)^alpha, cams]``; Gaussian 3/3,
bilateral 80/13/10, ``crf_t`` = 10 iterations) of the image; both average-pooled x8 (zero-padded to a multiple of 8)
before their argmax; a cell is its class where the low-alpha map has one, 255 where the low-alpha map says
background, 0 where the high-alpha map says background, 255 where it has no score at all (padding). The labels are
written at full size, each stride-8 cell's label over its 8x8 pixels (the image's own grid), so the label folder
has the layout of IRN's (sizes checked, evaluated by ``scripts/evaluate.py``) and AffinityNet training samples it at
stride 8 after its joint resize/crop. The reference pools after the crop, on the crop's grid: same rule, other cell
boundaries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import paths
from core.crf import crf_inference_labels, crf_inference_probs
from core.errors import WSSSError
from core.labels import IGNORE_INDEX, compact_labels, labels_after_crf
from core.pseudo_masks import PseudoMaskJob

AUTO = "auto"
DEFAULT_CRF_T = {"irn": 0, "psa": 10}  # irn: the label CRF is off unless asked; psa: its score maps are CRF outputs
PSA_STRIDE = 8  # the stride-8 cells of PSA's labels
PSA_CRF = {"gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 80, "bilateral_srgb": 13, "bilateral_compat": 10}
# USERS §1.9 (ReCAM#15): fg = best CAM threshold + 0.10, bg = best - 0.10.
AUTO_MARGIN = 0.10


def combine_confident(fg_labels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The affinity label rule: the class of ``fg_labels`` where it has one, else 0 where ``background`` holds,
    else 255.

    Args:
        fg_labels: int [H, W], 0 or a class key.
        background: bool [H, W], confident background.

    Returns:
        uint8 [H, W] in {0, keys, 255}.
    """
    labels = np.where(fg_labels > 0, fg_labels, np.where(background, 0, IGNORE_INDEX))
    return labels.astype(np.uint8)


def affinity_labels(
    hr_cam: np.ndarray,
    keys: np.ndarray,
    fg_threshold: float,
    bg_threshold: float,
    *,
    saliency: np.ndarray | None = None,
    image: np.ndarray | None = None,
    crf_t: int = 0,
    crf_gt_prob: float = 0.7,
) -> np.ndarray:
    """Affinity labels of one image, by the rules of the module docstring.

    Args:
        hr_cam: float [n, H, W] in [0, 1], planes of ``keys``.
        keys: int [n], label-map ids 1..C.
        fg_threshold: CAM score a pixel must beat to be confident foreground.
        bg_threshold: without saliency, the CAM score at or below which a pixel is confident background; with
            saliency, the saliency a pixel must beat to be salient (not background).
        saliency: float [H, W] in [0, 1] (1 = salient), or None.
        image: uint8 [H, W, 3] RGB, needed when ``crf_t > 0``.
        crf_t: label-CRF iterations (0 = off).
        crf_gt_prob: label-CRF confidence in (0, 1).

    Returns:
        uint8 [H, W] with values in {0} U keys U {255}.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if crf_t > 0 and image is None:
        raise ValueError("the label CRF needs the image")
    if saliency is None:
        fg_labels, bg_labels = labels_after_crf(hr_cam, keys, [fg_threshold, bg_threshold], image, crf_t, crf_gt_prob)
        return combine_confident(fg_labels, bg_labels == 0)
    salient = compact_labels(np.asarray(saliency, dtype=np.float32)[None], bg_threshold)  # 1 where s > bg_threshold
    if crf_t > 0:
        salient = crf_inference_labels(image, salient, 2, t=crf_t, gt_prob=crf_gt_prob)
    compact = compact_labels(hr_cam, fg_threshold) * salient  # 0 = background, i = plane i - 1
    if crf_t > 0:
        compact = crf_inference_labels(image, compact, max(len(keys) + 1, 2), t=crf_t, gt_prob=crf_gt_prob)
        compact = np.minimum(compact, len(keys))
    fg_labels = np.concatenate([[0], keys])[compact]
    return combine_confident(fg_labels, salient == 0)


def psa_scores(hr_cam: np.ndarray, alpha: float, image: np.ndarray | None, crf_t: int = 10) -> np.ndarray:
    """One of PSA's CRF score maps: ``[(1 - max cams)^alpha, cams]`` refined by the probability CRF (METHODS §15).

    Args:
        hr_cam: float [n, H, W] in [0, 1], n >= 1.
        alpha: background power (low 4; high 24 SEAM/PPC or 32 PSA).
        image: uint8 [H, W, 3] RGB (needed when ``crf_t > 0``).
        crf_t: mean-field iterations (0: the scores themselves).

    Returns:
        float32 [n + 1, H, W] >= 0, background first (CRF marginals when ``crf_t > 0``).
    """
    hr_cam = np.asarray(hr_cam, dtype=np.float32)
    scores = np.concatenate([(1 - hr_cam.max(axis=0, keepdims=True)) ** alpha, hr_cam])
    if crf_t <= 0:
        return scores
    if image is None:
        raise ValueError("the CRF needs the image")
    return crf_inference_probs(image, scores, t=crf_t, **PSA_CRF)


def pool_cells(scores: np.ndarray, stride: int = PSA_STRIDE) -> np.ndarray:
    """``scores [K, H, W]`` zero-padded at the bottom/right to a multiple of ``stride`` and averaged over each
    ``stride x stride`` cell: float32 [K, ceil(H/stride), ceil(W/stride)]."""
    count, height, width = scores.shape
    rows, cols = -(-height // stride), -(-width // stride)
    padded = np.zeros((count, rows * stride, cols * stride), dtype=np.float32)
    padded[:, :height, :width] = scores
    return padded.reshape(count, rows, stride, cols, stride).mean(axis=(2, 4))


def psa_affinity_labels(
    la_scores: np.ndarray, ha_scores: np.ndarray, keys: np.ndarray, stride: int = PSA_STRIDE
) -> np.ndarray:
    """PSA's affinity labels from its two score maps (rule of the module docstring), at full size.

    Args:
        la_scores, ha_scores: float [n + 1, H, W] >= 0, background first (:func:`psa_scores` at alpha low / high).
        keys: int [n], label-map ids 1..C of the planes.

    Returns:
        uint8 [H, W] in {0} U keys U {255}, constant over each ``stride x stride`` cell of the image's grid.
    """
    height, width = la_scores.shape[1:]
    la, ha = pool_cells(la_scores, stride), pool_cells(ha_scores, stride)
    ids = np.concatenate([[0], np.asarray(keys, dtype=np.int64)])
    cells = ids[la.argmax(axis=0)]
    cells[cells == 0] = IGNORE_INDEX  # the low-alpha map (much background) is unsure of its background
    cells[ha.argmax(axis=0) == 0] = 0  # the high-alpha map (little background) is sure of its background
    cells[la.sum(axis=0) <= 1e-5] = IGNORE_INDEX  # no score: padding
    return np.repeat(np.repeat(cells, stride, axis=0), stride, axis=1)[:height, :width].astype(np.uint8)


@dataclass(frozen=True)
class PsaAffinityLabelJob(PseudoMaskJob):
    """Settings of a PSA affinity-label run (``--method psa``): the two alphas and the CRF iterations; ids in
    ``background_only`` get all-zero labels."""

    alpha_low: float = 4.0
    alpha_high: float = 24.0
    crf_t: int = 10

    def label_map(self, image_id: str) -> np.ndarray:
        """The PSA affinity labels of one id: uint8 [H, W], values in {0, keys, 255}."""
        zeros = self.background_mask(image_id)
        if zeros is not None:
            return zeros
        image = self.source.read_image(image_id) if self.crf_t > 0 else None
        size = image.shape[:2] if image is not None else self.source.image_size(image_id)
        cams = self.read_cams(image_id, size)
        if not len(cams.keys):
            return np.zeros(cams.size, dtype=np.uint8)
        la, ha = (psa_scores(cams.hr_cam, alpha, image, self.crf_t) for alpha in (self.alpha_low, self.alpha_high))
        return psa_affinity_labels(la, ha, cams.keys)


def psa_labels_dir(tag: str, alpha_low: float, alpha_high: float) -> Path:
    """``experiments/predictions/<tag>@aff_la=<low:g>_ha=<high:g>`` (PSA's labels, named like IRN's)."""
    return paths.PREDICTIONS_DIR / f"{paths.check_tag(tag)}@aff_la={alpha_low:g}_ha={alpha_high:g}"


@dataclass(frozen=True)
class AffinityLabelJob(PseudoMaskJob):
    """Settings of an affinity-label run, sent once to each worker process: ``threshold`` is the foreground
    threshold, ``bg_threshold`` the background one (of the CAMs, or of the saliency with ``sal_dir``); ids in
    ``background_only`` get all-zero labels (their image has no foreground class)."""

    bg_threshold: float | None = 0.05
    producer: str = "scripts/cam/inference.py"

    def label_map(self, image_id: str) -> np.ndarray:
        """The affinity labels of one id: uint8 [H, W], values in {0, keys, 255}."""
        zeros = self.background_mask(image_id)
        if zeros is not None:
            return zeros
        image = self.source.read_image(image_id) if self.crf_t > 0 else None
        size = image.shape[:2] if image is not None else self.source.image_size(image_id)
        cams = self.read_cams(image_id, size)
        if not len(cams.keys):
            return np.zeros(cams.size, dtype=np.uint8)
        return affinity_labels(
            cams.hr_cam,
            cams.keys,
            self.threshold,
            float(self.bg_threshold if self.bg_threshold is not None else 0.0),
            saliency=self.read_saliency(image_id, cams.size) if self.sal_dir is not None else None,
            image=image,
            crf_t=self.crf_t,
            crf_gt_prob=self.crf_gt_prob,
        )


def affinity_labels_dir(tag: str, fg_threshold: float, bg_threshold: float) -> Path:
    """``experiments/predictions/<tag>@aff_fg=<fg:.2f>_bg=<bg:.2f>`` (the reference's name)."""
    return paths.PREDICTIONS_DIR / f"{paths.check_tag(tag)}@aff_fg={fg_threshold:.2f}_bg={bg_threshold:.2f}"


def best_sweep_threshold(sweep_json: Path) -> tuple[float, str]:
    """The best background threshold of a ``scripts/evaluate.py`` result (``results.json`` or ``--json``) and a
    description of the sweep (its mIoU, domain and CRF) for the log."""
    if not sweep_json.is_file():
        raise WSSSError(
            f"threshold sweep {sweep_json} not found; evaluate the CAM folder first (scripts/evaluate.py --mode npy) "
            "or give --fg_threshold and --bg_threshold as numbers"
        )
    try:
        result = json.loads(sweep_json.read_text(encoding="utf-8"))
        best = float(result["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WSSSError(f"{sweep_json} is not a result of scripts/evaluate.py ({e}); pass --sweep_json PATH") from e
    protocol = result.get("protocol") if isinstance(result.get("protocol"), dict) else {}
    if len(result.get("sweep", [])) < 2 or protocol.get("mode", "npy") != "npy" or result.get("uses_saliency"):
        raise WSSSError(
            f"{sweep_json} is not a threshold sweep of CAM files (it needs scripts/evaluate.py --mode npy without "
            "--threshold and without --sal_dir); evaluate the CAM folder so, or pass --sweep_json PATH"
        )
    described = f"mIoU {result.get('miou', float('nan')):.2f}"
    for key in ("domain", "crf"):
        if key in protocol:
            described += f", {key} {protocol[key]}"
    return best, described


def resolve_thresholds(
    fg: float | str, bg: float | str, sweep_json: Path, with_saliency: bool
) -> tuple[float, float, str]:
    """Numbers for ``--fg_threshold`` / ``--bg_threshold``, either of which may be ``auto``.

    ``auto`` takes the best threshold ``b`` of the CAM folder's threshold sweep: fg = b + 0.10, bg = b - 0.10
    (clipped to [0, 1]; USERS §1.9). With saliency the background threshold applies to the saliency map, not to
    the CAMs, so it cannot be ``auto``.

    Returns:
        (fg, bg, the rule that chose them, for the log).
    """
    if bg == AUTO and with_saliency:
        raise WSSSError(
            "--bg_threshold auto derives a CAM threshold, but with --sal_dir it thresholds the saliency map; "
            "give it as a number (the P-NOC runner uses 0.10)"
        )
    if AUTO not in (fg, bg):
        rule = "given"
    else:
        best, described = best_sweep_threshold(sweep_json)
        rules = []
        if fg == AUTO:
            fg, rules = min(1.0, round(best + AUTO_MARGIN, 4)), [f"fg = best + {AUTO_MARGIN:g}"]
        if bg == AUTO:
            bg, rules = max(0.0, round(best - AUTO_MARGIN, 4)), [*rules, f"bg = best - {AUTO_MARGIN:g}"]
        rule = f"{', '.join(rules)} (USERS §1.9), best threshold {best:g} of {sweep_json} ({described})"
    fg, bg = float(fg), float(bg)
    if not with_saliency and bg > fg:
        raise WSSSError(f"--bg_threshold {bg:g} must not exceed --fg_threshold {fg:g} (both threshold the CAMs)")
    return fg, bg, rule
