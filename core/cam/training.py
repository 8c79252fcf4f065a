"""Pieces every CAM-generator training script shares (vanilla, Puzzle, OC-CSE, P-OC, P-NOC): flags, data, the
classifier with its optimizer, the end-of-epoch validation hook, and :func:`train_cam_generator`, the recipe that
wires them. A method script adds only what makes its method (extra networks, see :mod:`core.cam.methods`).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core import engine, manifest, runtime
from core.cam import eps, methods, ppc, seam, validation
from core.cam.occse import LabelSplitter
from core.cli import add_arg, add_bool_arg, add_dataset_args, float_list, positive_int
from core.datasets import ClassificationDataset, DataSource, SegmentationDataset, source_from_args
from core.datasets.transforms import build_classification_transform, build_validation_transform
from core.engine import TrainContext, ValidateFn, build_loader
from core.errors import WSSSError
from core.models import (
    BACKBONES,
    Classifier,
    load_classifier_weights,
    normalize_state_dict_keys,
    read_checkpoint,
    unwrap_state_dict,
)
from core.models.initialization import DEFAULT_SCRATCH_INIT, add_scratch_init_arg
from core.optim import PolyLR, build_optimizer, build_param_groups
from core.runtime import Run

logger = logging.getLogger(__name__)


def add_cam_data_args(
    parser: argparse.ArgumentParser, domain_train: str = "train_aug", domain_valid: str = "train"
) -> None:
    """Dataset flags plus image sizes, augmentation, label smoothing, class weights and the validation domain.

    The training id list is ``--domain_train`` (the reference's name; ``--domain`` is accepted as an alias); both
    store ``args.domain``, which :func:`core.datasets.source_from_args` reads.
    """
    group = add_dataset_args(parser, domain=domain_train)
    add_arg(
        group,
        "--domain_train",
        type=str,
        dest="domain",
        default=domain_train,
        help=f"id list to train on, e.g. train_aug (default {domain_train}; alias --domain)",
    )
    add_arg(group, "--domain_valid", type=str, default=domain_valid, help="id list with GT masks used by --validate")
    add_arg(group, "--image_size", type=positive_int, default=512, help="training crop and validation size (pixels)")
    add_arg(
        group, "--min_image_size", type=positive_int, default=320, help="smallest random longer side before cropping"
    )
    add_arg(
        group, "--max_image_size", type=positive_int, default=640, help="largest random longer side before cropping"
    )
    add_arg(group, "--augment", type=str, default="", help="augmentations, e.g. randaugment, colorjitter, clahe")
    add_arg(
        group,
        "--cutmix_prob",
        type=float,
        default=1.0,
        help="accepted so the reference's commands run; ignored (CutMix is not implemented, --augment cutmix refused)",
    )
    add_arg(
        group,
        "--mixup_prob",
        type=float,
        default=1.0,
        help="scripts/cam/train_mixup.py: probability that a batch is mixed; the other scripts do not mix",
    )
    add_arg(group, "--label_smoothing", type=float, default=0.0, help="binary label smoothing ε: y(1-ε) + ε/2")
    add_arg(group, "--class_weight", type=str, default="none", help="comma-separated per-class loss weights, or none")
    add_bool_arg(group, "--validate_priors", True, "with --validate: also sweep CAM thresholds against GT masks")


def add_classifier_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the CAM classifier: architecture, backbone weights, BN mode, dilation, trainable parts, --restore."""
    group = parser.add_argument_group("classifier")
    add_arg(group, "--architecture", type=str, default="resnet50", choices=list(BACKBONES), help="backbone network")
    add_arg(
        group, "--backbone_weights", type=str, default="imagenet", help="imagenet, none, or a .pth of backbone weights"
    )
    add_arg(group, "--mode", type=str, default="normal", choices=("normal", "fix"), help="fix = frozen BatchNorm")
    add_arg(
        group,
        "--regularization",
        type=str.lower,
        default="none",
        choices=("none",),
        help="weight regularisation of the reference (kernel_usage, orthogonal) is not implemented: only none",
    )
    add_bool_arg(group, "--dilated", False, "output stride 8 instead of 16")
    add_bool_arg(group, "--trainable-stem", True, "train the first convolution and its BatchNorm")
    add_bool_arg(group, "--trainable-backbone", True, "train the backbone (false: only the classifier head)")
    add_scratch_init_arg(group)
    add_arg(group, "--restore", type=str, default=None, help="start from the weights of this classifier checkpoint")
    ppc.add_ppc_args(parser)


def parse_class_weight(text: str | None, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``"none"`` -> None; ``"w1,...,wC"`` -> float32 [C] on ``device``; raises WSSSError on a wrong count."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    try:
        weights = float_list(text)
    except argparse.ArgumentTypeError as e:
        raise WSSSError(f"--class_weight {text!r} is not a comma-separated list of numbers") from e
    if len(weights) != num_classes:
        raise WSSSError(f"--class_weight has {len(weights)} values but the dataset has {num_classes} classes")
    return torch.tensor(weights, dtype=torch.float32, device=device)


def check_augment(augment: str | None) -> None:
    """Reject the reference's mixing augmentations (WSSSError): CutMix is not implemented, and mixup is a method of
    its own (``scripts/cam/train_mixup.py``), a per-batch operation on the device rather than a data transform."""
    text = (augment or "").lower()
    if "mixup" in text:
        raise WSSSError(
            f"--augment {augment!r}: mixup is not a data augmentation here; remove it and train with "
            "scripts/cam/train_mixup.py --mix mixup (--ent false --concent false for plain mixup)"
        )
    if "cutmix" in text:
        raise WSSSError(
            f"--augment {augment!r}: cutmix is not implemented in this toolkit; remove it (colorjitter, randaugment "
            "and clahe are available; scripts/cam/train_mixup.py --mix fmix pastes low-frequency masks)"
        )


# A method's own training set (EPS's images with saliency maps), given the flags and the source of --domain_train.
BuildDataset = Callable[[argparse.Namespace, DataSource], torch.utils.data.Dataset]


def build_train_data(
    args: argparse.Namespace, run: Run, build_dataset: BuildDataset | None = None
) -> tuple[DataSource, torch.utils.data.DataLoader]:
    """Source and shuffled per-process loader of ``--domain_train`` with the random training transform (or the
    dataset of ``build_dataset``)."""
    check_augment(args.augment)
    source = source_from_args(args)
    if build_dataset is not None:
        dataset = build_dataset(args, source)
    else:
        transform = build_classification_transform(
            args.min_image_size, args.max_image_size, args.image_size, args.augment
        )
        dataset = ClassificationDataset(source, transform)
    loader = build_loader(dataset, run, train=True)
    logger.info(
        "training on %d images of %s (%d batches per process per epoch)", len(loader.dataset), args.domain, len(loader)
    )
    return source, loader


def build_valid_loader(args: argparse.Namespace, run: Run) -> torch.utils.data.DataLoader | None:
    """This process's shard of ``--domain_valid`` (images + GT masks) when ``--validate true``, else None."""
    if not args.validate:
        return None
    source = source_from_args(args, domain=args.domain_valid)
    if args.validate_priors and not source.has_masks:
        raise WSSSError(
            f"--domain_valid {args.domain_valid} has no GT masks: pick a domain with masks or --validate_priors false"
        )
    dataset = SegmentationDataset(source, build_validation_transform(args.image_size))
    return build_loader(dataset, run, train=False)


def classifier_from_flags(
    args: argparse.Namespace,
    num_classes: int,
    trainable_backbone: bool = True,
    network: type[Classifier] = Classifier,
    **extra: Any,
) -> Classifier:
    """A CAM classifier of the network flags (``--architecture``, ``--backbone_weights``, ``--mode``, ``--dilated``,
    ``--trainable-stem``, ``--scratch_init``) shared by the training and inference scripts; no checkpoint loaded.
    ``network`` is the class to build (a :class:`Classifier` subclass such as EPS's), ``extra`` its own arguments."""
    return network(
        args.architecture,
        num_classes,
        backbone_weights=args.backbone_weights,
        mode=args.mode,
        dilated=args.dilated,
        trainable_stem=args.trainable_stem,
        trainable_backbone=trainable_backbone,
        # inference has no --scratch_init: its checkpoint supplies every weight, so any init will do.
        scratch_init=getattr(args, "scratch_init", DEFAULT_SCRATCH_INIT),
        **extra,
    )


def trained_classifier(
    args: argparse.Namespace, num_classes: int, path: str | os.PathLike, device: torch.device
) -> Classifier:
    """The classifier of the network flags with the weights of ``path`` (named by ``--weights`` in errors;
    ``--trust_checkpoint``), on ``device``, in eval mode: what the inference-like scripts run.

    An EPS checkpoint (C + 1 maps, background last) is recognised and built as :class:`core.cam.eps.EPSClassifier`,
    whose CAMs are the foreground channels of its softmax; a SEAM checkpoint (ours, or a released SEAM/PPC ResNet-38
    file: it has PCM weights) as :class:`core.cam.seam.SeamClassifier`, whose CAMs are its PCM maps. Their CAM files
    read like any other.
    """
    state = normalize_state_dict_keys(unwrap_state_dict(read_checkpoint(path, trusted=args.trust_checkpoint), path))
    if seam.is_seam_state_dict(state):
        logger.info("%s is a SEAM classifier: its CAMs are the maps of its pixel correlation module", path)
        model: Classifier = seam.seam_classifier(args, num_classes)
    else:
        network = eps.EPSClassifier if eps.is_eps_state_dict(state) else Classifier
        if network is eps.EPSClassifier:
            logger.info("%s is an EPS classifier: its CAMs are the foreground channels of the softmax", path)
        model = classifier_from_flags(args, num_classes, network=network)
    load_classifier_weights(model, state, weights_flag="--weights", source_name=str(path))
    return model.to(device).eval()


def load_restore_weights(model: Classifier, args: argparse.Namespace) -> Classifier:
    """Load ``--restore`` strictly into ``model``, leaving a PPC projection head (absent from plain classifiers) as
    initialised; a projection head the checkpoint holds is dropped (``AUXILIARY_HEADS``)."""
    if not args.restore:
        return model
    head = getattr(model, "projection", None)
    if head is not None:
        model.projection = None  # out of the state dict while loading
    try:
        load_classifier_weights(model, args.restore, weights_flag="--restore")
    finally:
        if head is not None:
            model.projection = head
    return model


def build_classifier(args: argparse.Namespace, num_classes: int) -> Classifier:
    """The CAM classifier from the ``add_classifier_args`` flags (``--restore`` weights loaded strictly); with
    ``--ppc true`` a :class:`core.cam.ppc.PPCClassifier` (the classifier plus PPC's projection head)."""
    config = ppc.PPCConfig.from_args(args)
    if config is None:
        model = classifier_from_flags(args, num_classes, args.trainable_backbone)
    else:
        model = classifier_from_flags(
            args, num_classes, args.trainable_backbone, network=ppc.PPCClassifier, ppc_dim=config.dim
        )
    return load_restore_weights(model, args)


def add_trained_classifier(
    ctx: TrainContext,
    name: str,
    model: Classifier,
    args: argparse.Namespace,
    lr_alpha: float = 1.0,
    steps_divisor: int = 1,
    max_grad_norm: float | None | str = "args",
    ema: bool | None = None,
) -> torch.nn.Module:
    """Register ``model`` with its poly-LR optimizer (4 LR groups) in ``ctx``; returns the model to call.

    Args:
        lr_alpha: scales the base LR (P-NOC's ``--lr_alpha_oc``).
        steps_divisor: shortens the schedule of a network stepped every N optimizer steps (P-NOC's OC interval).
        max_grad_norm: gradient clipping; ``"args"`` (default) reads ``--max_grad_norm``, None disables it
            (P-NOC passes ``--max_grad_norm_oc`` for its OC).
        ema: keep an EMA copy; None reads ``--ema``.
    """
    groups = build_param_groups(
        model.param_groups(), args.lr * lr_alpha, args.wd, args.lr_alpha_scratch, args.lr_alpha_bias
    )
    optimizer = build_optimizer(groups, args.optimizer)
    scheduler = PolyLR(optimizer, max(1, ctx.total_optimizer_steps // max(1, steps_divisor)))
    grad_norm = args.max_grad_norm if max_grad_norm == "args" else max_grad_norm
    use_ema = bool(args.ema) if ema is None else ema
    sync_bn = bool(args.sync_bn) and model.model_kwargs.get("mode") == "normal"
    return ctx.add(name, model, optimizer, scheduler, max_grad_norm=grad_norm, ema=use_ema, sync_bn=sync_bn)


def log_run_plan(ctx: TrainContext, args: argparse.Namespace) -> None:
    """Log once how many optimizer steps of how many images the run makes (derived numbers, not flags)."""
    logger.info(
        "%d optimizer steps of %d images (%d per process x %d accumulated x %d processes)",
        ctx.total_optimizer_steps,
        args.batch_size * ctx.accumulate_steps,
        ctx.run.local_batch_size,
        ctx.accumulate_steps,
        ctx.run.dist.world_size,
    )


def make_validate_fn(
    args: argparse.Namespace, loader: torch.utils.data.DataLoader | None, class_names: list[str], name: str = "cg"
) -> ValidateFn | None:
    """End-of-epoch validation of network ``name`` (its EMA copy with ``--ema true``); None without ``--validate``."""
    if loader is None:
        return None

    def validate(ctx: TrainContext, epoch: int) -> dict[str, Any]:
        results = validation.validate_classifier(
            ctx.final_module(name),
            loader,
            ctx.device,
            class_names,
            args.validate_thresholds,
            args.validate_max_steps,
            with_cams=args.validate_priors,
            autocast=ctx.autocast,
        )
        if "miou" in results:
            logger.info(
                "validation epoch %d: mIoU %.2f at threshold %.2f, F1 %.2f",
                epoch + 1,
                results["miou"],
                results["threshold"],
                results["f1"],
            )
        return results

    return validate


# A method's extra networks: registers them in the context and returns its label splitter (None without an OC).
AddNetworks = Callable[[TrainContext, argparse.Namespace, int], LabelSplitter | None]
# The other networks whose final weights belong to the run (P-NOC's OC): name -> path, given the main weights' path.
AlsoSave = Callable[[argparse.Namespace, Path], dict[str, Path]]
# A method's own generator network (SC-CAM's two-head classifier), given the flags and the class count.
BuildNetwork = Callable[[argparse.Namespace, int], Classifier]
# A method's own step function (SC-CAM), given the flags, the label splitter and the class weights.
BuildStep = Callable[[argparse.Namespace, LabelSplitter | None, torch.Tensor | None], engine.StepFn]
# The methods whose step runs PPC with --ppc true (the generator step of core.cam.methods); the mixing methods and
# SC-CAM train on mixed images or through their own step, which give the projection head no features to contrast.
PPC_METHODS = tuple(name for name, parts in methods.METHOD_PARTS.items() if "mix" not in parts)


def check_ppc(args: argparse.Namespace, method: str, supports_ppc: bool) -> None:
    """Refuse ``--ppc true`` for a method whose step gives PPC no features (one line, before anything is written)."""
    if ppc.PPCConfig.from_args(args) is not None and not supports_ppc:
        raise WSSSError(
            f"--ppc true: method {method} gives no features for PPC's projection head (its step does not contrast "
            f"pixel embeddings); PPC works with {', '.join(PPC_METHODS)}, EPS (train_eps.py) and SEAM; drop --ppc"
        )


def starting_weights(args: argparse.Namespace) -> dict[str, Any]:
    """Fingerprints of the weight files a CAM run starts from (``--restore``, ``--oc-pretrained``, a backbone
    ``.pth``): part of the run's identity in its manifest."""
    files = {
        "restore": getattr(args, "restore", None),
        "oc_pretrained": getattr(args, "oc_pretrained", None),
        "backbone_weights": getattr(args, "backbone_weights", None),
        "subcategories": getattr(args, "subcategories", None),
        "teacher_weights": getattr(args, "teacher_weights", None),
    }
    found = {name: manifest.file_fingerprint(path) for name, path in files.items() if path and os.path.isfile(path)}
    sal_dir = getattr(args, "sal_dir", None)
    return found | ({"sal_dir": manifest.folder_fingerprint(sal_dir)} if sal_dir else {})


def add_frozen_ordinary_classifier(ctx: TrainContext, args: argparse.Namespace, num_classes: int) -> LabelSplitter:
    """OC-CSE and P-OC: a frozen ordinary classifier ``oc`` from ``--oc-pretrained`` and the label splitter."""
    ctx.add("oc", methods.build_ordinary_classifier(args, num_classes, trainable=False))
    splitter = methods.build_label_splitter(args, num_classes)
    ctx.add_state("label_splitter", splitter)
    return splitter


def train_cam_generator(
    args: argparse.Namespace,
    method: str,
    script: str | os.PathLike,
    add_networks: AddNetworks | None = None,
    also_save: AlsoSave | None = None,
    build_network: BuildNetwork | None = None,
    build_step: BuildStep | None = None,
    build_dataset: BuildDataset | None = None,
    supports_ppc: bool | None = None,
) -> dict[str, Any]:
    """The recipe every CAM training script runs: set-up and manifest, data, the generator ``cg`` with its
    optimizer, the method's extra networks, the step of ``method``, validation, :func:`core.engine.fit`.

    Args:
        args: the script's flags.
        method: a key of :data:`core.cam.methods.METHOD_PARTS` (``vanilla``, ``puzzle``, ``occse``, ``poc``, ``pnoc``,
            and the mixing methods ``mixup``, ``fmix``, ``manifold``), or the name of a method that passes
            ``build_step`` (``subcategory``).
        script: the script's ``__file__`` (recorded in the manifest).
        add_networks: registers the method's other networks (the ordinary classifier), see :data:`AddNetworks`.
        also_save: names the other networks' final weights files; :func:`core.engine.fit` writes them before the
            main ``<tag>.pth``, so that file's existence means the whole set is complete.
        build_network: builds the generator instead of :func:`build_classifier` (SC-CAM's two heads).
        build_step: builds the step instead of :func:`core.cam.methods.build_step_fn` (``method`` then only names
            the run; SC-CAM).
        build_dataset: builds the training set instead of the images and labels of ``--domain_train`` (EPS).
        supports_ppc: whether the step runs PPC with ``--ppc true``; None: the methods of :data:`PPC_METHODS` do,
            when the script passes no ``build_step``.

    Returns:
        :func:`core.engine.fit`'s summary, with ``<name>_path`` for each file of ``also_save``.
    """
    if "oc" in methods.METHOD_PARTS.get(method, ()):
        methods.check_oc_pretrained(args)  # fail before any folder is created
    check_ppc(args, method, supports_ppc if supports_ppc is not None else method in PPC_METHODS and not build_step)
    with runtime.training_run(
        args, "cam", script, inputs=starting_weights(args), context=runtime.data_context(args)
    ) as run:
        source, train_loader = build_train_data(args, run, build_dataset)
        valid_loader = build_valid_loader(args, run)
        class_weight = parse_class_weight(args.class_weight, source.num_classes, run.device)

        ctx = engine.TrainContext(run, steps_per_epoch=len(train_loader))
        network = (build_network or build_classifier)(args, source.num_classes)
        add_trained_classifier(ctx, "cg", network, args)
        splitter = add_networks(ctx, args, source.num_classes) if add_networks is not None else None
        log_run_plan(ctx, args)

        if build_step is not None:
            step_fn = build_step(args, splitter, class_weight)
        else:
            step_fn = methods.build_step_fn(method, args, splitter, class_weight)
        validate_fn = make_validate_fn(args, valid_loader, list(source.classes[1:]))
        extra = also_save(args, run.final_path) if also_save is not None else {}
        summary = engine.fit(ctx, train_loader, step_fn, validate_fn, also_save=extra)
        return summary | {f"{name}_path": path for name, path in summary.pop("also_saved", {}).items()}
