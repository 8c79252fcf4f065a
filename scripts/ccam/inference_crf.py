"""Saliency masks from C²AM CAM files: threshold the foreground map, optionally refine it with a 2-label dense CRF,
and write 0/255 PNGs (SPEC §7.4), in a pool of worker processes.

Per image: foreground where the map beats --threshold (ties go to the background), then the label CRF (--crf_t
iterations, --crf_gt_prob); with --activation sigmoid the map is a probability p, decided on the planes (1 - p, p)
(softmax CRF when --crf_t > 0; --threshold is unused). Images whose image-level label has no foreground class get an
all-zero mask (counted in the log and the manifest) and need no CAM file. Finished PNGs are skipped (resumable);
a rerun with other flags or another CAM folder refuses (--overwrite true starts again).

Reads:  <cam folder>/<id>.npz one-plane CAM files (keys [1], from scripts/ccam/inference.py; legacy <id>.npy with
        --allow_pickle), the image-level labels of --domain, the images (sizes; pixels only with --crf_t > 0)
Writes: <output>/<id>.png, 8-bit grey: 0 = background, 255 = foreground (default output next to the CAM folder:
        <cam folder>@t=<threshold>@crf=<crf_t>, or <cam folder>@sigmoid@crf=<crf_t>; @gt=<crf_gt_prob> is added
        when it is not 0.7), with args.json, log.txt and manifest.json (the CAM folder's manifest id, flags, counts)
Example:
    python scripts/ccam/inference_crf.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train_aug \\
        --experiment_name "ccamh-rs269@train_aug@scale=0.5,1.0,1.5,2.0" --threshold 0.2 --crf_t 10 --crf_gt_prob 0.7
    python scripts/evaluate.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train_aug --mode saliency \\
        --experiment_name "ccamh-rs269@train_aug@scale=0.5,1.0,1.5,2.0@t=0.2@crf=10"
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any

from core import cli, inference, manifest, paths, runtime
from core.artifacts import PNG_SUFFIX, check_writable
from core.ccam import saliency_masks
from core.datasets import source_from_args
from core.errors import WSSSError

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("inference_crf", description=__doc__.split("\n\n")[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train")
    cli.add_cam_folder_args(parser, "C²AM CAM folder", "scripts/ccam/inference.py")
    group = parser.add_argument_group("decoding")
    cli.add_arg(
        group,
        "--threshold",
        type=cli.unit_float,
        default=0.3,
        help="foreground where the map > threshold (default 0.3, the reference's; its runner uses 0.2)",
    )
    cli.add_arg(
        group,
        "--activation",
        type=str,
        default="relu",
        choices=saliency_masks.ACTIVATIONS,
        help="relu: threshold the map (default); sigmoid: the map is a probability, planes (1 - p, p)",
    )
    cli.add_arg(
        group, "--crf_t", "--crf_iteration", type=int, default=10, help="dense-CRF iterations (default 10; 0 = off)"
    )
    cli.add_arg(group, "--crf_gt_prob", type=float, default=0.7, help="label-CRF confidence in the thresholded map")
    cli.add_pool_output_args(parser, "output folder (default: next to the CAM folder)")
    return parser


def cam_dir(args: argparse.Namespace) -> Path:
    """``--pred_dir``, else ``experiments/predictions/<experiment_name>``; must exist."""
    return paths.existing_predictions_dir(
        args.experiment_name, args.pred_dir, "CAM folder", "scripts/ccam/inference.py"
    )


def output_dir(args: argparse.Namespace, cams: Path) -> Path:
    """``--output``, else ``<cam folder>@t=<threshold>@crf=<crf_t>`` next to it (the reference's name)."""
    if args.output:
        return Path(args.output)
    decoding = f"t={args.threshold:g}" if args.activation == "relu" else "sigmoid"
    settings = [decoding, f"crf={args.crf_t}"]
    if args.crf_t > 0 and args.crf_gt_prob != 0.7 and args.activation == "relu":
        settings.append(f"gt={args.crf_gt_prob:g}")
    return paths.derived_dir(cams, *settings)


def check_flags(args: argparse.Namespace) -> None:
    if args.crf_t < 0:
        raise WSSSError(f"--crf_t must be 0 (off) or a number of iterations, got {args.crf_t}")
    if args.crf_t > 0 and not 0 < args.crf_gt_prob < 1:
        raise WSSSError(f"--crf_gt_prob must lie strictly between 0 and 1 for the label CRF, got {args.crf_gt_prob}")


def build_job(args: argparse.Namespace, source: Any, cams: Path, out: Path) -> saliency_masks.SaliencyMaskJob:
    """The settings every worker needs; background-only ids come from the image-level labels."""
    labels = inference.require_labels(source, "scripts/ccam/inference_crf.py (background-only images)")
    return saliency_masks.SaliencyMaskJob(
        source=source,
        cam_dir=cams,
        out_dir=out,
        threshold=args.threshold,
        activation=args.activation,
        crf_t=args.crf_t,
        crf_gt_prob=args.crf_gt_prob,
        allow_pickle=args.allow_pickle,
        background_only=frozenset(inference.split_background_only(labels)[1]),
    )


def check_inputs(args: argparse.Namespace, job: saliency_masks.SaliencyMaskJob, ids: list[str]) -> None:
    """Every id with a foreground class needs a CAM file, and the output folder must be writable."""
    check_writable(job.out_dir, "--output", folder=True)
    missing = job.missing_cam_files(ids)
    if missing:
        needed = len(ids) - len(job.background_only)
        raise WSSSError(
            f"{job.describe_missing(missing, needed)}; run scripts/ccam/inference.py for --domain {args.domain} first"
        )


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_flags(args)
    source = source_from_args(args)
    cams = cam_dir(args)
    out = output_dir(args, cams)
    job = build_job(args, source, cams, out)
    check_inputs(args, job, source.ids)
    inputs = {"cams": manifest.folder_fingerprint(cams)}
    with runtime.stage_run(
        args, "ccam", __file__, out, inputs, runtime.data_context(args), outputs=out.glob(f"*{PNG_SUFFIX}")
    ) as run:
        writer = functools.partial(saliency_masks.write_saliency_masks, job)
        pool = inference.run_over_chunks(
            writer, source.ids, out, PNG_SUFFIX, dist=run.dist, num_workers=args.num_workers,
            desc="saliency masks", log=logger, source_dir=cams,
        )  # fmt: skip
        written, seconds, workers = pool.written, pool.seconds, pool.workers
        zeros = len([i for i in pool.todo if i in job.background_only])
        logger.info(
            "wrote %d saliency masks in %.1f s (%.2f images/s, %.2f per worker on %d) to %s; %d background-only "
            "images got an all-zero mask",
            written,
            seconds,
            written / seconds if seconds > 0 else 0.0,
            written / seconds / workers if seconds > 0 else 0.0,
            workers,
            out,
            zeros,
        )
        run.counts = {"written": written, "skipped": pool.skipped, "background_only": zeros}
        return {**run.counts, "out_dir": str(out), "seconds": seconds}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
