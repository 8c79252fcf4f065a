"""Pseudo masks from CAM files: the evaluator's decoding at one background threshold, as palette label PNGs.

Per image: background = ``--threshold`` (or ``1 - saliency`` with ``--sal_dir``); a pixel takes the class of its
largest CAM when that beats the background (ties go to the background), optionally refined by the label CRF
(``--crf_t``, ``--crf_gt_prob``). With ``--bg_threshold B`` pixels whose largest CAM lies in ``(B, threshold]``
become 255 (uncertain), IRN-style. Images without a foreground class have no CAM file; they get an all-background
mask with ``--fill_missing_as_background true``. Finished PNGs are skipped (resumable); the output is scored with
``scripts/evaluate.py --mode png``.

Reads:  <pred_dir>/<id>.npz (legacy <id>.npy with --allow_pickle), image-level labels of --domain,
        <sal_dir>/<id>.png (optional), the images (only with --crf_t > 0 or for background-only fills)
Writes: <output>/<id>.png, uint8 palette PNG: 0 = background, 1..C = classes, 255 = uncertain
        (default output <pred_dir>/pseudo_labels@t=<threshold>[@bg=<bg_threshold>][@sal][@crf=<crf_t>]),
        with args.json, log.txt and manifest.json (the CAM folder's manifest id, flags, counts)
Example:
    python scripts/cam/make_pseudo_masks.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train \\
        --experiment_name "pnoc/voc12-rs269-pnoc@train@scale=0.5,1.0,1.5,2.0" --threshold 0.3 --crf_t 10
    python scripts/evaluate.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train --mode png --pred_dir \\
        "experiments/predictions/pnoc/voc12-rs269-pnoc@train@scale=0.5,1.0,1.5,2.0/pseudo_labels@t=0.3@crf=10"
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any

from core import cli, inference, manifest, paths, pseudo_masks, runtime
from core.artifacts import PNG_SUFFIX, check_writable
from core.datasets import source_from_args
from core.errors import WSSSError

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_pseudo_masks", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train")
    group = cli.add_cam_folder_args(parser, "CAM folder", "scripts/cam/inference.py")
    cli.add_bool_arg(
        group,
        "--fill_missing_as_background",
        False,
        "images without a foreground class and without a CAM file get an all-background mask",
    )
    group = parser.add_argument_group("decoding")
    cli.add_arg(group, "--threshold", type=cli.unit_float, default=0.25, help="background threshold (default 0.25)")
    cli.add_arg(
        group,
        "--bg_threshold",
        type=cli.unit_float,
        default=None,
        help="lower end of an uncertain band: max CAM in (bg_threshold, threshold] -> 255 (default: no band)",
    )
    cli.add_arg(group, "--sal_dir", type=str, default=None, help="background = 1 - <sal_dir>/<id>.png instead")
    cli.add_arg(group, "--crf_t", type=int, default=0, help="label-CRF iterations (0 = off)")
    cli.add_arg(group, "--crf_gt_prob", type=float, default=0.7, help="label-CRF confidence in the CAM labels")
    cli.add_pool_output_args(parser, "output folder (default: inside the CAM folder)")
    return parser


def cam_dir(args: argparse.Namespace) -> Path:
    """``--pred_dir``, else ``experiments/predictions/<experiment_name>``; must exist."""
    return paths.existing_predictions_dir(args.experiment_name, args.pred_dir, "CAM folder", "scripts/cam/inference.py")


def output_dir(args: argparse.Namespace, cams: Path) -> Path:
    """``--output``, else a folder inside the CAM folder whose name records every decoding setting."""
    if args.output:
        return Path(args.output)
    name = f"pseudo_labels@t={args.threshold:g}" if args.sal_dir is None else "pseudo_labels@sal"
    if args.bg_threshold is not None:
        name += f"@bg={args.bg_threshold:g}"
    if args.crf_t > 0:
        name += f"@crf={args.crf_t}" + (f"@gt={args.crf_gt_prob:g}" if args.crf_gt_prob != 0.7 else "")
    return cams / name


def check_flags(args: argparse.Namespace) -> None:
    if args.bg_threshold is not None and args.sal_dir:
        raise WSSSError("--bg_threshold needs a constant --threshold; it cannot be combined with --sal_dir")
    if args.bg_threshold is not None and args.bg_threshold > args.threshold:
        raise WSSSError(f"--bg_threshold {args.bg_threshold} must not exceed --threshold {args.threshold}")
    if args.crf_t > 0 and not 0 < args.crf_gt_prob < 1:
        raise WSSSError(f"--crf_gt_prob must lie strictly between 0 and 1 for the label CRF, got {args.crf_gt_prob}")
    if args.sal_dir and not Path(args.sal_dir).is_dir():
        raise WSSSError(f"saliency folder {args.sal_dir} does not exist; check --sal_dir")


def build_job(args: argparse.Namespace, source: Any, cams: Path, out: Path) -> pseudo_masks.PseudoMaskJob:
    """The settings every worker needs; background-only ids are fillable only with --fill_missing_as_background."""
    background_only: frozenset[str] = frozenset()
    if args.fill_missing_as_background:
        labels = inference.require_labels(source, "--fill_missing_as_background")
        background_only = frozenset(inference.split_background_only(labels)[1])
    return pseudo_masks.PseudoMaskJob(
        source=source,
        cam_dir=cams,
        out_dir=out,
        threshold=args.threshold,
        bg_threshold=args.bg_threshold,
        sal_dir=Path(args.sal_dir) if args.sal_dir else None,
        crf_t=args.crf_t,
        crf_gt_prob=args.crf_gt_prob,
        allow_pickle=args.allow_pickle,
        background_only=background_only,
    )


def check_inputs(args: argparse.Namespace, job: pseudo_masks.PseudoMaskJob, ids: list[str]) -> None:
    """Every id needs a CAM file (or a background-only fill), with ``--sal_dir`` a saliency map, and the output
    folder must be writable."""
    check_writable(job.out_dir, "--output", folder=True)
    hint = "" if args.fill_missing_as_background else (
        "; images without a foreground class have none: pass --fill_missing_as_background true for them"
    )  # fmt: skip
    job.check_files(ids, args.domain, hint)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_flags(args)
    source = source_from_args(args)
    cams = cam_dir(args)
    out = output_dir(args, cams)
    job = build_job(args, source, cams, out)
    check_inputs(args, job, source.ids)
    inputs = {"cams": manifest.folder_fingerprint(cams)}
    if job.sal_dir is not None:
        inputs["saliency"] = manifest.folder_fingerprint(job.sal_dir)
    with runtime.stage_run(
        args, "cam", __file__, out, inputs, runtime.data_context(args), outputs=out.glob(f"*{PNG_SUFFIX}")
    ) as run:
        writer = functools.partial(pseudo_masks.write_pseudo_masks, job)
        pool = inference.run_over_chunks(
            writer, source.ids, out, PNG_SUFFIX, dist=run.dist, num_workers=args.num_workers,
            desc="pseudo masks", log=logger, source_dir=cams,
        )  # fmt: skip
        filled = len([i for i in pool.todo if i in job.background_only and job.cam_file(i) is None])
        logger.info(
            "wrote %d pseudo masks in %.1f s (%d background-only fills) to %s", pool.written, pool.seconds, filled, out
        )
        run.counts = {"written": pool.written, "skipped": pool.skipped, "filled": filled}
        return {**run.counts, "out_dir": str(out)}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
