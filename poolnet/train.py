"""Train PoolNet on saliency PNGs (stage 2: the C²AM-H + CRF maps), through the shared training engine.

Recipe of the reference (SPEC §8): BCE-with-logits summed over the pixels and divided by (accumulation x batch),
gradients accumulated over 10 batches, Adam lr 5e-5 with weight decay 5e-4 (L2), 9 epochs, random horizontal flip,
the backbone's BatchNorm frozen (running statistics, no affine updates; the head has no BatchNorm). Batches larger
than 1 pad their images to a common size and leave the padding out of the loss (poolnet/data.py).
``--lr_alpha_scratch``/``--lr_alpha_bias`` default to 1 here: one learning rate for every parameter, as the reference.

Reads:  <data_dir> images of --domain (default train_aug); <sal_dir>/<id>.png (single-channel, 0..255, image size)
Writes: experiments/models/<tag>.pth (PoolNet weights); experiments/models/<tag>/{last.pth, args.json, log.txt,
        metrics.jsonl, manifest.json}
Example:
    python poolnet/train.py --tag poolnet/voc12-ccamh --data_dir $WSSS_DATA_DIR \\
        --sal_dir experiments/predictions/saliency/voc12-ccamh@train_aug@t=0.2@crf=10
    torchrun --nproc_per_node=4 poolnet/train.py ... --batch_size 8 --accumulate_steps 2 --mixed_precision true
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable (poolnet is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.nn.functional as F

from core import cli, engine, manifest, runtime
from core.datasets import source_from_args
from core.errors import WSSSError
from core.models import BACKBONES
from core.optim import build_optimizer, build_param_groups
from poolnet.data import SaliencyDataset, check_saliency_folder, pad_collate
from poolnet.model import PoolNet

logger = logging.getLogger(__name__)

SMALL_SIDE = 100


def add_network_args(parser: argparse.ArgumentParser, training: bool) -> argparse._ArgumentGroup:
    """``--architecture``, ``--head_scale`` and ``--small_side`` (train.py and test.py); training adds
    ``--backbone_weights`` and ``--input_style`` (at test time the checkpoint supplies every weight and the style)."""
    group = parser.add_argument_group("network")
    cli.add_arg(
        group, "--architecture", type=str, default="resnet50", choices=list(BACKBONES), help="PoolNet's base network"
    )
    cli.add_arg(
        group,
        "--small_side",
        type=int,
        default=SMALL_SIDE,
        help="images whose shorter side is at most this are upscaled x2 (test maps are resized back); 0 = never",
    )
    cli.add_arg(
        group,
        "--head_scale",
        type=float,
        default=1.0,
        help="multiplies PoolNet's head widths (1 = the reference's 512/256/128 channels; 0.25 for CPU runs)",
    )
    if not training:
        return group
    cli.add_arg(
        group,
        "--backbone_weights",
        type=str,
        default="imagenet",
        help="imagenet (torchvision/ResNeSt file from the torch hub cache), none, or a .pth: a torchvision/ResNeSt "
        "state dict, or the reference's Caffe ResNet-50 (resnet50_caffe.pth, a manual download), which switches the "
        "input to BGR minus the Caffe mean (see --input_style)",
    )
    cli.add_arg(
        group,
        "--input_style",
        type=str,
        default="auto",
        choices=("auto", "torchvision", "caffe"),
        help="input normalisation and stride layout: torchvision = RGB with ImageNet mean/std; caffe = BGR minus "
        "the Caffe mean, no std, strides in the 1x1 convs (the reference's ResNet); auto = caffe when "
        "--backbone_weights is a file named *caffe* or in Caffe key naming. Saved with the weights",
    )
    return group


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("poolnet_train", description=__doc__.splitlines()[0], add_help=add_help)
    group = cli.add_dataset_args(parser, domain="train_aug")
    cli.add_arg(
        group,
        "--sal_dir",
        "--pseudo_root",
        "--label_dir",
        type=str,
        default=None,
        help="folder of saliency PNGs <id>.png to train on (single-channel 0..255, 255 = salient, at the image size)",
    )
    add_network_args(parser, training=True)
    engine.add_training_args(
        parser,
        batch_size=1,
        max_epoch=9,
        lr=5e-5,
        wd=5e-4,
        optimizer="adam",
        accumulate_steps=10,
        accumulate_mean=True,
        lr_alpha_scratch=1.0,
        lr_alpha_bias=1.0,
    )
    parser.set_defaults(num_workers=2)
    parser.epilog = (
        "--batch_size > 1 pads the images of a batch to its largest height and width (bottom/right, black) and keeps "
        "the padding out of the loss; the loss is divided by the batch, so the gradient scale matches batch 1."
    )
    return parser


def starting_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """What the run's content depends on besides its flags: the saliency folder and a backbone weights file."""
    inputs = {"saliency": manifest.folder_fingerprint(args.sal_dir)}
    if args.backbone_weights and os.path.isfile(args.backbone_weights):
        inputs["backbone_weights"] = manifest.file_fingerprint(args.backbone_weights)
    return inputs


def make_step_fn(batch_size: int) -> engine.StepFn:
    """BCE with logits summed over valid pixels and divided by the per-process batch (the engine divides by the
    accumulation with ``--accumulate_mean true``, the reference's ``/ (iter_size x batch_size)``)."""

    def step(ctx: engine.TrainContext, batch: dict[str, Any], index: int) -> dict[str, float]:
        images, labels = ctx.to_device(batch["image"]), ctx.to_device(batch["label"])
        valid = ctx.to_device(batch["valid"]).float()
        with ctx.autocast():
            logits = ctx.models["poolnet"](images)
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
        loss = (bce * valid).sum() / batch_size
        ctx.update("poolnet", loss)
        return {"loss": loss.item()}

    return step


def main(args: argparse.Namespace) -> dict[str, Any]:
    if not args.sal_dir:
        raise WSSSError("no saliency folder given; pass --sal_dir (alias --pseudo_root) with the PNGs to train on")
    source = source_from_args(args)
    sizes = check_saliency_folder(source, Path(args.sal_dir))
    with runtime.training_run(
        args, "poolnet", __file__, inputs=starting_inputs(args), context=runtime.data_context(args)
    ) as run:
        dataset = SaliencyDataset(source, Path(args.sal_dir), sizes, args.small_side)
        loader = engine.build_loader(dataset, run, train=True, collate_fn=pad_collate)
        ctx = engine.TrainContext(run, steps_per_epoch=len(loader))
        model = PoolNet(
            args.architecture,
            backbone_weights=args.backbone_weights,
            input_style=args.input_style,
            head_scale=args.head_scale,
        )
        groups = build_param_groups(model.param_groups(), args.lr, args.wd, args.lr_alpha_scratch, args.lr_alpha_bias)
        ctx.add("poolnet", model, build_optimizer(groups, args.optimizer), max_grad_norm=args.max_grad_norm)
        logger.info(
            "PoolNet (%s, %s input) on %d images of %s with saliency from %s; %d optimizer steps of %d images",
            args.architecture, model.style, len(dataset), args.domain, args.sal_dir,
            ctx.total_optimizer_steps, args.batch_size * ctx.accumulate_steps,
        )  # fmt: skip
        return engine.fit(ctx, loader, make_step_fn(run.local_batch_size))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
