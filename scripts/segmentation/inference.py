"""DeepLabV3+ inference: multi-scale + flip class maps of every image of a domain, optionally refined by a dense CRF.

Per image (SPEC §10.2): for each scale a PIL-bicubic resize, one forward of (image, mirrored image), logits bilinearly
resized to the image, logit + un-mirrored mirror logit; the mean over scales goes through a softmax; with --crf_t > 0
the DeepLab-v2 softmax CRF refines the probabilities (--crf_gt_prob 1, the runner's), or with --crf_gt_prob below 1
the label CRF refines the argmax; the argmax is written as a palette PNG (class ids 0..C, VOC colours). Image-level
labels and ground truth are not needed, so --domain test works. Finished files are skipped, so an interrupted run
resumes; under torchrun each process takes ``ids[rank::world_size]``.

Reads:  experiments/models/<weights or tag>.pth; the images of --domain
Writes: experiments/predictions/<tag>@<domain>@scale=<scales>[@crf=<t>[@gt=<p>]]/<id>.png, with args.json, log.txt
        and manifest.json (weights, flags, counts)
Example:
    python scripts/segmentation/inference.py --tag seg/voc12-d3p-rs269@rw --architecture resnest269 --use_gn true \\
        --dataset voc12 --data_dir $WSSS_DATA_DIR --domain val --scale 0.5,1.0,1.5,2.0 --crf_t 10 --crf_gt_prob 1
    python scripts/evaluate.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain val --mode png \\
        --experiment_name "seg/voc12-d3p-rs269@rw@val@scale=0.5,1.0,1.5,2.0@crf=10"
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import cli, distributed, inference, manifest, paths, runtime
from core.artifacts import PNG_SUFFIX, check_writable, save_label_map
from core.crf import crf_inference_probs, crf_refine_label_map, describe_crf
from core.datasets import source_from_args
from core.errors import WSSSError
from core.precision import ComputeFormat, compute_format, log_compute_format
from core.segmentation import training
from core.segmentation.predict import multiscale_probs

logger = logging.getLogger(__name__)

OOM_HINT = "fewer or smaller --scale values"
MIN_SCALE = 0.1


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("segmentation_inference", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="val")
    group = training.add_network_args(parser, training=False)
    cli.add_run_weights_args(group, "weights tag (experiments/models/<weights>.pth) or a .pth path (default: --tag)")
    group = parser.add_argument_group("inference")
    cli.add_arg(
        group, "--scale", "--scales", type=cli.float_list, default=[0.5, 1.0, 1.5, 2.0], help="comma-separated scales"
    )
    cli.add_bool_arg(group, "--flip", True, "add the mirrored image at every scale")
    cli.add_arg(group, "--crf_t", "--iteration", type=int, default=0, help="dense-CRF iterations (0 = off; runner 10)")
    cli.add_arg(
        group,
        "--crf_gt_prob",
        type=float,
        default=1.0,
        help="1 (default): DeepLab-v2 softmax CRF on the probabilities; below 1: label CRF on the argmax with this "
        "confidence",
    )
    cli.add_overwrite_arg(group)
    cli.add_arg(
        group,
        "--pred_dir",
        type=str,
        default=None,
        help="output folder (default experiments/predictions/<tag>@<domain>@scale=<scales>[@crf=<t>])",
    )
    cli.add_arg(group, "--device", type=str, default="auto", choices=distributed.DEVICES, help="auto = cuda if any")
    cli.add_bool_arg(group, "--mixed_precision", False, "autocast the forward (bf16/fp16 where native)")
    cli.add_arg(group, "--num_workers", type=int, default=4, help="image-decoding worker processes per process")
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    """``--pred_dir``, else ``experiments/predictions/<tag>@<domain>@scale=<scales>[@crf=<t>[@gt=<p>]]``."""
    if args.pred_dir:
        return Path(args.pred_dir)
    folder = paths.predictions_dir(args.tag, args.domain, args.scale)
    if args.crf_t <= 0:
        return folder
    settings = [f"crf={args.crf_t}"] + ([f"gt={args.crf_gt_prob:g}"] if args.crf_gt_prob < 1 else [])
    return paths.derived_dir(folder, *settings)


def check_flags(args: argparse.Namespace) -> None:
    if not args.scale or min(args.scale) < MIN_SCALE:
        raise WSSSError(f"--scale {paths.format_scales(args.scale)}: every scale must be at least {MIN_SCALE}")
    if args.crf_t < 0 or not 0 < args.crf_gt_prob <= 1:
        raise WSSSError(f"--crf_t must be >= 0 and --crf_gt_prob in (0, 1]; got {args.crf_t}, {args.crf_gt_prob}")
    check_writable(output_dir(args), "--pred_dir", folder=True)


def make_writer(
    args: argparse.Namespace, model: nn.Module, device: torch.device, out_dir: Path, fmt: ComputeFormat, palette: Any
) -> Callable[[dict[str, Any]], None]:
    """The per-image step of :func:`core.inference.run_over_images`: TTA probabilities, CRF, argmax -> ``<id>.png``."""

    def write(item: dict[str, Any]) -> None:
        image = item["image"]
        with inference.stop_on_oom(item["id"], image.shape[:2], OOM_HINT):
            probs = multiscale_probs(
                model,
                image,
                args.scale,
                device=device,
                flip=args.flip,
                amp_dtype=fmt.amp_dtype,
                channels_last=fmt.channels_last,
            )
        if args.crf_t > 0 and args.crf_gt_prob >= 1:
            probs = torch.from_numpy(crf_inference_probs(image, probs.cpu().numpy(), t=args.crf_t))
        prediction = probs.argmax(dim=0).cpu().numpy().astype(np.uint8)
        if args.crf_t > 0 and args.crf_gt_prob < 1:
            prediction = crf_refine_label_map(image, prediction, t=args.crf_t, gt_prob=args.crf_gt_prob)
        save_label_map(out_dir / f"{item['id']}{PNG_SUFFIX}", prediction, palette)

    return write


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_flags(args)
    source = source_from_args(args)
    out_dir = output_dir(args)
    name = args.weights or args.tag
    weights = paths.existing_weights_path(name, f"train them first (python scripts/segmentation/train.py --tag {name})")
    # Loaded before the folder is made: a checkpoint of another network or class count leaves nothing behind.
    model = training.trained_network(args, source.num_classes + 1, weights, torch.device("cpu"))
    with runtime.stage_run(
        args,
        "seg",
        __file__,
        out_dir,
        inputs={"weights": manifest.file_fingerprint(weights)},
        context=runtime.data_context(args),
        ignore={"num_workers"},
        outputs=out_dir.glob(f"*{PNG_SUFFIX}"),
        device=args.device,
    ) as run:
        fmt = compute_format(bool(args.mixed_precision), run.device)
        log_compute_format(fmt, "segmentation inference")
        model = model.to(run.device)
        if fmt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        logger.info(
            "DeepLabV3+ inference of %s on %d images of %s, scales %s%s, CRF %s -> %s",
            weights, len(source.ids), args.domain, paths.format_scales(args.scale), " + flip" if args.flip else "",
            describe_crf(args.crf_t, args.crf_gt_prob, probabilities=args.crf_gt_prob >= 1), out_dir,
        )  # fmt: skip
        writer = make_writer(args, model, run.device, out_dir, fmt, source.palette)
        summary = inference.run_over_images(
            source, source.ids, writer, out_dir, PNG_SUFFIX, num_workers=args.num_workers, desc="segmentation"
        )
        logger.info(
            "wrote %d masks (%d already done) at %.2f images/s", summary.written, summary.skipped, summary.images_per_s
        )
        run.counts = {"written": summary.written, "skipped": summary.skipped}
        return {**run.counts, "out_dir": str(out_dir), "images_per_s": round(summary.images_per_s, 3)}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
