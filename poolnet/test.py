"""PoolNet test: saliency maps of trained PoolNet weights for every image of a domain, as 8-bit grey PNGs.

Per image: sigmoid of the logits at the image size, times 255 (255 = salient), written with
``core.artifacts.save_saliency``. Images are batched by size (a batch holds one size, so any ``--batch_size`` gives
batch 1's maps); small images are upscaled x2 and their maps resized back (``--small_side``). Finished files are
skipped, so an interrupted run resumes; under torchrun each process takes ``ids[rank::world_size]``.

Reads:  experiments/models/<weights or tag>.pth (or a .pth path); the images of --domain (default train_aug)
Writes: experiments/predictions/<tag>@<domain>/<id>.png (or --pred_dir) with args.json, log.txt and manifest.json
        (weights hash, flags, counts)
Example:
    python poolnet/test.py --tag poolnet/voc12-ccamh --data_dir $WSSS_DATA_DIR --domain train_aug --batch_size 8
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable (poolnet is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from core import artifacts, cli, distributed, inference, manifest, paths, runtime
from core.artifacts import PNG_SUFFIX, save_saliency
from core.datasets import source_from_args
from core.errors import WSSSError
from core.precision import compute_format, log_compute_format
from poolnet.data import SizeGroupedBatches, TestImages, same_size_collate, upscaled_size
from poolnet.model import PoolNet, load_poolnet_weights
from poolnet.train import add_network_args

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("poolnet_test", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train_aug")
    add_network_args(parser, training=False)
    group = parser.add_argument_group("test")
    cli.add_arg(group, "--tag", type=str, default=None, help="names the output folder (default: the --weights tag)")
    cli.add_arg(
        group,
        "--weights",
        "--model",
        type=str,
        default=None,
        help="weights tag (experiments/models/<weights>.pth) or a .pth path (default: --tag)",
    )
    cli.add_arg(
        group,
        "--pred_dir",
        "--sal_folder",
        type=str,
        default=None,
        help="output folder (default experiments/predictions/<tag>@<domain>)",
    )
    cli.add_arg(group, "--batch_size", type=cli.positive_int, default=4, help="images per forward pass (one size)")
    cli.add_overwrite_arg(group)
    cli.add_arg(group, "--device", type=str, default="auto", choices=distributed.DEVICES, help="auto = cuda if any")
    cli.add_bool_arg(group, "--mixed_precision", False, "autocast the forward (bf16/fp16 where native; core/precision)")
    cli.add_arg(group, "--num_workers", type=int, default=2, help="image-decoding worker processes per process")
    cli.add_bool_arg(group, "--trust_checkpoint", False, "allow full unpickling of legacy .pth files (trusted only)")
    return parser


def weights_path(args: argparse.Namespace) -> Path:
    name = args.weights or args.tag
    if not name:
        raise WSSSError("no PoolNet weights given; pass --tag TAG (experiments/models/TAG.pth) or --weights PATH")
    path = paths.weights_path(name)
    if not path.is_file():
        hint = (
            "check --weights (--model)"
            if str(name).endswith(paths.WEIGHTS_SUFFIX)
            else (f"train them first (python poolnet/train.py --tag {name} ...) or pass --weights TAG_OR_PTH")
        )
        raise WSSSError(f"PoolNet weights {path} not found; {hint}")
    return path


def output_dir(args: argparse.Namespace) -> Path:
    """``--pred_dir``, else ``experiments/predictions/<tag>@<domain>``."""
    if args.pred_dir:
        return Path(args.pred_dir)
    tag = args.tag or (None if str(args.weights).endswith(paths.WEIGHTS_SUFFIX) else args.weights)
    if not tag:
        raise WSSSError("--weights is a .pth file: pass --tag to name the output folder, or --pred_dir")
    return paths.PREDICTIONS_DIR / f"{paths.check_tag(tag)}@{paths.domain_name(args.domain)}"


@torch.no_grad()
def predict_batch(model: PoolNet, images: torch.Tensor, sizes: list[tuple[int, int]], autocast) -> list[np.ndarray]:
    """Saliency float32 [H, W] in [0, 1] per image, at each image's own size (upscaled inputs are resized back)."""
    with autocast():
        logits = model(images)
    maps = []
    for k, (height, width) in enumerate(sizes):
        logit = logits[k : k + 1].float()
        if tuple(logit.shape[-2:]) != (height, width):
            logit = F.interpolate(logit, size=(height, width), mode="bilinear", align_corners=False)
        maps.append(torch.sigmoid(logit)[0, 0].cpu().numpy())
    return maps


def write_saliency(
    model: PoolNet, source, ids: list[str], out_dir: Path, args: argparse.Namespace, device, fmt
) -> inference.LoopSummary:
    """Predict and write the maps of this rank's pending ids in size-grouped batches; summed over ranks."""
    mine = distributed.shard(ids, distributed.get_rank(), distributed.get_world_size())
    todo = artifacts.pending_ids(mine, out_dir, PNG_SUFFIX)
    done = len(mine) - len(todo)
    logger.info("saliency: %d of %d ids to do on this process (%d already done)", len(todo), len(mine), done)
    input_sizes = [upscaled_size(*source.image_size(i), args.small_side) for i in todo]
    loader = DataLoader(
        TestImages(source, todo, args.small_side),
        batch_sampler=SizeGroupedBatches(input_sizes, args.batch_size),
        num_workers=max(0, args.num_workers),
        collate_fn=same_size_collate,
    )
    start, written = time.perf_counter(), 0
    hide = None if distributed.is_main() else True
    for batch in tqdm(loader, total=len(loader), desc="saliency", disable=hide, leave=False):
        images = batch["image"].to(device)
        if fmt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for image_id, saliency in zip(
            batch["id"], predict_batch(model, images, batch["size"], fmt.autocast), strict=True
        ):
            save_saliency(out_dir / f"{image_id}{PNG_SUFFIX}", saliency)
            written += 1
    return inference.gather_summary(written, done, time.perf_counter() - start)


def main(args: argparse.Namespace) -> dict[str, Any]:
    weights = weights_path(args)
    out_dir = output_dir(args)
    artifacts.check_writable(out_dir, "--pred_dir", folder=True)
    source = source_from_args(args)
    with runtime.stage_run(
        args,
        "poolnet",
        __file__,
        out_dir,
        inputs={"weights": manifest.file_fingerprint(weights)},
        context=runtime.data_context(args),
        ignore={"tag", "weights", "batch_size"},  # batches hold one size: the maps do not depend on it
        outputs=out_dir.glob(f"*{PNG_SUFFIX}"),
        device=args.device,
    ) as run:
        fmt = compute_format(bool(args.mixed_precision), run.device)
        log_compute_format(fmt, "PoolNet test")
        # The checkpoint supplies every weight and its input style; nothing is downloaded.
        model = PoolNet(args.architecture, input_style="torchvision", head_scale=args.head_scale)
        load_poolnet_weights(model, weights, trusted=args.trust_checkpoint)
        model = model.to(run.device).eval()
        if fmt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        logger.info("PoolNet test of %s on %d images of %s -> %s", weights, len(source.ids), args.domain, out_dir)
        summary = write_saliency(model, source, source.ids, out_dir, args, run.device, fmt)
        logger.info(
            "wrote %d saliency maps (%d already done) at %.2f images/s",
            summary.written, summary.skipped, summary.images_per_s,
        )  # fmt: skip
        run.counts = {"written": summary.written, "skipped": summary.skipped}
        return {**run.counts, "out_dir": str(out_dir), "images_per_s": round(summary.images_per_s, 3)}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
