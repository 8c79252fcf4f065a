"""C²AM inference: multi-scale + flip foreground maps of a trained C²AM(-H) network for every image of a domain.

Per image (SPEC §7.3): for each scale a PIL-bicubic resize and one forward of (image, mirrored image), up to
``--batch_size`` images of one size per pass; the map's logits are turned foreground-high by the polarity decision
stored in the weights (``--polarity``), activated (``--activation relu``, the reference's, or ``sigmoid``), averaged
over scales and flips after bilinear resizing, and divided by their maximum. Every id gets a one-plane CAM file
(``keys = [1]``: the plane is the foreground, whatever the image's classes), so ``scripts/evaluate.py``,
``scripts/ccam/inference_crf.py`` and the CAM tools read it. Finished files are skipped, so an interrupted run
resumes; under torchrun each process takes ``ids[rank::world]``.

Reads:  experiments/models/<weights or tag>.pth; the images of --domain
Writes: experiments/predictions/<tag>@<domain>@scale=<scales>/<id>.npz (keys [1], cam, hr_cam; core/artifacts.py),
        with args.json, log.txt and manifest.json (weights, flags, polarity, counts)
Example (P-NOC README):
    python scripts/ccam/inference.py --tag voc12-ccamh-rs269@rs269pnoc --architecture resnest269 \\
        --stage4_out_features 1024 --domain train_aug --dataset voc12 --data_dir $WSSS_DATA_DIR
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import cli, distributed, inference, manifest, paths, runtime
from core.artifacts import CAM_SUFFIX, cam_path, check_writable, save_cam
from core.ccam import training
from core.ccam.network import CCAM, load_ccam_weights
from core.datasets import source_from_args
from core.errors import WSSSError
from core.multiscale import ACTIVATIONS, multiscale_cams_batch
from core.precision import ComputeFormat, compute_format, log_compute_format

logger = logging.getLogger(__name__)

OOM_HINT = "fewer or smaller --scales"
MIN_SCALE = 0.1
FOREGROUND_KEYS = np.array([1], dtype=np.int64)
POLARITIES = ("checkpoint", "auto", "normal", "inverted")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ccam_inference", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train")
    group = training.add_network_args(parser, training=False)
    cli.add_run_weights_args(
        group,
        "weights tag (experiments/models/<weights>.pth) or a .pth path (default: --tag; --pretrained is the "
        "reference's name)",
        "--pretrained",
    )
    group = parser.add_argument_group("inference")
    cli.add_arg(group, "--scales", type=cli.float_list, default=[0.5, 1.0, 1.5, 2.0], help="comma-separated scales")
    cli.add_arg(
        group, "--activation", type=str, default="relu", choices=tuple(ACTIVATIONS), help="applied to the map logits"
    )
    cli.add_arg(
        group,
        "--polarity",
        type=str,
        default="checkpoint",
        choices=POLARITIES,
        help="checkpoint (default): the training run's decision (a reference checkpoint without one: auto); auto: "
        "decide again from the border band of the first --polarity_images images; normal/inverted: force it",
    )
    cli.add_arg(group, "--polarity_images", type=cli.positive_int, default=64, help="images of --polarity auto")
    cli.add_arg(group, "--image_size", type=cli.positive_int, default=448, help="image size of --polarity auto")
    cli.add_overwrite_arg(group)
    cli.add_arg(
        group,
        "--pred_dir",
        type=str,
        default=None,
        help="output folder (default experiments/predictions/<tag>@<domain>@scale=<scales>)",
    )
    cli.add_arg(
        group, "--device", type=str, default="auto", choices=distributed.DEVICES, help="auto = cuda if available"
    )
    cli.add_bool_arg(group, "--mixed_precision", False, "autocast the forward (bf16/fp16 where supported)")
    cli.add_arg(group, "--num_workers", type=int, default=4, help="image-decoding worker processes per process")
    cli.add_arg(
        group,
        "--batch_size",
        type=cli.positive_int,
        default=8,
        help="images per batch of --polarity auto, and images of one size per inference pass (the maps stay the same)",
    )
    return parser


def weights_path(args: argparse.Namespace) -> Path:
    """``--weights`` as a ``.pth`` path, else ``experiments/models/<weights or tag>.pth``; must exist."""
    name = args.weights or args.tag
    return paths.existing_weights_path(name, f"train them first (python scripts/ccam/train_hints.py --tag {name})")


def output_dir(args: argparse.Namespace) -> Path:
    return Path(args.pred_dir) if args.pred_dir else paths.predictions_dir(args.tag, args.domain, args.scales)


def build_model(args: argparse.Namespace, path: Path, run: Any, source: Any, fmt: ComputeFormat) -> CCAM:
    """The network with the weights of ``path`` and the polarity of ``--polarity``, on the device, in eval mode."""
    model = training.network_from_flags(args)
    has_polarity = load_ccam_weights(model, path, trusted=args.trust_checkpoint)
    model = model.to(run.device).eval()
    polarity = args.polarity if args.polarity != "checkpoint" or has_polarity else "auto"
    if polarity == "auto":
        if args.polarity == "checkpoint":
            logger.info("%s carries no polarity decision (a reference checkpoint): deciding it now", path)
        loader = training.polarity_loader(source, args.image_size, args.polarity_images, run, args.batch_size)
        training.decide_polarity(model, loader, run.device, args.polarity_images, fmt.autocast)
    elif polarity != "checkpoint":
        model.set_inverted(polarity == "inverted")
    logger.info("polarity (%s): %s", polarity, "inverted map, negated" if model.is_inverted else "normal map")
    return model.to(memory_format=torch.channels_last) if fmt.channels_last else model


def make_writer(
    args: argparse.Namespace, model: CCAM, device: torch.device, out_dir: Path, fmt: ComputeFormat
) -> Callable[[list[dict[str, Any]]], None]:
    """The step of :func:`core.inference.run_over_image_batches`: foreground maps of images of one size -> one
    ``<id>.npz`` each."""

    def write(items: list[dict[str, Any]]) -> None:
        images = [item["image"] for item in items]
        with inference.stop_on_oom([item["id"] for item in items], images[0].shape[:2], OOM_HINT):
            results = multiscale_cams_batch(
                model,
                images,
                args.scales,
                device=device,
                keys=[FOREGROUND_KEYS] * len(images),
                amp_dtype=fmt.amp_dtype,
                channels_last=fmt.channels_last,
                activation=args.activation,
                average=True,
            )
        for item, (keys, cam, hr_cam) in zip(items, results, strict=True):
            save_cam(cam_path(out_dir, item["id"]), keys, cam, hr_cam)

    return write


def main(args: argparse.Namespace) -> dict[str, Any]:
    if not args.scales or min(args.scales) < MIN_SCALE:
        raise WSSSError(f"--scales {paths.format_scales(args.scales)}: every scale must be at least {MIN_SCALE}")
    out_dir = output_dir(args)
    check_writable(out_dir, "--pred_dir", folder=True)
    source = source_from_args(args)
    weights = weights_path(args)
    with runtime.stage_run(
        args,
        "ccam",
        __file__,
        out_dir,
        inputs={"weights": manifest.file_fingerprint(weights)},
        context=runtime.data_context(args),
        ignore={"polarity_images", "image_size", "batch_size"},
        outputs=out_dir.glob(f"*{CAM_SUFFIX}"),
        device=args.device,
    ) as run:
        fmt = compute_format(bool(args.mixed_precision), run.device)
        log_compute_format(fmt, "C²AM inference")
        model = build_model(args, weights, run, source, fmt)
        logger.info(
            "C²AM inference of %s on %d images of %s, scales %s, %s -> %s",
            weights, len(source.ids), args.domain, paths.format_scales(args.scales), args.activation, out_dir,
        )  # fmt: skip
        writer = make_writer(args, model, run.device, out_dir, fmt)
        summary = inference.run_over_image_batches(
            source,
            source.ids,
            writer,
            out_dir,
            CAM_SUFFIX,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            desc="saliency maps",
        )
        logger.info(
            "wrote %d maps (%d already done) at %.2f images/s", summary.written, summary.skipped, summary.images_per_s
        )
        run.counts = {"written": summary.written, "skipped": summary.skipped, "inverted": bool(model.is_inverted)}
        return {**run.counts, "out_dir": str(out_dir), "images_per_s": round(summary.images_per_s, 3)}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
