"""Score predictions against the ground truth: CAM files with a background-threshold sweep, label-map PNGs or
saliency maps, optionally after a dense CRF.

Every prediction file and its GT are read once; all thresholds are scored in that pass, in ``--num_workers``
processes. The best threshold is chosen on the GT of the evaluated domain, and the header says so.

--mode saliency reads saliency PNGs (8-bit grey, 255 = foreground) or CAM files (one-plane C²AM files; for class
CAMs the max over their maps) and scores foreground vs background over the swept thresholds, plus MAE and max
F-beta (beta^2 = 0.3, in [0, 1]) of the maps; --eval_mode segmentation instead gives the oracle upper bound (salient
pixels take their GT class; a false positive takes the lowest GT class of its image). In npy mode --sal_dir makes a
saliency map the background of the CAMs: 1 - s, or with --sal_threshold t, 1 where s < t and 0 elsewhere. Every
report and JSON says whether saliency was used, and which folder.

Reads:  <pred_dir>/<id>.npz (npy mode; legacy <id>.npy with --allow_pickle), <id>.png (png mode), either (saliency
        mode), the dataset's ground-truth masks, <sal_dir>/<id>.png (optional), the images (only with --crf_t > 0)
Writes: the report to the log and to experiments/results/eval/<prediction folder>/log.txt (every evaluation), with
        results.json, args.json and manifest.json of the last one; --json OUT: {"miou", "iou", "threshold", "fp",
        "fn", "precision", "recall", "uses_saliency", "protocol", ...} (percentages 0-100; saliency mode adds
        "mae", "max_fbeta" in 0-1); the protocol's made_by names what made the predictions (their manifest.json)
Example:
    python scripts/evaluate.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train \
        --experiment_name pnoc-rs269@train@scale=0.5,1.0,1.5,2.0 --mode npy --min_th 0.05 --max_th 0.80 \
        --step_th 0.05 --json experiments/predictions/pnoc-rs269@train@scale=0.5,1.0,1.5,2.0/eval.json
    python scripts/evaluate.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain val --mode saliency \
        --experiment_name "ccamh-rs269@val@scale=0.5,1.0,1.5,2.0" --crf_t 10
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from core import cli, manifest, paths, runtime
from core.artifacts import check_writable, write_json
from core.datasets import source_from_args
from core.errors import WSSSError
from core.evaluation import (
    EVAL_MODES,
    MODES,
    PRED_IGNORE_POLICIES,
    SAL_MODES,
    evaluate_predictions,
    format_report,
    threshold_range,
)
from core.parallel import default_num_workers

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("evaluate", description=__doc__.split("\n\n")[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train")
    group = parser.add_argument_group("predictions")
    cli.add_arg(
        group, "--experiment_name", type=str, default=None, help=f"predictions in {paths.PREDICTIONS_DIR}/<name>"
    )
    cli.add_arg(group, "--pred_dir", type=str, default=None, help="prediction folder (overrides --experiment_name)")
    cli.add_arg(
        group,
        "--mode",
        type=str,
        default="npy",
        choices=MODES,
        help="npy: CAM files; png: label maps; saliency: saliency PNGs or CAM files (max over maps) as foreground",
    )
    cli.add_arg(
        group,
        "--eval_mode",
        type=str,
        default="saliency",
        choices=EVAL_MODES,
        help="saliency mode: saliency = foreground vs background IoU, MAE, max F-beta (default); segmentation = "
        "oracle upper bound, salient pixels take their GT class",
    )
    cli.add_bool_arg(group, "--allow_pickle", default=False, help="read legacy pickled .npy CAMs (trusted files only)")
    group = parser.add_argument_group("saliency as background (npy mode)")
    cli.add_arg(group, "--sal_dir", type=str, default=None, help="background of the CAMs from <sal_dir>/<id>.png")
    cli.add_arg(
        group,
        "--sal_mode",
        type=str,
        default="saliency",
        choices=SAL_MODES,
        help="how --sal_dir PNGs are read: saliency = grey / 255 (default); segmentation = label map, classes 1..254 "
        "are salient",
    )
    cli.add_arg(
        group,
        "--sal_threshold",
        type=cli.unit_float,
        default=None,
        help="background = 1 where saliency < this, else 0 (default: background = 1 - saliency)",
    )
    cli.add_arg(
        group,
        "--pred_ignore",
        type=str,
        default="miss",
        choices=PRED_IGNORE_POLICIES,
        help="png mode: a predicted 255 counts as a miss (default), as background, or is excluded",
    )
    group = parser.add_argument_group("thresholds")
    cli.add_arg(
        group, "--threshold", type=cli.unit_float, default=None, help="one background threshold instead of a sweep"
    )
    cli.add_arg(
        group, "--min_th", type=cli.unit_float, default=0.05, help="first threshold of the sweep (default 0.05)"
    )
    cli.add_arg(group, "--max_th", type=cli.unit_float, default=0.80, help="last threshold, inclusive (default 0.80)")
    cli.add_arg(group, "--step_th", type=float, default=0.05, help="sweep step (default 0.05: 16 thresholds)")
    group = parser.add_argument_group("crf")
    cli.add_arg(group, "--crf_t", type=int, default=0, help="dense-CRF iterations on each prediction (0 = off)")
    cli.add_arg(
        group,
        "--crf_gt_prob",
        type=float,
        default=0.7,
        help="label-CRF confidence; 1 = probability (DeepLab-v2) CRF on the CAM scores",
    )
    group = parser.add_argument_group("runtime")
    cli.add_arg(
        group, "--num_workers", type=int, default=default_num_workers(), help="processes (default min(8, CPUs))"
    )
    cli.add_arg(group, "--json", type=str, default=None, help="write the results to this JSON file")
    return parser


def resolve_pred_dir(args: argparse.Namespace) -> Path:
    """``--pred_dir``, else ``experiments/predictions/<experiment_name>``."""
    return paths.named_predictions_dir(args.experiment_name, args.pred_dir)


def check_flags(args: argparse.Namespace) -> None:
    """What can be checked before any file is read: flags that need another mode, the --json destination."""
    if args.sal_dir and args.mode != "npy":
        raise WSSSError(f"--sal_dir gives CAMs a background and needs --mode npy, not --mode {args.mode}")
    if args.sal_threshold is not None and not args.sal_dir:
        raise WSSSError("--sal_threshold thresholds the maps of --sal_dir; pass --sal_dir too")
    if args.eval_mode != "saliency" and args.mode != "saliency":
        raise WSSSError(f"--eval_mode {args.eval_mode} applies to --mode saliency only")
    if args.json:
        check_writable(args.json, "--json")


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_flags(args)
    pred_dir = resolve_pred_dir(args)
    source = source_from_args(args)
    thresholds = (
        [args.threshold] if args.threshold is not None else threshold_range(args.min_th, args.max_th, args.step_th)
    )
    if not pred_dir.is_dir():
        raise WSSSError(f"prediction folder {pred_dir} does not exist; check --experiment_name/--pred_dir")
    made_by = manifest.read_manifest(pred_dir)
    inputs = {"predictions": manifest.folder_fingerprint(pred_dir)}
    if args.sal_dir:
        inputs["saliency"] = manifest.folder_fingerprint(args.sal_dir)
    with runtime.stage_run(
        args, "eval", __file__, paths.evaluation_dir(pred_dir), inputs, runtime.data_context(args), resumable=False
    ) as run:
        result = evaluate_predictions(
            source,
            pred_dir,
            args.mode,
            thresholds,
            sal_dir=args.sal_dir,
            sal_mode=args.sal_mode,
            sal_threshold=args.sal_threshold,
            eval_mode=args.eval_mode,
            crf_t=args.crf_t,
            crf_gt_prob=args.crf_gt_prob,
            pred_ignore=args.pred_ignore,
            allow_pickle=args.allow_pickle,
            num_workers=args.num_workers,
        )
        result.protocol["made_by"] = (
            manifest.summary_line(made_by) if made_by else "unknown (the folder has no manifest)"
        )
        logger.info("evaluation of %s\n%s", pred_dir, format_report(result))
        summary = result.summary()
        write_json(run.out_dir / "results.json", summary)
        if args.json:
            write_json(args.json, summary)
            logger.info("wrote %s", args.json)
        run.counts = {"images": result.protocol["num_images"], "miou": summary["miou"]}
        return summary


if __name__ == "__main__":
    cli.run(main, get_args_parser())
