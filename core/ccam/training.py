"""C²AM / C²AM-H training: flags, network and optimizer, the step, the polarity check and the fg/bg validation.

:func:`train_ccam` is the recipe both training scripts run (``scripts/ccam/train.py`` without hints,
``scripts/ccam/train_hints.py`` with them), through the one engine (:mod:`core.engine`).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from core import distributed, engine, manifest, runtime
from core.ccam import data, losses
from core.ccam.network import CCAM, PARAM_GROUPINGS
from core.cli import add_arg, add_bool_arg, add_dataset_args, open_unit_float, optional_int, positive_int
from core.datasets import SegmentationDataset, source_from_args
from core.datasets.base import DataSource
from core.datasets.transforms import build_segmentation_transform, build_validation_transform
from core.engine import TrainContext, build_loader
from core.errors import WSSSError
from core.metrics import ThresholdSweep, best_index, scores_from_confusion
from core.models import BACKBONES, load_classifier_weights
from core.models.initialization import DEFAULT_SCRATCH_INIT, add_scratch_init_arg
from core.multiscale import max_normalize
from core.optim import PolyLR, build_optimizer, build_param_groups

logger = logging.getLogger(__name__)

SALIENCY_THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 11)]  # 0.05 ... 0.50 (SPEC §7.2)
RESIZE_FACTOR = 1.15  # training images are resized to floor(1.15 S) squares, then cropped to S (SPEC §7.2)


# --------------------------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------------------------


def add_network_args(parser: argparse.ArgumentParser, training: bool = True) -> argparse._ArgumentGroup:
    """The C²AM network's flags (reference names); ``training`` adds the ones that only matter when training."""
    group = parser.add_argument_group("network")
    add_arg(group, "--architecture", type=str, default="resnet50", choices=list(BACKBONES), help="backbone network")
    add_arg(
        group,
        "--backbone_weights",
        *(("--weights",) if training else ()),
        type=str,
        default="imagenet" if training else "none",
        help="imagenet, none, or a .pth of backbone weights (e.g. MoCo)"
        + ("" if training else "; default none: the checkpoint supplies every weight"),
    )
    add_arg(group, "--mode", type=str, default="normal", choices=("normal", "fix"), help="fix = frozen backbone BN")
    add_bool_arg(group, "--dilated", False, "output stride 8 instead of 16")
    add_bool_arg(group, "--trainable-stem", True, "train the first convolution and its BatchNorm")
    add_arg(
        group,
        "--stage4_out_features",
        type=optional_int,
        default=None,
        help="the reference's flag: channels of layer3 (1024 for resnet50+ and resnest); default (or 0) read "
        "from the backbone, a mismatching value is an error",
    )
    if training:
        add_bool_arg(group, "--trainable-backbone", True, "train the backbone (false: only the C²AM head)")
        add_scratch_init_arg(group)
        add_arg(group, "--restore", type=str, default=None, help="start from the weights of this C²AM checkpoint")
    return group


def add_ccam_args(parser: argparse.ArgumentParser, hints: bool) -> argparse._ArgumentGroup:
    """Data, loss and optimizer-grouping flags of C²AM (``hints``: also the C²AM-H hint flags)."""
    group = add_dataset_args(parser, domain="train_aug")
    add_arg(
        group, "--domain_train", type=str, dest="domain", default="train_aug", help="id list to train on (= --domain)"
    )
    add_arg(group, "--domain_valid", type=str, default="val", help="id list with GT masks for the fg/bg validation")
    add_arg(group, "--image_size", type=positive_int, default=448, help="training crop and validation size S")
    add_arg(
        group,
        "--resize_size",
        type=optional_int,
        default=None,
        help=f"square size images are resized to before the random crop (default floor({RESIZE_FACTOR} S))",
    )
    group = parser.add_argument_group("ccam")
    add_arg(group, "--alpha", type=float, default=losses.DEFAULT_ALPHA, help="SimMax rank-weight decay α")
    add_arg(
        group,
        "--param_groups",
        type=str,
        default="paper",
        choices=PARAM_GROUPINGS,
        help="LR groups. paper (default): the head trains at x10 (weights, BN γ) / x20 (BN β) as the C²AM paper "
        "intends, since a fresh head next to a pretrained backbone needs the larger steps; reference: what the "
        "reference code effectively does (head at x1, no BatchNorm affine parameter trained), for parity runs",
    )
    add_arg(
        group,
        "--polarity_images",
        type=positive_int,
        default=64,
        help="images of the polarity check after the first epoch (unsupervised C²AM only: hints fix the polarity)",
    )
    if hints:
        add_arg(group, "--cams_dir", type=str, default=None, help="CAM folder of --domain (scripts/cam/inference.py)")
        add_bool_arg(group, "--allow_pickle", False, "also read legacy pickled .npy CAM files (only trusted ones)")
        add_arg(group, "--hint_w", type=float, default=1.0, help="weight of the hint loss")
        add_arg(
            group,
            "--fg_threshold",
            type=open_unit_float,
            default=0.4,
            help="pixels whose hint (max CAM) is at least this are foreground hints, in (0, 1) (runner: 0.4 VOC)",
        )
        add_arg(
            group,
            "--bg_threshold",
            type=open_unit_float,
            default=None,
            help="pixels whose hint is below this are background hints, in (0, 1) (default off, as the reference)",
        )
        add_arg(
            group, "--label_smoothing", type=float, default=0.1, help="ε: hint targets 1 - ε/2 and ε/2 (runner 0.1)"
        )
    return group


def get_args_parser(prog: str, description: str, hints: bool, add_help: bool = True) -> argparse.ArgumentParser:
    """The whole command line of a C²AM training script (``hints``: C²AM-H)."""
    parser = argparse.ArgumentParser(prog, description=description, add_help=add_help)
    add_ccam_args(parser, hints=hints)
    add_network_args(parser)
    engine.add_training_args(parser, **training_defaults())
    return parser


def training_defaults() -> dict[str, Any]:
    """The reference's C²AM defaults for :func:`core.engine.add_training_args` (SPEC §7.1-7.2)."""
    return {
        "lr": 0.001,
        "max_epoch": 10,
        "batch_size": 32,
        "validate": True,
        "validate_thresholds": list(SALIENCY_THRESHOLDS),
    }


# --------------------------------------------------------------------------------------------------------------------
# Network and optimizer
# --------------------------------------------------------------------------------------------------------------------


def network_from_flags(args: argparse.Namespace, backbone_weights: str | None = None) -> CCAM:
    """A C²AM network of the network flags (no checkpoint loaded)."""
    return CCAM(
        args.architecture,
        backbone_weights=backbone_weights if backbone_weights is not None else args.backbone_weights,
        mode=args.mode,
        dilated=args.dilated,
        trainable_stem=args.trainable_stem,
        trainable_backbone=getattr(args, "trainable_backbone", True),
        scratch_init=getattr(args, "scratch_init", DEFAULT_SCRATCH_INIT),
        stage4_out_features=args.stage4_out_features,
    )


def add_network(ctx: TrainContext, args: argparse.Namespace) -> nn.Module:
    """Build the network (``--restore`` loaded), its optimizer and poly schedule, and register it as ``ccam``."""
    model = network_from_flags(args)
    if args.restore:
        load_classifier_weights(model, args.restore, weights_flag="--restore")
    groups = build_param_groups(
        model.param_groups(args.param_groups), args.lr, args.wd, args.lr_alpha_scratch, args.lr_alpha_bias
    )
    optimizer = build_optimizer(groups, args.optimizer)
    scheduler = PolyLR(optimizer, ctx.total_optimizer_steps)
    logger.info(
        "parameter groups: %s (%s)", args.param_groups, ", ".join(f"{g['name']} lr {g['lr']:g}" for g in groups)
    )
    sync_bn = bool(args.sync_bn) and args.mode == "normal"
    return ctx.add("ccam", model, optimizer, scheduler, max_grad_norm=args.max_grad_norm, ema=args.ema, sync_bn=sync_bn)


# --------------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------------


def make_step_fn(args: argparse.Namespace, hints: bool) -> engine.StepFn:
    """The training step: ``L = SimMax(fg) + SimMin(bg, fg) + SimMax(bg) [+ hint_w · L_hint]`` over the global
    batch (see :mod:`core.ccam.losses` for how processes share it)."""

    def step(ctx: TrainContext, batch: dict[str, Any], index: int) -> dict[str, float]:
        world = ctx.run.dist.world_size
        images = ctx.to_device(batch["image"])
        with ctx.autocast():
            fg, bg, logits = ctx.models["ccam"](images)
        terms = losses.contrastive_losses(losses.gather_batch(fg.float()), losses.gather_batch(bg.float()), args.alpha)
        loss = sum(terms.values())  # the global batch's value, the same on every process
        scalars = {name: float(value.item()) for name, value in terms.items()}
        if hints:
            hint_maps = losses.resize_hints(ctx.to_device(batch["hint"]), tuple(logits.shape[-2:]))
            parts = losses.hint_loss_terms(
                logits, hint_maps, args.fg_threshold, args.bg_threshold, args.label_smoothing
            )
            counts = distributed.all_reduce_sum_(torch.stack([parts["fg_count"], parts["bg_count"]]).detach())
            # This process's pixels over the global counts: the hint losses of all processes sum to the global one.
            local_hint = losses.combine_hint_terms(parts, counts[0], counts[1])
            loss = loss + args.hint_w * local_hint
            hint = float(distributed.all_reduce_sum_(local_hint.detach().clone()).item())
            scalars |= {"hint": hint, "hint_pixels": float(counts[0].item()) / max(1, images.shape[0] * world)}
        # x world: DDP averages the processes' gradients, each of which holds its own samples' share of the total.
        ctx.update("ccam", loss * world)
        total = sum(terms.values()).item() + (args.hint_w * scalars["hint"] if hints else 0.0)
        return {"loss": total, **scalars}

    return step


# --------------------------------------------------------------------------------------------------------------------
# Polarity and validation
# --------------------------------------------------------------------------------------------------------------------


def border_band(height: int, width: int) -> torch.Tensor:
    """bool [h, w]: the outer ring of the map, ``max(1, min(h, w) // 8)`` cells wide."""
    width_cells = max(1, min(height, width) // 8)
    band = torch.ones(height, width, dtype=torch.bool)
    band[width_cells : height - width_cells, width_cells : width - width_cells] = False
    return band


@torch.no_grad()
def border_activity(
    model: CCAM, loader: DataLoader, device: torch.device, max_images: int, autocast: Any = None
) -> float:
    """Share of border-band cells where the raw map says foreground (σ > 0.5), over up to ``max_images`` images per
    process (summed over processes). Objects rarely fill the border, so a share above 0.5 means the map is inverted.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    seen = 0
    for batch in loader:
        if seen >= max_images:
            break
        images = batch["image"][: max_images - seen].to(device)
        seen += images.shape[0]
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            _, _, logits = model(images)
        band = border_band(*logits.shape[-2:]).to(device)
        active = (logits.float() > 0)[:, 0] & band  # σ(z) > 0.5  <=>  z > 0
        counts += torch.tensor([float(active.sum()), float(band.sum()) * images.shape[0]], dtype=torch.float64)
    model.train(was_training)
    counts = distributed.all_reduce_sum_(counts)
    return float(counts[0] / counts[1]) if counts[1] > 0 else 0.0


def polarity_loader(source: DataSource, image_size: int, count: int, run: Any, batch_size: int) -> DataLoader:
    """This process's shard of the first ``count`` ids of the source at the validation transform (no workers)."""
    dataset = data.ImageSet(source, source.ids[:count], build_validation_transform(image_size))
    return build_loader(dataset, run, train=False, num_workers=0, batch_size=batch_size)


def decide_polarity(
    model: CCAM, loader: DataLoader, device: torch.device, max_images: int, autocast: Any = None
) -> bool:
    """Decide, store in ``model.inverted`` and log whether the map is inverted; returns the decision."""
    share = border_activity(model, loader, device, max_images, autocast)
    inverted = share > 0.5
    model.set_inverted(inverted)
    logger.info(
        "polarity: %.0f%% of the border band is active -> %s", 100 * share, "inverted map" if inverted else "normal map"
    )
    return inverted


@torch.no_grad()
def validate_saliency(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    thresholds: list[float],
    max_steps: int | None = None,
    autocast: Any = None,
) -> dict[str, Any]:
    """Foreground/background IoU sweep against GT (SPEC §7.2): the polarity-corrected map is bilinearly upsampled,
    ReLU'd and divided by its max, and binarised at every threshold.

    Returns:
        ``miou`` (mean of fg and bg IoU), ``fg_iou``, ``bg_iou`` (percent) and ``threshold`` (the best).
    """
    was_training = model.training
    model.eval()
    sweep = ThresholdSweep(2, thresholds)
    keys = np.array([1])
    for index, batch in enumerate(loader):
        if max_steps is not None and index >= max_steps:
            break
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            _, maps = model(batch["image"].to(device), with_cam=True)
        masks = data.foreground_masks(batch["mask"])
        maps = F.interpolate(F.relu(maps.float()), size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
        maps = max_normalize(maps).cpu().numpy()
        for b in range(maps.shape[0]):
            sweep.add(maps[b], keys, masks[b].numpy())
    model.train(was_training)
    confusion = distributed.all_reduce_sum_(torch.from_numpy(sweep.confusion)).numpy()
    scored = [scores_from_confusion(conf, ["background", "foreground"]) for conf in confusion]
    best = best_index(scored)
    return {
        "miou": scored[best]["miou"],
        "fg_iou": scored[best]["iou"]["foreground"],
        "bg_iou": scored[best]["iou"]["background"],
        "threshold": float(thresholds[best]),
    }


def build_valid_loader(args: argparse.Namespace, run: Any) -> DataLoader | None:
    """This process's shard of ``--domain_valid`` (images + GT masks) when ``--validate true``."""
    if not args.validate:
        return None
    source = source_from_args(args, domain=args.domain_valid)
    if not source.has_masks:
        raise WSSSError(
            f"--domain_valid {args.domain_valid} has no GT masks: pick a domain with masks or --validate false"
        )
    return build_loader(SegmentationDataset(source, build_validation_transform(args.image_size)), run, train=False)


def make_epoch_end_fn(
    args: argparse.Namespace, polarity: DataLoader | None, valid: DataLoader | None
) -> engine.ValidateFn:
    """After the first epoch, given a ``polarity`` loader: the polarity decision (stored in the weights); every epoch
    with ``--validate``: the fg/bg IoU sweep."""

    def at_epoch_end(ctx: TrainContext, epoch: int) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if epoch == 0 and polarity is not None:
            inverted = decide_polarity(ctx.module("ccam"), polarity, ctx.device, args.polarity_images, ctx.autocast)
            if ctx.final_module("ccam") is not ctx.module("ccam"):
                ctx.final_module("ccam").set_inverted(inverted)
            results["inverted"] = float(inverted)
        if valid is not None:
            scores = validate_saliency(
                ctx.final_module("ccam"),
                valid,
                ctx.device,
                args.validate_thresholds,
                args.validate_max_steps,
                ctx.autocast,
            )
            logger.info(
                "validation epoch %d: fg IoU %.2f, bg IoU %.2f (mean %.2f) at threshold %.2f",
                epoch + 1, scores["fg_iou"], scores["bg_iou"], scores["miou"], scores["threshold"],
            )  # fmt: skip
            results |= scores
        return results

    return at_epoch_end


# --------------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------------


def check_flags(args: argparse.Namespace, hints: bool) -> None:
    resize = args.resize_size or int(RESIZE_FACTOR * args.image_size)
    if resize < args.image_size:
        raise WSSSError(
            f"--resize_size {resize} is smaller than --image_size {args.image_size}; it must be at least that"
        )
    if hints and args.bg_threshold is not None and args.bg_threshold > args.fg_threshold:
        raise WSSSError(f"--bg_threshold {args.bg_threshold} must not exceed --fg_threshold {args.fg_threshold}")


def build_train_set(
    args: argparse.Namespace, source: DataSource, hints: bool
) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
    """The training set (hinted or plain images) and the inputs it adds to the run's identity."""
    resize = args.resize_size or int(RESIZE_FACTOR * args.image_size)
    transform = build_segmentation_transform(resize, resize, args.image_size)
    if not hints:
        return data.ImageSet(source, source.ids, transform), {}
    cams_dir = data.resolve_cams_dir(args.cams_dir, source.domain)
    ids, background_only = data.hinted_ids(source)
    data.check_cams_dir(cams_dir, source, ids, args.allow_pickle)
    if background_only:
        logger.info(
            "%d background-only images of %s have no CAM file and are left out", len(background_only), source.domain
        )
    return data.HintDataset(source, ids, cams_dir, transform, args.allow_pickle), {
        "cams": manifest.folder_fingerprint(cams_dir)
    }


def starting_weights(args: argparse.Namespace) -> dict[str, Any]:
    files = {"restore": args.restore, "backbone_weights": args.backbone_weights}
    return {name: manifest.file_fingerprint(path) for name, path in files.items() if path and os.path.isfile(path)}


def train_ccam(args: argparse.Namespace, script: str | os.PathLike, hints: bool) -> dict[str, Any]:
    """Train C²AM (``hints`` False) or C²AM-H on ``--domain``; writes ``experiments/models/<tag>.pth``.

    Returns:
        :func:`core.engine.fit`'s summary (``train/*``, ``val/*`` of the last epoch, ``final_path``).
    """
    check_flags(args, hints)
    source = source_from_args(args)
    train_set, inputs = build_train_set(args, source, hints)  # the CAM folder is checked before any folder is made
    with runtime.training_run(
        args, "ccam", script, inputs=starting_weights(args) | inputs, context=runtime.data_context(args)
    ) as run:
        loader = build_loader(train_set, run, train=True)
        logger.info(
            "training on %d images of %s (%d batches per process per epoch)", len(train_set), source.domain, len(loader)
        )
        ctx = TrainContext(run, steps_per_epoch=len(loader))
        add_network(ctx, args)
        logger.info(
            "%d optimizer steps of %d images (%d per process x %d accumulated x %d processes)",
            ctx.total_optimizer_steps, args.batch_size * ctx.accumulate_steps, run.local_batch_size,
            ctx.accumulate_steps, run.dist.world_size,
        )  # fmt: skip
        # Hints pull the hinted pixels up, which fixes the orientation: only the unsupervised map can come out inverted.
        polarity = (
            None if hints else polarity_loader(source, args.image_size, args.polarity_images, run, run.local_batch_size)
        )
        at_epoch_end = make_epoch_end_fn(args, polarity, build_valid_loader(args, run))
        return engine.fit(ctx, loader, make_step_fn(args, hints), at_epoch_end)
