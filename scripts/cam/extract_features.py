"""Extract the GAP feature of every image of a domain with a trained classifier (SC-CAM round input, METHODS §10).

Per image, at scale 1 and unflipped: the spatial mean of the backbone's last feature map (``D`` = 2048 for a
ResNet-50, 768 for ViT-B/16: its mean patch token). The model is the CAM classifier of the previous round (a
two-head SC-CAM model loads too: its sub-category head is not used) or, for Sub-category Teaching, a ViT teacher
(``--teacher vit_base_patch16_224`` is ``--architecture``'s alias) trained with ``train_vanilla.py``. Images go in
batches of equal size, or all resized to ``--image_size`` squared (224 for the ViT teacher, as the school project).

One file, written atomically at the end; not resumable per image, since it is cheap (one forward per image at
scale 1: about a minute per 10k VOC images on a GPU). A rerun with the same flags and weights finds the finished
file and stops; other flags or weights refuse unless --overwrite true. Single process (no torchrun).

Reads:  experiments/models/<weights or tag>.pth; the images and image-level labels of --domain
Writes: experiments/predictions/<tag>@<domain>@features/features.npz (features float32 [N, D], ids, labels
        float32 [N, C], dataset, domain) with args.json, log.txt and manifest.json
Example:
    python scripts/cam/extract_features.py --architecture resnet50 --tag sc-cam/voc12-r50-round0 \\
        --data_dir $WSSS_DATA_DIR --domain train_aug
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from core import cli, distributed, inference, manifest, paths, runtime
from core.cam import subcategory, training
from core.cam.subcategory import FeatureFile
from core.datasets import source_from_args
from core.errors import WSSSError
from core.models import BACKBONES
from core.precision import compute_format, log_compute_format

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("extract_features", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train_aug")
    group = parser.add_argument_group("model")
    cli.add_arg(
        group,
        "--architecture",
        "--teacher",
        type=str,
        default="resnet50",
        choices=list(BACKBONES),
        help="backbone of the weights (--teacher NAME: the same, for a ViT teacher)",
    )
    cli.add_arg(
        group, "--mode", type=str, default="normal", choices=("normal", "fix"), help="BatchNorm mode of the run"
    )
    cli.add_bool_arg(group, "--dilated", False, "output stride 8 instead of 16 (as the run was trained)")
    cli.add_run_weights_args(group, "weights tag or .pth path (default: experiments/models/<tag>.pth)")
    group = parser.add_argument_group("features")
    cli.add_arg(group, "--image_size", type=int, default=0, help="resize every image to N x N (0 = original size)")
    cli.add_arg(group, "--batch_size", type=cli.positive_int, default=16, help="images per forward pass")
    cli.add_arg(group, "--pred_dir", type=str, default=None, help="output folder (default <tag>@<domain>@features)")
    cli.add_overwrite_arg(group)
    cli.add_arg(group, "--device", type=str, default="auto", choices=distributed.DEVICES, help="auto = cuda if any")
    cli.add_bool_arg(group, "--mixed_precision", False, "autocast the forward (bf16/fp16; features stay float32)")
    cli.add_arg(group, "--num_workers", type=int, default=4, help="image-decoding worker processes")
    parser.set_defaults(backbone_weights="none", trainable_stem=True)  # the checkpoint supplies every weight
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    if args.pred_dir:
        return Path(args.pred_dir)
    return paths.PREDICTIONS_DIR / f"{paths.check_tag(args.tag)}@{paths.domain_name(args.domain)}@features"


def weights_path(args: argparse.Namespace) -> Path:
    return paths.existing_weights_path(args.weights or args.tag, "train the model first")


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.image_size < 0 or 0 < args.image_size < 16:
        raise WSSSError(f"--image_size {args.image_size}: use 0 (original size) or at least 16 pixels")
    if distributed.get_world_size() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise WSSSError("extract_features.py runs in one process; start it with python, not torchrun")
    source = source_from_args(args)
    weights = weights_path(args)
    labels = inference.require_labels(source, "feature extraction")
    out_dir = output_dir(args)
    out_file = out_dir / subcategory.FEATURES_FILE
    with runtime.stage_run(
        args,
        "cam",
        __file__,
        out_dir,
        inputs={"weights": manifest.file_fingerprint(weights)},
        context=runtime.data_context(args),
        ignore={"num_workers", "batch_size"},
        outputs=[out_file] if out_file.exists() else [],
        device=args.device,
    ) as run:
        if out_file.is_file():
            logger.info("%s already done (same flags and weights)", out_file)
            run.counts = {"images": len(labels), "skipped": True}
            return {"features_path": str(out_file), "images": len(labels), "skipped": True}
        fmt = compute_format(bool(args.mixed_precision), run.device)
        log_compute_format(fmt, "feature extraction")
        model = training.trained_classifier(args, source.num_classes, weights, run.device)
        ids = list(labels)
        features = subcategory.extract_features(
            model, source, ids, run.device, batch_size=args.batch_size, image_size=args.image_size or None,
            num_workers=args.num_workers, autocast=fmt.autocast,
        )  # fmt: skip
        label_rows = [labels[i] for i in ids]
        data = FeatureFile(ids, features, np.stack(label_rows), args.dataset, args.domain)
        subcategory.save_features(out_file, data)
        logger.info("%d features of %d dimensions from %s -> %s", *features.shape, weights, out_file)
        run.counts = {"images": len(ids), "dimensions": int(features.shape[1])}
        return {"features_path": str(out_file), "images": len(ids), "dimensions": int(features.shape[1])}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
