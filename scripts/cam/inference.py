"""CAM inference: multi-scale + flip class activation maps of a trained classifier for every image of a domain.

Per image (SPEC §5): for each scale a PIL-bicubic resize, one forward of (image, mirrored image) as a batch of 2
(``--batch_size N``: N images of one size share each pass, with the same CAMs), ReLU, map + un-mirrored map; the
scales are summed after bilinear resizing to the stride-4 size (``cam``) and to the image size (``hr_cam``); only the
image's ground-truth classes are kept, each divided by its own maximum. Images whose label has no foreground class get
no file (``--exclude_bg_images true``, counted in the log). Finished files are skipped, so an interrupted run resumes;
under torchrun each process takes ``ids[rank::world_size]``.
The maps are the network's own CAMs: a SEAM checkpoint (``train_seam.py``, or a released SEAM/PPC ResNet-38 ``.pth``
with ``--architecture resnet38 --mode fix``) is recognised by its PCM weights and gives its PCM-refined maps; an EPS
checkpoint the foreground channels of its softmax.

Reads:  experiments/models/<weights or tag>.pth; the images and image-level labels of --domain
Writes: experiments/predictions/<tag>@<domain>@scale=<scales>/<id>.npz (keys, cam, hr_cam; see core/artifacts.py),
        with args.json, log.txt and manifest.json (weights, flags, counts; core/manifest.py)
Example:
    python scripts/cam/inference.py --architecture resnest269 --tag pnoc/voc12-rs269-pnoc \\
        --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train --mixed_precision true
    torchrun --nproc_per_node=4 scripts/cam/inference.py --architecture resnest269 --tag pnoc/voc12-rs269-pnoc ...
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import cli, distributed, inference, manifest, paths, runtime
from core.artifacts import CAM_SUFFIX, cam_path, check_writable, save_cam
from core.cam import training
from core.cam.cams import multiscale_cams_batch
from core.datasets import source_from_args
from core.datasets.transforms import resize_image
from core.errors import WSSSError
from core.labels import foreground_keys
from core.models import BACKBONES
from core.precision import ComputeFormat, compute_format, log_compute_format

logger = logging.getLogger(__name__)

OOM_HINT = "--resize 512 (or smaller) or fewer --scales"
MIN_SCALE = 0.1  # smaller scales shrink a typical image below one output-stride cell of the network


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("cam_inference", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train")
    group = parser.add_argument_group("classifier")
    cli.add_arg(group, "--architecture", type=str, default="resnet50", choices=list(BACKBONES), help="backbone network")
    cli.add_arg(
        group,
        "--backbone_weights",
        type=str,
        default="none",
        help="initial backbone weights (default none: the checkpoint supplies every weight, nothing is downloaded)",
    )
    cli.add_arg(
        group, "--mode", type=str, default="normal", choices=("normal", "fix"), help="BatchNorm mode of the run"
    )
    cli.add_bool_arg(group, "--dilated", False, "output stride 8 instead of 16 (as the run was trained)")
    cli.add_bool_arg(group, "--trainable-stem", True, "accepted for command-line compatibility; no effect at inference")
    cli.add_arg(
        group,
        "--regularization",
        type=str,
        default="none",
        choices=("none",),
        help="accepted for command-line compatibility (only none)",
    )
    cli.add_run_weights_args(group, "weights tag (experiments/models/<weights>.pth) or a .pth path (default: --tag)")
    group = parser.add_argument_group("inference")
    cli.add_arg(group, "--scales", type=cli.float_list, default=[0.5, 1.0, 1.5, 2.0], help="comma-separated scales")
    cli.add_arg(
        group,
        "--resize",
        type=int,
        default=None,
        help="square pre-resize to N x N pixels for huge images (CAMs are mapped back to the original size)",
    )
    cli.add_arg(
        group,
        "--batch_size",
        type=cli.positive_int,
        default=1,
        help="images of one size per forward pass (each with its mirror); more keeps a CPU or GPU busier on small "
        "images, and the CAMs stay the same (default 1, the reference's one image per pass)",
    )
    cli.add_bool_arg(group, "--exclude_bg_images", True, "write no file for images without a foreground class")
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
    cli.add_bool_arg(
        group,
        "--mixed_precision",
        False,
        "autocast the forward: bf16 where supported (recent GPUs, CPUs with native bf16), fp16 on older GPUs; "
        "fp32 on a CPU without bf16 (core/precision.py)",
    )
    cli.add_arg(group, "--num_workers", type=int, default=4, help="image-decoding worker processes per process")
    return parser


def weights_path(args: argparse.Namespace) -> Path:
    """``--weights`` as a ``.pth`` path, else ``experiments/models/<weights or tag>.pth``; must exist."""
    name = args.weights or args.tag
    return paths.existing_weights_path(name, f"train them first (e.g. python scripts/cam/train_pnoc.py --tag {name})")


def build_model(
    args: argparse.Namespace, num_classes: int, device: torch.device, path: Path, fmt: ComputeFormat
) -> nn.Module:
    """The classifier of the flags with the weights of ``path``, on ``device``, in eval mode (and ``fmt``'s layout)."""
    model = training.trained_classifier(args, num_classes, path, device)
    return model.to(memory_format=torch.channels_last) if fmt.channels_last else model


def output_dir(args: argparse.Namespace) -> Path:
    """``--pred_dir``, else ``experiments/predictions/<tag>@<domain>@scale=<scales>``."""
    return Path(args.pred_dir) if args.pred_dir else paths.predictions_dir(args.tag, args.domain, args.scales)


def check_flags(args: argparse.Namespace) -> None:
    if not args.scales or min(args.scales) < MIN_SCALE:
        shown = paths.format_scales(args.scales)
        raise WSSSError(f"--scales {shown}: every scale must be at least {MIN_SCALE} (e.g. --scales 0.5,1.0,1.5,2.0)")
    if args.resize is not None and args.resize < 16:
        raise WSSSError(f"--resize {args.resize} is too small; use at least 16 pixels, or leave it out")
    check_writable(output_dir(args), "--pred_dir", folder=True)


def make_cam_writer(
    args: argparse.Namespace, model: nn.Module, device: torch.device, out_dir: Path, fmt: ComputeFormat
) -> Callable[[list[dict[str, Any]]], None]:
    """The step of :func:`core.inference.run_over_image_batches`: CAMs of the GT classes of images of one size (after
    ``--resize``) -> one ``<id>.npz`` each."""

    def write(items: list[dict[str, Any]]) -> None:
        sizes = [item["image"].shape[:2] for item in items]
        images = [
            resize_image(item["image"], args.resize, args.resize) if args.resize else item["image"] for item in items
        ]
        with inference.stop_on_oom([item["id"] for item in items], sizes[0], OOM_HINT):
            results = multiscale_cams_batch(
                model,
                images,
                args.scales,
                device=device,
                keys=[foreground_keys(item["label"]) for item in items],
                amp_dtype=fmt.amp_dtype,
                channels_last=fmt.channels_last,
                output_sizes=sizes,
            )
        for item, (keys, cam, hr_cam) in zip(items, results, strict=True):
            save_cam(cam_path(out_dir, item["id"]), keys, cam, hr_cam)

    return write


def batch_key(args: argparse.Namespace) -> Callable[[dict[str, Any]], Hashable]:
    """Which images may share a forward pass: those of one shape, or all of them under ``--resize``."""
    return (lambda item: None) if args.resize else inference.image_shape


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_flags(args)
    source = source_from_args(args)
    out_dir = output_dir(args)
    weights = weights_path(args)
    labels = inference.require_labels(source, "CAM inference")
    with_fg, background_only = inference.split_background_only(labels)
    if not with_fg:
        raise WSSSError(
            f"no image of --domain {args.domain} has a foreground class in its labels; CAM inference needs "
            "image-level labels (unlabelled lists such as VOC test cannot be used)"
        )
    ids, excluded = (with_fg, len(background_only)) if args.exclude_bg_images else (list(labels), 0)
    with runtime.stage_run(
        args,
        "cam",
        __file__,
        out_dir,
        inputs={"weights": manifest.file_fingerprint(weights)},
        context=runtime.data_context(args),
        ignore={"exclude_bg_images", "batch_size"},  # which ids get a file / how many share a pass, not their content
        outputs=out_dir.glob(f"*{CAM_SUFFIX}"),
        device=args.device,
    ) as run:
        fmt = compute_format(bool(args.mixed_precision), run.device)
        log_compute_format(fmt, "CAM inference")
        model = build_model(args, source.num_classes, run.device, weights, fmt)
        logger.info(
            "CAM inference of %s on %d of %d images of %s (%d without foreground excluded), scales %s -> %s",
            weights, len(ids), len(labels), args.domain, excluded, paths.format_scales(args.scales), out_dir,
        )  # fmt: skip
        writer = make_cam_writer(args, model, run.device, out_dir, fmt)
        summary = inference.run_over_image_batches(
            source,
            ids,
            writer,
            out_dir,
            CAM_SUFFIX,
            batch_size=args.batch_size,
            group_key=batch_key(args),
            num_workers=args.num_workers,
            desc="cams",
        )
        logger.info(
            "wrote %d CAM files (%d already done) at %.2f images/s; %d background-only images got no file",
            summary.written, summary.skipped, summary.images_per_s, excluded,
        )  # fmt: skip
        run.counts = {"written": summary.written, "skipped": summary.skipped, "excluded": excluded}
        return {**run.counts, "out_dir": str(out_dir), "images_per_s": round(summary.images_per_s, 3)}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
