"""AffinityNet training (SPEC §9.2, METHODS §2): flags, the network and its optimizer, the step, and the recipe
:func:`train_affinity` that ``scripts/rw/train_affinity.py`` runs through the one engine (:mod:`core.engine`).

``--method irn``: only the edge branch trains (a single parameter group: poly SGD, lr 0.1, wd 1e-4 on every edge
parameter, momentum 0); the backbone is frozen in eval mode; labels at stride 4, pairs closer than 10 cells.
``--method psa``: the whole PSA AffinityNet trains (stem frozen) with the four LR groups (backbone x1, new layers
x10, biases x2), poly SGD, lr 0.01 (SEAM/PPC; PSA used 0.1), wd 5e-4, batch 8, 8 epochs, crop 448 after a random
longer side 448-768; labels at stride 8, pairs closer than 5 cells. Anomaly detection, which the reference leaves on
(SPEC §13.6), is never enabled.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

from core import distributed, engine, manifest, runtime
from core.cli import add_arg, add_bool_arg, add_dataset_args, positive_int
from core.datasets import source_from_args
from core.datasets.transforms import build_segmentation_transform
from core.engine import TrainContext, build_loader
from core.errors import WSSSError
from core.models import BACKBONES
from core.models.backbones import VIT_ARCHITECTURES
from core.models.initialization import add_scratch_init_arg
from core.optim import PolyLR, build_optimizer, build_param_groups
from core.rw import data, losses
from core.rw.network import EDGE_STRIDE, AffinityNet
from core.rw.psa import FEATURE_STRIDE, PsaAffinityNet
from core.rw.recipes import MethodDefaultsParser, add_method_arg

logger = logging.getLogger(__name__)

MODEL_NAME = "aff"
ARCHITECTURES = [name for name in BACKBONES if name not in VIT_ARCHITECTURES]
# The recipes (IRN: SPEC §9.2; PSA: METHODS §2 with SEAM/PPC's lr 0.01, PSA's was 0.1).
METHOD_DEFAULTS = {
    "irn": {"lr": 0.1, "wd": 1e-4, "max_epoch": 3, "batch_size": 32, "image_size": 512, "min_image_size": 320,
            "max_image_size": 640, "dilated": False},
    "psa": {"lr": 0.01, "wd": 5e-4, "max_epoch": 8, "batch_size": 8, "image_size": 448, "min_image_size": 448,
            "max_image_size": 768, "dilated": True},
}  # fmt: skip
STRIDES = {"irn": EDGE_STRIDE, "psa": FEATURE_STRIDE}  # of the label grid
RADII = {"irn": losses.TRAIN_RADIUS, "psa": losses.PSA_RADIUS}  # of the training pairs


def add_affinity_args(parser: argparse.ArgumentParser) -> None:
    """Data and network flags of AffinityNet training (the reference's names and defaults)."""
    group = add_dataset_args(parser, domain="train_aug")
    add_method_arg(
        group, "irn: IRN's boundary AffinityNet (P-NOC); psa: PSA's feature AffinityNet (PSA, SEAM, PPC; METHODS §2)"
    )
    add_arg(
        group,
        "--label_dir",
        type=str,
        default=None,
        help="folder of <id>.png affinity labels of --domain (scripts/rw/make_affinity_labels.py): 0 background, "
        "1..C classes, 255 uncertain",
    )
    add_arg(group, "--image_size", type=positive_int, default=None, help="training crop S (pixels)")
    add_arg(group, "--min_image_size", type=positive_int, default=None, help="smallest random longer side")
    add_arg(group, "--max_image_size", type=positive_int, default=None, help="largest random longer side")
    group = parser.add_argument_group("network")
    add_arg(
        group,
        "--architecture",
        type=str,
        default="resnet50",
        choices=ARCHITECTURES,
        help="backbone (frozen with --method irn; trained with psa, whose published one is resnet38)",
    )
    add_arg(
        group,
        "--backbone_weights",
        type=str,
        default="imagenet",
        help="imagenet (reference), none (tests), or a .pth of backbone or CAM-classifier weights",
    )
    add_arg(group, "--mode", type=str, default="fix", choices=("normal", "fix"), help="backbone BatchNorm module")
    add_bool_arg(group, "--dilated", None, "output stride 8 instead of 16")
    add_scratch_init_arg(group)


def get_args_parser(prog: str, description: str, add_help: bool = True) -> argparse.ArgumentParser:
    parser = MethodDefaultsParser(prog, description=description, add_help=add_help, method_defaults=METHOD_DEFAULTS)
    add_affinity_args(parser)
    engine.add_training_args(parser, lr=None, wd=None, max_epoch=None, batch_size=None)
    parser.describe_defaults()
    return parser


def add_network(ctx: TrainContext, args: argparse.Namespace) -> torch.nn.Module:
    """Build AffinityNet, its optimizer (IRN: one group over the edge branch; PSA: the four LR groups) and the poly
    schedule; register it."""
    if args.method == "psa":
        return add_psa_network(ctx, args)
    model = AffinityNet(
        args.architecture,
        backbone_weights=args.backbone_weights,
        mode=args.mode,
        dilated=args.dilated,
        scratch_init=args.scratch_init,
    )
    params = model.edge_parameters()
    optimizer = build_optimizer(
        [{"params": params, "lr": args.lr, "weight_decay": args.wd, "name": "edge"}], args.optimizer
    )
    scheduler = PolyLR(optimizer, ctx.total_optimizer_steps)
    logger.info(
        "AffinityNet on a frozen %s: %d trained edge parameters, lr %g, wd %g, %s",
        args.architecture, sum(p.numel() for p in params), args.lr, args.wd, args.optimizer,
    )  # fmt: skip
    return ctx.add(MODEL_NAME, model, optimizer, scheduler, max_grad_norm=args.max_grad_norm, ema=args.ema)


def add_psa_network(ctx: TrainContext, args: argparse.Namespace) -> torch.nn.Module:
    model = PsaAffinityNet(
        args.architecture,
        backbone_weights=args.backbone_weights,
        mode=args.mode,
        dilated=args.dilated,
        scratch_init=args.scratch_init,
    )
    groups = build_param_groups(model.param_groups(), args.lr, args.wd, args.lr_alpha_scratch, args.lr_alpha_bias)
    optimizer = build_optimizer(groups, args.optimizer)
    scheduler = PolyLR(optimizer, ctx.total_optimizer_steps)
    logger.info(
        "PSA AffinityNet on %s: %d trained parameters, lr %g (new layers x%g), wd %g, %s",
        args.architecture, sum(p.numel() for g in groups for p in g["params"]), args.lr, args.lr_alpha_scratch,
        args.wd, args.optimizer,
    )  # fmt: skip
    return ctx.add(MODEL_NAME, model, optimizer, scheduler, max_grad_norm=args.max_grad_norm, ema=args.ema)


def make_step_fn(method: str = "irn") -> engine.StepFn:
    """The step: the three-term affinity loss of the global batch (pair counts summed over processes), of the edge
    logits (irn) or of the features (psa)."""
    loss_sums = losses.feature_pair_loss_sums if method == "psa" else losses.pair_loss_sums

    def step(ctx: TrainContext, batch: dict[str, Any], index: int) -> dict[str, float]:
        images = ctx.to_device(batch["image"])
        labels = ctx.to_device(batch["labels"])
        with ctx.autocast():
            outputs = ctx.models[MODEL_NAME](images)
        sums = loss_sums(outputs, labels)
        counts = distributed.all_reduce_sum_(torch.stack([sums[f"{t}_count"] for t in losses.TERMS]))
        terms = losses.combine_terms(sums, counts)  # this process's share: the processes' shares sum to the loss
        # x world: DDP averages the processes' gradients, each holding its own pairs' share of the total.
        ctx.update(MODEL_NAME, terms["loss"] * ctx.run.dist.world_size)
        shares = torch.stack([terms[name].detach() for name in ("loss", *losses.TERMS)])
        totals = distributed.all_reduce_sum_(shares).tolist()
        pairs = counts.sum().item() / max(1, images.shape[0] * ctx.run.dist.world_size)
        return dict(zip(("loss", *losses.TERMS), totals, strict=True)) | {"pairs": pairs}

    return step


def smallest_crop(method: str = "irn") -> int:
    """The smallest --image_size whose label grid holds a pair of every direction (19 cells of stride 4 for IRN's
    radius 10, 9 cells of stride 8 for PSA's radius 5)."""
    return STRIDES[method] * (2 * (RADII[method] - 1) + 1)


def check_flags(args: argparse.Namespace) -> None:
    if args.image_size < smallest_crop(args.method):
        raise WSSSError(
            f"--image_size {args.image_size} gives a stride-{STRIDES[args.method]} grid too small for pairs of radius "
            f"{RADII[args.method]}; pass --image_size {smallest_crop(args.method)} or more (the crop pads smaller "
            "images)"
        )
    if args.min_image_size > args.max_image_size:
        raise WSSSError(
            f"--min_image_size {args.min_image_size} exceeds --max_image_size {args.max_image_size}; swap them"
        )
    if args.validate:
        raise WSSSError(
            "AffinityNet training has no validation of its own; pass --validate false and evaluate the random walk "
            "(scripts/rw/inference.py, then scripts/evaluate.py)"
        )
    if not args.label_dir:
        raise WSSSError("--label_dir is required: the folder written by scripts/rw/make_affinity_labels.py")


def starting_weights(args: argparse.Namespace) -> dict[str, Any]:
    path = args.backbone_weights
    return {"backbone_weights": manifest.file_fingerprint(path)} if path and os.path.isfile(path) else {}


def train_affinity(args: argparse.Namespace, script: str | os.PathLike) -> dict[str, Any]:
    """Train AffinityNet (``--method``) on ``--domain`` with the labels of ``--label_dir``; writes
    ``experiments/models/<tag>.pth``.

    Returns:
        :func:`core.engine.fit`'s summary (``train/*`` of the last epoch, ``final_path``).
    """
    check_flags(args)
    source = source_from_args(args)
    label_dir = Path(args.label_dir)
    ids = data.labelled_ids(source, label_dir)  # checked before any folder is made
    transform = build_segmentation_transform(args.min_image_size, args.max_image_size, args.image_size)
    train_set = data.AffinityLabelSet(source, ids, label_dir, transform, stride=STRIDES[args.method])
    inputs = starting_weights(args) | {"labels": manifest.folder_fingerprint(label_dir)}
    with runtime.training_run(args, "rw", script, inputs=inputs, context=runtime.data_context(args)) as run:
        loader = build_loader(train_set, run, train=True)
        logger.info(
            "training on %d images of %s with the labels of %s (%d batches per process per epoch)",
            len(train_set), source.domain, label_dir, len(loader),
        )  # fmt: skip
        ctx = TrainContext(run, steps_per_epoch=len(loader))
        add_network(ctx, args)
        return engine.fit(ctx, loader, make_step_fn(args.method))
