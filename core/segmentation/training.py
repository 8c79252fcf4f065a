"""DeepLabV3+ training (SPEC §10.1): flags, data, the network with its optimizer, the step, the full-image
validation with best/last weights, and :func:`train_segmentation`, the recipe ``scripts/segmentation/train.py`` runs
through the one engine (:mod:`core.engine`).

Differences from the reference, each deliberate: validation scores full images (not 512 px top-left crops) against
the ground truth of ``--domain_valid`` by default (``--validate_against labels`` scores the label folder's masks, the
reference's choice, SPEC §13.2.8); ``last.pth`` and ``best.pth`` are both kept, and ``--final_weights`` says which one
becomes ``experiments/models/<tag>.pth``; the label folder is checked before any folder is made.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from core import checkpoint, distributed, engine, manifest, runtime
from core.artifacts import atomic_write
from core.cli import add_arg, add_bool_arg, add_dataset_args, positive_int, unit_float
from core.datasets import SegmentationDataset, source_from_args
from core.datasets.base import DataSource
from core.datasets.transforms import KNOWN_AUGMENTS, build_segmentation_transform
from core.engine import TrainContext, build_loader
from core.errors import WSSSError
from core.labels import IGNORE_INDEX
from core.metrics import confusion_matrix, scores_from_confusion
from core.models import BACKBONES, load_classifier_weights
from core.models.backbones import VIT_ARCHITECTURES
from core.models.initialization import DEFAULT_SCRATCH_INIT, add_scratch_init_arg
from core.optim import PolyLR, build_optimizer, build_param_groups
from core.segmentation.labels import check_label_folder, label_folder
from core.segmentation.network import DeepLabV3Plus

logger = logging.getLogger(__name__)

ARCHITECTURES = [name for name in BACKBONES if name not in VIT_ARCHITECTURES]
SEG_AUGMENTS = (*KNOWN_AUGMENTS, "cutmix")
BEST_NAME = "best.pth"
NETWORK = "seg"


# --------------------------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------------------------


def add_network_args(parser: argparse.ArgumentParser, training: bool = True) -> argparse._ArgumentGroup:
    """DeepLabV3+'s flags (reference names); ``training`` adds the ones that only matter when training."""
    group = parser.add_argument_group("network")
    add_arg(group, "--architecture", type=str, default="resnest269", choices=ARCHITECTURES, help="backbone network")
    add_arg(
        group,
        "--backbone_weights",
        type=str,
        default="imagenet" if training else "none",
        help="imagenet, none, or a .pth of backbone weights"
        + ("" if training else "; default none: the checkpoint supplies every weight"),
    )
    add_arg(group, "--mode", type=str, default="normal", choices=("normal", "fix"), help="fix = frozen backbone BN")
    add_bool_arg(group, "--dilated", False, "output stride 8 (ASPP rates 12/24/36) instead of 16 (6/12/18)")
    add_bool_arg(group, "--use_gn", True, "GroupNorm (4 groups) in ASPP and decoder instead of BatchNorm")
    if training:
        add_scratch_init_arg(group)
        add_arg(group, "--restore", type=str, default=None, help="start from the weights of this DeepLabV3+ file")
    return group


def add_segmentation_args(parser: argparse.ArgumentParser) -> None:
    """Data, label-folder, augmentation, loss and validation flags of DeepLabV3+ training."""
    group = add_dataset_args(parser, domain="train_aug")
    add_arg(
        group, "--domain_train", type=str, dest="domain", default="train_aug", help="id list to train on (= --domain)"
    )
    add_arg(group, "--domain_valid", type=str, default="val", help="id list validated at every epoch end")
    add_arg(
        group,
        "--label_name",
        type=str,
        default=None,
        help="label folder experiments/predictions/<name> (pseudo masks); with --masks_dir empty too: ground truth",
    )
    add_arg(group, "--image_size", type=positive_int, default=512, help="training crop size S")
    add_arg(group, "--min_image_size", type=positive_int, default=256, help="smallest random longer side")
    add_arg(group, "--max_image_size", type=positive_int, default=1024, help="largest random longer side")
    add_arg(group, "--augment", type=str, default="", help="colorjitter, clahe and/or cutmix, e.g. colorjitter,cutmix")
    add_arg(group, "--cutmix_prob", type=unit_float, default=1.0, help="probability that a batch is CutMix-ed")
    add_bool_arg(group, "--check_labels", True, "read every training mask first and refuse a broken label folder")
    group = parser.add_argument_group("segmentation")
    add_arg(group, "--label_smoothing", type=unit_float, default=0.0, help="ε of the cross-entropy (runner 0.1)")
    add_bool_arg(group, "--nesterov", True, "Nesterov momentum with --optimizer momentum")
    add_arg(
        group,
        "--validate_against",
        type=str,
        default="gt",
        choices=("gt", "labels"),
        help="gt (default): score --domain_valid against its ground truth; labels: against the label folder's "
        "masks of --domain_valid (the reference's choice, SPEC §13.2.8)",
    )
    add_arg(
        group,
        "--final_weights",
        type=str,
        default="last",
        choices=("last", "best"),
        help="what becomes experiments/models/<tag>.pth: the last epoch (default; picking the best epoch on the "
        "validation set that is then reported flatters it) or the best validation mIoU (the reference's); both "
        "stay in experiments/models/<tag>/ as last.pth and best.pth",
    )


def get_args_parser(prog: str, description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """The whole command line of ``scripts/segmentation/train.py``."""
    parser = argparse.ArgumentParser(prog, description=description, add_help=add_help)
    add_segmentation_args(parser)
    add_network_args(parser)
    engine.add_training_args(parser, **training_defaults())
    return parser


def training_defaults() -> dict[str, Any]:
    """The reference's DeepLabV3+ defaults for :func:`core.engine.add_training_args` (SPEC §10.1)."""
    return {
        "lr": 0.007,
        "wd": 4e-5,
        "max_epoch": 50,
        "batch_size": 32,
        "validate": True,
        "accumulate_mean": True,  # the reference's segmentation divides the loss by the accumulation steps
        "sync_bn": True,  # under torchrun, with BatchNorm (the GroupNorm head has nothing to synchronise)
    }


def check_flags(args: argparse.Namespace) -> None:
    items = {item.strip() for item in (args.augment or "").lower().replace("_", ",").split(",") if item.strip()}
    unknown = sorted(items - set(SEG_AUGMENTS) - {"none"})
    if unknown:
        raise WSSSError(f"--augment {args.augment!r}: unknown {', '.join(unknown)}; choose among {SEG_AUGMENTS}")
    if "randaugment" in items:
        raise WSSSError("--augment randaugment moves the image but not its mask; use colorjitter, clahe or cutmix")
    if args.min_image_size > args.max_image_size:
        raise WSSSError(f"--min_image_size {args.min_image_size} exceeds --max_image_size {args.max_image_size}")


# --------------------------------------------------------------------------------------------------------------------
# Network and optimizer
# --------------------------------------------------------------------------------------------------------------------


def network_from_flags(args: argparse.Namespace, num_classes: int) -> DeepLabV3Plus:
    """A DeepLabV3+ of the network flags with ``num_classes`` (background included); no checkpoint loaded."""
    return DeepLabV3Plus(
        args.architecture,
        num_classes,
        backbone_weights=args.backbone_weights,
        mode=args.mode,
        dilated=args.dilated,
        use_gn=args.use_gn,
        scratch_init=getattr(args, "scratch_init", DEFAULT_SCRATCH_INIT),
    )


def trained_network(
    args: argparse.Namespace, num_classes: int, path: str | os.PathLike, device: torch.device
) -> DeepLabV3Plus:
    """The network of the flags with the weights of ``path`` (any reference layout), on ``device``, in eval mode."""
    model = network_from_flags(args, num_classes)
    load_classifier_weights(model, path, trusted=getattr(args, "trust_checkpoint", False), weights_flag="--weights")
    return model.to(device).eval()


def add_network(ctx: TrainContext, args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """Build the network (``--restore`` loaded), its optimizer (backbone x1, head x10) and poly schedule."""
    model = network_from_flags(args, num_classes)
    if args.restore:
        load_classifier_weights(model, args.restore, weights_flag="--restore")
    groups = build_param_groups(model.param_groups(), args.lr, args.wd, args.lr_alpha_scratch, args.lr_alpha_bias)
    optimizer = build_optimizer(groups, args.optimizer, nesterov=args.nesterov)
    scheduler = PolyLR(optimizer, ctx.total_optimizer_steps)
    # SyncBN would replace the backbone's frozen BN of --mode fix with a trainable one: only in normal mode; and
    # torch's SyncBatchNorm runs on GPUs only (a CPU torchrun keeps per-process BatchNorm).
    sync_bn = bool(args.sync_bn) and args.mode == "normal" and ctx.device.type == "cuda"
    return ctx.add(
        NETWORK, model, optimizer, scheduler, max_grad_norm=args.max_grad_norm, ema=args.ema, sync_bn=sync_bn
    )


# --------------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------------


def cutmix(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one random box of each sample's partner (the batch rolled by one) into it, image and mask alike.

    The box covers a share ``1 - λ`` of the crop, ``λ ~ U(0, 1)``, as in CutMix; the masks stay hard labels.

    Args:
        images: float [B, 3, S, S]; masks: int64 [B, S, S].

    Returns:
        New tensors of the same shapes (the inputs are not modified).
    """
    height, width = images.shape[-2:]
    lam = float(torch.rand((), generator=generator))
    cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
    top = int(torch.randint(0, height - cut_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - cut_w + 1, (), generator=generator))
    images, masks = images.clone(), masks.clone()
    partner_images, partner_masks = images.roll(1, dims=0), masks.roll(1, dims=0)
    images[..., top : top + cut_h, left : left + cut_w] = partner_images[..., top : top + cut_h, left : left + cut_w]
    masks[..., top : top + cut_h, left : left + cut_w] = partner_masks[..., top : top + cut_h, left : left + cut_w]
    return images, masks


def segmentation_loss(
    logits: torch.Tensor, masks: torch.Tensor, label_smoothing: float = 0.0, labelled: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over the labelled pixels (255 ignored), with label smoothing; 0 when a batch has none.

    Args:
        logits: float [B, K, H, W]; masks: int64 [B, H, W] in 0..K-1 or 255.
        labelled: the number of labelled pixels to divide by (e.g. summed over processes); default this batch's.
    """
    if labelled is None:
        labelled = (masks != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        logits.float(), masks, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
    )
    return total / labelled.clamp_min(1)


def make_step_fn(args: argparse.Namespace) -> engine.StepFn:
    """The training step: (CutMix,) forward, cross-entropy, update."""
    use_cutmix = "cutmix" in (args.augment or "").lower()
    generator = torch.Generator().manual_seed(int(args.seed) + distributed.get_rank())

    def step(ctx: TrainContext, batch: dict[str, Any], index: int) -> dict[str, float]:
        images, masks = batch["image"], batch["mask"]
        if use_cutmix and float(torch.rand((), generator=generator)) < args.cutmix_prob:
            images, masks = cutmix(images, masks, generator)
        images, masks = ctx.to_device(images), ctx.to_device(masks)
        with ctx.autocast():
            logits = ctx.models[NETWORK](images)
        # One mean over the labelled pixels of the global batch, as the reference's DataParallel computes it: a
        # per-process mean would weigh each process's pixels by its own count.
        labelled = distributed.all_reduce_sum_((masks != IGNORE_INDEX).sum().float())
        share = segmentation_loss(logits, masks, args.label_smoothing, labelled)
        ctx.update(NETWORK, share * ctx.run.dist.world_size)  # x world: DDP averages the processes' gradients
        return {"loss": distributed.all_reduce_sum_(share.detach()).item()}

    return step


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def validate_segmentation(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    class_names: list[str],
    max_steps: int | None = None,
    autocast: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """mIoU of the argmax prediction on full images (one per batch) against their masks, over all processes.

    Returns:
        ``miou``, ``miou_fg`` (percent) and ``iou`` (class name -> percent).
    """
    was_training = model.training
    model.eval()
    confusion = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    for index, batch in enumerate(loader):
        if max_steps is not None and index >= max_steps:
            break
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(batch["image"].to(device))
        prediction = logits.float().argmax(dim=1).cpu().numpy()
        confusion += confusion_matrix(batch["mask"].numpy(), prediction, len(class_names))
    model.train(was_training)
    confusion = distributed.all_reduce_sum_(torch.from_numpy(confusion)).numpy()
    scores = scores_from_confusion(confusion, class_names)
    return {"miou": scores["miou"], "miou_fg": scores["miou_fg"], "iou": scores["iou"]}


def build_valid_loader(args: argparse.Namespace, labels: Any, run: runtime.Run) -> DataLoader | None:
    """This process's shard of ``--domain_valid``: full normalised images (batch 1) with the masks scored against."""
    if not args.validate:
        return None
    against_labels = args.validate_against == "labels" and labels is not None
    # --masks_dir names the training labels: the ground truth is the dataset's own masks.
    masks_dir = str(labels) if against_labels else None
    source = source_from_args(argparse.Namespace(**{**vars(args), "masks_dir": masks_dir}), args.domain_valid)
    if not source.has_masks:
        raise WSSSError(
            f"--domain_valid {args.domain_valid} has no masks to validate against"
            f"{' in ' + str(labels) if against_labels else ''}: pick a domain with masks or --validate false"
        )
    return build_loader(SegmentationDataset(source, transform=None), run, train=False, batch_size=1)


class BestWeights:
    """Keeps ``best.pth`` (the network at its best validation mIoU so far); its score resumes with the run."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = path
        self.miou = float("-inf")
        self.epoch = 0

    def offer(self, ctx: TrainContext, miou: float, epoch: int) -> bool:
        """Save the network when ``miou`` beats the best so far (rank 0 writes, every rank calls)."""
        if not miou > self.miou:
            return False
        self.miou, self.epoch = float(miou), epoch
        if ctx.run.is_main:
            checkpoint.save_weights(self.path, ctx.final_module(NETWORK).state_dict())
        distributed.barrier()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"miou": self.miou, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.miou, self.epoch = float(state["miou"]), int(state["epoch"])


def make_validate_fn(args: argparse.Namespace, loader: DataLoader | None, class_names: list[str], best: BestWeights):
    if loader is None:
        return None

    def validate(ctx: TrainContext, epoch: int) -> dict[str, Any]:
        scores = validate_segmentation(
            ctx.final_module(NETWORK), loader, ctx.device, class_names, args.validate_max_steps, ctx.autocast
        )
        improved = best.offer(ctx, scores["miou"], epoch + 1)
        logger.info(
            "validation epoch %d on %s (%s): mIoU %.2f (fg %.2f)%s",
            epoch + 1, args.domain_valid, args.validate_against, scores["miou"], scores["miou_fg"],
            f", best so far -> {best.path}" if improved else f", best {best.miou:.2f} at epoch {best.epoch}",
        )  # fmt: skip
        return {"miou": scores["miou"], "miou_fg": scores["miou_fg"], "best_miou": best.miou}

    return validate


# --------------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------------


def build_train_source(args: argparse.Namespace) -> tuple[DataSource, Any]:
    """The training source reading the label folder (or GT), checked; and the folder (None = GT)."""
    labels = label_folder(args.label_name, args.masks_dir)
    source = source_from_args(argparse.Namespace(**{**vars(args), "masks_dir": str(labels) if labels else None}))
    if args.check_labels:
        check_label_folder(source, "training labels" if labels else "ground truth")
    return source, labels


def starting_weights(args: argparse.Namespace, labels: Any) -> dict[str, Any]:
    files = {"restore": args.restore, "backbone_weights": args.backbone_weights}
    inputs = {name: manifest.file_fingerprint(path) for name, path in files.items() if path and os.path.isfile(path)}
    return inputs | ({"labels": manifest.folder_fingerprint(labels)} if labels else {})


def train_segmentation(args: argparse.Namespace, script: str | os.PathLike) -> dict[str, Any]:
    """Train DeepLabV3+ on ``--domain`` with the label folder's masks (or GT); writes ``experiments/models/<tag>.pth``.

    Returns:
        :func:`core.engine.fit`'s summary plus ``best_miou``, ``best_epoch`` and ``best_path`` when validating.
    """
    check_flags(args)
    source, labels = build_train_source(args)  # checked before any folder is made
    with runtime.training_run(
        args, "seg", script, inputs=starting_weights(args, labels), context=runtime.data_context(args)
    ) as run:
        transform = build_segmentation_transform(
            args.min_image_size, args.max_image_size, args.image_size, args.augment
        )
        loader = build_loader(SegmentationDataset(source, transform), run, train=True)
        logger.info("training on %d images of %s with %s", len(source.ids), source.domain, labels or "ground truth")
        ctx = TrainContext(run, steps_per_epoch=len(loader))
        add_network(ctx, args, source.num_classes + 1)
        best = BestWeights(run.run_dir / BEST_NAME)
        ctx.add_state("best", best)
        valid = build_valid_loader(args, labels, run)
        summary = engine.fit(ctx, loader, make_step_fn(args), make_validate_fn(args, valid, source.classes, best))
        if valid is not None:
            summary |= {"best_miou": best.miou, "best_epoch": best.epoch, "best_path": str(best.path)}
            if args.final_weights == "best" and run.is_main:
                with atomic_write(run.final_path) as tmp:
                    shutil.copyfile(best.path, tmp)
                logger.info("final weights %s = best epoch %d (mIoU %.2f)", run.final_path, best.epoch, best.miou)
        distributed.barrier()
        return summary
