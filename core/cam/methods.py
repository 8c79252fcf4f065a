"""The CAM-generator training methods (SPEC §4.2–4.6): their flags, loss terms and per-batch step functions.

Every method adds parts to the vanilla loss ``L_c = MLSM(f(x), ỹ)`` of the CAM generator ``cg``:

* ``puzzle`` (Puzzle-CAM, §4.3): ``L_p + α(t)·L_re`` from the 2x2-tile forward pass;
* ``oc`` (OC-CSE, §4.4): ``a_o(t)·L_o``, an ordinary classifier ``oc`` must not see the erased class on the
  soft-masked image ``x·(1 - M_r)``;
* ``adversary`` (P-NOC, §4.6): a second optimizer step trains ``oc`` to find every class on the hard-masked image
  ``x·1[M̂_r <= δ]``, so the generator is pushed to cover what the OC still finds.

``vanilla`` = {}, ``puzzle`` = {puzzle}, ``occse`` = {oc}, ``poc`` = {puzzle, oc}, ``pnoc`` = {puzzle, oc, adversary}.
The mixing methods ``mixup``, ``fmix`` and ``manifold`` = {mix} train on mixed batches instead (:mod:`core.cam.mixing`).
With ``--ppc true`` every non-mixing method also adds PPC's pixel-to-prototype contrast (:mod:`core.cam.ppc`).
A script registers its networks in a :class:`core.engine.TrainContext` (``cg`` first; ``oc`` frozen, or trained for
P-NOC) and hands :func:`build_step_fn` to :func:`core.engine.fit`; ``tools/benchmark.py`` times the same step.

Loss-weight schedules use :func:`core.optim.linear_schedule` over the run's micro-steps (``step``, ``ctx.total_steps``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.cam import mixing, ppc
from core.cam.cams import normalize_cams
from core.cam.occse import STRATEGIES, LabelSplitter, hard_mask_images, soft_mask_images
from core.cam.puzzle import puzzle_outputs
from core.cli import add_arg, add_bool_arg, optional_float
from core.engine import StepFn, TrainContext
from core.errors import WSSSError
from core.losses import multilabel_soft_margin, reconstruction_loss
from core.models import (
    BACKBONES,
    Classifier,
    describe_state_dict,
    load_classifier_weights,
    normalize_state_dict_keys,
    read_checkpoint,
    unwrap_state_dict,
)
from core.optim import linear_schedule

logger = logging.getLogger(__name__)

METHOD_PARTS: dict[str, frozenset[str]] = {
    "vanilla": frozenset(),
    "puzzle": frozenset({"puzzle"}),
    "occse": frozenset({"oc"}),
    "poc": frozenset({"puzzle", "oc"}),
    "pnoc": frozenset({"puzzle", "oc", "adversary"}),
    **{kind: frozenset({"mix"}) for kind in mixing.MIX_METHODS},
}
PUZZLE_TERMS = ("cl", "pcl", "re")
ClassLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- flags ----------------------------------------------------------------------------------------------------------
def add_puzzle_args(parser: argparse.ArgumentParser, alpha: float = 4.0) -> argparse._ArgumentGroup:
    """Puzzle-CAM flags; ``alpha`` is the script's default final weight of ``L_re`` (Puzzle/P-NOC 4, P-OC 1)."""
    group = parser.add_argument_group("puzzle")
    add_arg(group, "--num_pieces", type=int, default=4, help="tiles per image (4 = 2x2 grid)")
    add_arg(
        group,
        "--loss_option",
        type=str,
        default="cl_pcl_re",
        help="terms joined by _: cl (L_c), pcl (tile classification L_p), re (reconstruction L_re)",
    )
    add_arg(group, "--alpha", type=float, default=alpha, help=f"final weight α of L_re (default {alpha})")
    add_arg(group, "--alpha_init", type=float, default=0.0, help="weight of L_re at the first step")
    add_arg(
        group,
        "--alpha_schedule",
        type=float,
        default=0.5,
        help="fraction of the run over which α ramps linearly from --alpha_init to --alpha (0 = --alpha throughout)",
    )
    add_arg(group, "--re_loss", type=str, default="L1_Loss", choices=("L1_Loss", "L2_Loss"), help="distance of L_re")
    add_arg(
        group,
        "--re_loss_option",
        type=str,
        default="masking",
        choices=("masking", "selection", "none"),
        help="masking: mean over all entries of present classes' maps (reference); selection: present classes only",
    )
    add_arg(
        group, "--level", type=str, default="feature", choices=("feature", "cam"), help="L_re on raw maps or on CAMs"
    )
    return group


def add_oc_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """OC-CSE flags: the ordinary classifier, the label split and the weight a_o(t) of ``L_o``."""
    group = parser.add_argument_group("ordinary classifier (OC-CSE)")
    add_arg(group, "--oc-architecture", type=str, default="resnet50", choices=list(BACKBONES), help="OC backbone")
    add_arg(
        group,
        "--oc-pretrained",
        type=str,
        default=None,
        help="REQUIRED: weights of the ordinary classifier, e.g. experiments/models/<tag>.pth of train_vanilla.py",
    )
    add_arg(
        group, "--oc-regularization", type=str.lower, default="none", choices=("none",), help="only none is implemented"
    )
    add_bool_arg(group, "--oc-mask-globalnorm", True, "divide soft masks by the batch maximum (OC-CSE) or per image")
    add_bool_arg(group, "--oc-trainable-stem", True, "P-NOC: train the OC's first convolution too")
    add_arg(
        group, "--oc-strategy", type=str, default="random", choices=STRATEGIES, help="how the erased class is chosen"
    )
    add_arg(group, "--oc-focal-momentum", type=float, default=0.9, help="momentum of the focal strategy's factor")
    add_arg(group, "--oc-focal-gamma", type=float, default=2.0, help="exponent γ of the focal weight (1 - p_t)^γ")
    add_arg(group, "--oc-alpha", type=float, default=1.0, help="final weight a_o of L_o")
    add_arg(group, "--oc-alpha-init", type=float, default=0.3, help="weight of L_o at the first step")
    add_arg(group, "--oc-alpha-schedule", type=float, default=1.0, help="fraction of the run over which a_o ramps up")
    add_arg(group, "--oc-k", type=float, default=1.0, help="final number of classes erased per image")
    add_arg(group, "--oc-k-init", type=float, default=1.0, help="classes erased per image at the first step")
    add_arg(
        group, "--oc-k-schedule", type=float, default=0.0, help="fraction of the run over which k ramps (0: --oc-k)"
    )
    return group


def add_pnoc_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """P-NOC flags: the adversarial OC step, its weight a_w(t), masks, optimizer and the gradient-leak switch."""
    group = parser.add_argument_group("P-NOC adversarial ordinary classifier")
    add_arg(group, "--ow", type=float, default=0.5, help="final weight a_w of the OC's loss L_noc")
    add_arg(group, "--ow-init", type=float, default=0.0, help="weight of L_noc at the first step")
    add_arg(group, "--ow-schedule", type=float, default=1.0, help="fraction of the run over which a_w ramps up")
    add_arg(
        group,
        "--oc-train-masks",
        type=str,
        default="cams",
        choices=("cams", "features"),
        help="cams: hard masks x·1[M̂ <= --oc_train_mask_t]; features: the generator's soft-masked images",
    )
    add_arg(group, "--oc_train_mask_t", type=float, default=0.2, help="δ: erase pixels whose normalised CAM exceeds it")
    add_arg(group, "--oc-train-interval-steps", type=int, default=1, help="train the OC every N batches")
    add_arg(group, "--lr_alpha_oc", type=float, default=1.0, help="OC learning rate = --lr x this")
    add_arg(
        group, "--max_grad_norm_oc", type=optional_float, default=None, help="clip the OC's gradient norm (none = off)"
    )
    add_bool_arg(group, "--oc-persist", False, "also save the trained OC to experiments/models/<tag>-oc.pth")
    add_bool_arg(
        group,
        "--oc-grad-leak",
        False,
        "false (default) = the documented objective: the OC learns only from L_noc, its parameters get no gradient "
        "from the generator's a_o·L_o. true = the reference's behaviour (SPEC §13.2.1), where that gradient also "
        "reaches the OC and is applied by its next step (scaled by the ratio of the two AMP scales)",
    )
    return group


# -- configuration --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ramp:
    """A loss weight going linearly from ``start`` to ``end`` over the first ``fraction`` of the run, then ``end``."""

    start: float
    end: float
    fraction: float

    def at(self, step: int, total: int) -> float:
        """Value at micro-step ``step`` of ``total`` (:func:`core.optim.linear_schedule`)."""
        return linear_schedule(step, total, self.start, self.end, self.fraction)


@dataclass(frozen=True)
class PuzzleConfig:
    """Puzzle-CAM settings: tiles, which terms enter the loss, the α ramp and the reconstruction distance."""

    pieces: int = 4
    terms: frozenset[str] = frozenset(PUZZLE_TERMS)
    alpha: Ramp = Ramp(0.0, 4.0, 0.5)
    re_loss: str = "l1"
    re_option: str = "masking"
    level: str = "feature"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PuzzleConfig:
        terms = frozenset(t for t in str(args.loss_option).lower().split("_") if t)
        unknown = sorted(terms - set(PUZZLE_TERMS))
        if unknown:
            raise WSSSError(
                f"--loss_option {args.loss_option}: term(s) {', '.join(unknown)} not implemented; "
                f"combine {', '.join(PUZZLE_TERMS)} with _ (e.g. cl_pcl_re)"
            )
        return cls(
            pieces=int(args.num_pieces),
            terms=terms,
            alpha=Ramp(args.alpha_init, args.alpha, args.alpha_schedule),
            re_loss=args.re_loss,
            re_option=args.re_loss_option,
            level=args.level,
        )


@dataclass(frozen=True)
class OCConfig:
    """OC-CSE settings: the a_o ramp, the k ramp, soft-mask normalisation and the P-NOC gradient-leak switch."""

    alpha: Ramp = Ramp(0.3, 1.0, 1.0)
    k: Ramp = Ramp(1.0, 1.0, 0.0)
    global_norm: bool = True
    grad_leak: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OCConfig:
        return cls(
            alpha=Ramp(args.oc_alpha_init, args.oc_alpha, args.oc_alpha_schedule),
            k=Ramp(args.oc_k_init, args.oc_k, args.oc_k_schedule),
            global_norm=bool(args.oc_mask_globalnorm),
            grad_leak=bool(getattr(args, "oc_grad_leak", False)),
        )


@dataclass(frozen=True)
class AdversaryConfig:
    """P-NOC's OC step: its weight ramp a_w, the masks it sees, the threshold δ and how often it runs."""

    weight: Ramp = Ramp(0.0, 0.5, 1.0)
    masks: str = "cams"
    threshold: float = 0.2
    interval: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdversaryConfig:
        if int(args.oc_train_interval_steps) < 1:
            raise WSSSError(f"--oc-train-interval-steps must be >= 1, got {args.oc_train_interval_steps}")
        return cls(
            weight=Ramp(args.ow_init, args.ow, args.ow_schedule),
            masks=args.oc_train_masks,
            threshold=float(args.oc_train_mask_t),
            interval=int(args.oc_train_interval_steps),
        )


@dataclass(frozen=True)
class MethodSpec:
    """Everything a method's step needs besides the context: the classification loss and the enabled parts."""

    name: str
    class_loss: ClassLoss
    puzzle: PuzzleConfig | None = None
    oc: OCConfig | None = None
    splitter: LabelSplitter | None = None
    adversary: AdversaryConfig | None = None
    mix: mixing.MixConfig | None = None
    ppc: ppc.PPCConfig | None = None  # --ppc true: PPC's contrast of two views (core/cam/ppc.py)


def classification_loss(label_smoothing: float = 0.0, class_weight: torch.Tensor | None = None) -> ClassLoss:
    """``(logits [B, C], labels [B, C] in [0, 1]) -> MLSM on smoothed labels`` (scalar float32), one per run."""
    return functools.partial(multilabel_soft_margin, label_smoothing=label_smoothing, class_weight=class_weight)


def method_spec(
    method: str,
    args: argparse.Namespace,
    splitter: LabelSplitter | None = None,
    class_weight: torch.Tensor | None = None,
) -> MethodSpec:
    """The :class:`MethodSpec` of ``method`` (a key of :data:`METHOD_PARTS`) from the parsed flags."""
    if method not in METHOD_PARTS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_PARTS)}")
    parts = METHOD_PARTS[method]
    if "oc" in parts and splitter is None:
        raise ValueError(f"method {method!r} needs a LabelSplitter (build_label_splitter)")
    return MethodSpec(
        name=method,
        class_loss=classification_loss(float(args.label_smoothing), class_weight),
        puzzle=PuzzleConfig.from_args(args) if "puzzle" in parts else None,
        oc=OCConfig.from_args(args) if "oc" in parts else None,
        splitter=splitter if "oc" in parts else None,
        adversary=AdversaryConfig.from_args(args) if "adversary" in parts else None,
        mix=mixing.MixConfig.from_args(args, method) if "mix" in parts else None,
        ppc=ppc.PPCConfig.from_args(args) if "mix" not in parts else None,
    )


# -- networks and state ---------------------------------------------------------------------------------------------
def check_oc_pretrained(args: argparse.Namespace) -> Path:
    """The ``--oc-pretrained`` file, checked before any work starts (one-line WSSSError when missing)."""
    hint = (
        "train the ordinary classifier with scripts/cam/train_vanilla.py first "
        "and pass its experiments/models/<tag>.pth"
    )
    if not args.oc_pretrained:
        raise WSSSError(f"--oc-pretrained is required: {hint}")
    path = Path(args.oc_pretrained).expanduser()
    if not path.is_file():
        raise WSSSError(f"--oc-pretrained {path} does not exist: {hint}")
    return path


def build_ordinary_classifier(args: argparse.Namespace, num_classes: int, trainable: bool) -> Classifier:
    """The ordinary classifier, loaded strictly from ``--oc-pretrained``.

    Built with frozen BatchNorm (``mode="fix"``, as P-NOC does; a frozen OC is in eval mode anyway), output stride 16
    and no ImageNet download (the checkpoint supplies every weight). ``trainable=False`` (OC-CSE, P-OC) also turns
    off every gradient; ``trainable=True`` (P-NOC) keeps ``--oc-trainable-stem`` and ``--trainable-backbone``.

    Raises:
        WSSSError: missing file, or weights of another architecture or class count (one line naming the file).
    """
    path = check_oc_pretrained(args)
    model = Classifier(
        args.oc_architecture,
        num_classes,
        backbone_weights="none",
        mode="fix",
        dilated=False,
        trainable_stem=bool(args.oc_trainable_stem),
        trainable_backbone=bool(args.trainable_backbone),
        scratch_init=args.scratch_init,  # overwritten by the checkpoint; passed so RNG use follows the flag
    )
    state = normalize_state_dict_keys(unwrap_state_dict(read_checkpoint(path), str(path)))
    try:
        load_classifier_weights(model, state)
    except WSSSError as e:
        raise WSSSError(
            f"--oc-pretrained {path} holds a {describe_state_dict(state)}, but the ordinary classifier must be a "
            f"{num_classes}-class {args.oc_architecture} classifier: pass the matching --oc-architecture, or train "
            "the OC on this dataset with scripts/cam/train_vanilla.py"
        ) from e
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    logger.info("ordinary classifier %s from %s (%s)", args.oc_architecture, path, "trained" if trainable else "frozen")
    return model


def build_label_splitter(args: argparse.Namespace, num_classes: int) -> LabelSplitter:
    """OC-CSE's label splitter from ``--oc-strategy``, ``--oc-focal-momentum``, ``--oc-focal-gamma``."""
    return LabelSplitter(num_classes, args.oc_strategy, args.oc_focal_momentum, args.oc_focal_gamma)


def oc_weights_path(final_path: Path) -> Path:
    """``experiments/models/<tag>-oc.pth`` next to the generator's ``<tag>.pth`` (``--oc-persist``)."""
    return final_path.with_name(f"{final_path.stem}-oc.pth")


@contextlib.contextmanager
def parameters_frozen(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of ``module``'s trainable parameters for the forward passes inside the block.

    Autograd records leaf parameters at forward time, so a graph built inside the block never reaches them, even
    when its backward runs after the block has restored the flags.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


# -- loss terms -----------------------------------------------------------------------------------------------------
def output_stride(model: nn.Module) -> int:
    """Stride of a classifier's maps relative to its input (16, or 8 when dilated)."""
    return int(getattr(getattr(model, "backbone", None), "output_stride", 16))


def puzzle_terms(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    config: PuzzleConfig,
    class_loss: ClassLoss,
    stride: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Puzzle-CAM's tile classification loss ``L_p`` and reconstruction loss ``L_re`` (SPEC §4.3).

    Args:
        model: the CAM generator (called once more, on the tiles of ``images``).
        images: float [B, 3, H, W], H and W divisible by ``sqrt(pieces) * stride``.
        maps: float [B, C, h, w], the generator's raw maps of the full images.
        labels: float [B, C] in [0, 1], UNSMOOTHED (``class_loss`` smooths; ``L_re`` masks with the raw labels).
        stride: the generator's output stride.

    Returns:
        (``L_p = MLSM(GAP(A_re), ỹ)``, ``L_re``), scalar tensors >= 0 with graphs into ``model``.
    """
    merged = puzzle_outputs(model, images, config.pieces, stride)  # A_re: [B, C, h, w]
    p_loss = class_loss(merged.mean(dim=(2, 3)), labels)
    if config.level == "cam":
        maps, merged = normalize_cams(maps), normalize_cams(merged)
    re_loss = reconstruction_loss(maps, merged, labels, config.re_loss, config.re_option)
    return p_loss, re_loss


@dataclass
class OCTerm:
    """Result of :func:`occse_term`.

    Attributes:
        loss: scalar ``L_o``, with a graph into the generator's maps (and into the OC when its gradients are on).
        logits: float [B, C], the OC's logits on the soft-masked images.
        chosen: [B, C] one-hot rows, the class erased per image.
        remaining: float [B, C], ``max(labels - chosen, 0)``.
        masked_images: float [B, 3, H, W], ``x·(1 - M)``, differentiable w.r.t. the generator.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    chosen: torch.Tensor
    remaining: torch.Tensor
    masked_images: torch.Tensor


def occse_term(
    oc: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    splitter: LabelSplitter,
    class_loss: ClassLoss,
    k: int = 1,
    global_norm: bool = True,
    oc_grads: bool = False,
) -> OCTerm:
    """OC-CSE's ``L_o = MLSM(oc(x·(1 - M_r)), smooth(y \\ r))`` for one class ``r`` per image (SPEC §4.4).

    Args:
        oc: the ordinary classifier, unwrapped (under DDP it runs twice per P-NOC step; only its own step syncs).
        images: float [B, 3, H, W], normalised images.
        maps: float [B, C, h, w], the generator's raw maps (gradients flow back through the soft mask).
        labels: float [B, C] in [0, 1], unsmoothed.
        splitter: chooses ``r`` and counts the choices.
        k: classes erased per image.
        global_norm: soft mask divided by the batch maximum (True, OC-CSE) or per image.
        oc_grads: let the OC's trainable parameters receive gradients from ``L_o`` (P-NOC ``--oc-grad-leak true``);
            False keeps them out of the graph.
    """
    chosen, remaining = splitter.split(labels, k)
    masked = soft_mask_images(images, maps, chosen, global_norm)
    with contextlib.nullcontext() if oc_grads else parameters_frozen(oc):
        logits = oc(masked)
    return OCTerm(class_loss(logits, remaining), logits, chosen, remaining, masked)


def adversary_inputs(images: torch.Tensor, maps: torch.Tensor, term: OCTerm, config: AdversaryConfig) -> torch.Tensor:
    """Detached images the P-NOC OC trains on: hard masks ``x·1[M̂_r <= δ]`` (``cams``) or the soft-masked images.

    Returns:
        float [B, 3, H, W], no gradient.
    """
    if config.masks == "cams":
        return hard_mask_images(images, maps.detach(), term.chosen, config.threshold)
    return term.masked_images.detach()


def pnoc_oc_step(
    ctx: TrainContext, inputs: torch.Tensor, labels: torch.Tensor, weight: float, class_loss: ClassLoss
) -> torch.Tensor:
    """P-NOC's adversarial step: ``L_noc = a_w·MLSM(oc(x_noc), ỹ)`` with ALL labels, stepped by the OC's optimizer.

    Args:
        ctx: context with a trainable network registered as ``oc``.
        inputs: float [B, 3, H, W], detached masked images (:func:`adversary_inputs`).
        labels: float [B, C] in [0, 1], unsmoothed (``class_loss`` smooths).
        weight: ``a_w(t)``.

    Returns:
        The detached scalar ``L_noc`` (weighted).
    """
    oc = ctx.models["oc"]
    oc.train()  # BN stays frozen (mode fix); the mode only matters for layers such as dropout
    with ctx.autocast():
        loss = weight * class_loss(oc(inputs), labels)
    ctx.update("oc", loss)
    return loss.detach()


# -- steps ----------------------------------------------------------------------------------------------------------
def generator_step(
    ctx: TrainContext, images: torch.Tensor, labels: torch.Tensor, step: int, spec: MethodSpec
) -> tuple[dict[str, torch.Tensor | float], torch.Tensor, OCTerm | None]:
    """One update of the CAM generator ``cg``: ``L_c`` plus the method's Puzzle and OC-CSE terms and, with
    ``--ppc true``, PPC's ``L_nce`` of view 1 and its 128x128 second view.

    Args:
        images: float [B, 3, H, W] on the device; labels: float [B, C] in [0, 1], unsmoothed.
        step: global micro-step (0-based), the ``t`` of the loss-weight ramps.

    Returns:
        (values to log: detached scalar tensors and schedule floats, see :func:`to_floats`; the detached raw maps
        float [B, C, h, w]; the OC term or None).
    """
    total = ctx.total_steps
    cg = ctx.models["cg"]
    scalars: dict[str, torch.Tensor | float] = {}
    term = None
    with ctx.autocast():
        if spec.ppc is not None:
            logits, maps, embeddings = cg(images, with_cam=True, with_embedding=True)
        else:
            logits, maps = cg(images, with_cam=True)
        c_loss = spec.class_loss(logits, labels)
        loss = c_loss
        if spec.puzzle is not None:
            alpha = spec.puzzle.alpha.at(step, total)
            stride = output_stride(ctx.module("cg"))
            p_loss, re_loss = puzzle_terms(cg, images, maps, labels, spec.puzzle, spec.class_loss, stride)
            loss = _puzzle_total(c_loss, p_loss, re_loss, alpha, spec.puzzle.terms)
            scalars |= {"p_loss": p_loss.detach(), "re_loss": re_loss.detach(), "alpha": alpha}
        if spec.oc is not None and spec.splitter is not None:
            oc_alpha, k = spec.oc.alpha.at(step, total), round(spec.oc.k.at(step, total))
            oc = ctx.module("oc")
            if spec.adversary is not None:
                oc.eval()  # the P-NOC OC was put in train mode by its own step; a frozen OC is always in eval mode
            term = occse_term(
                oc, images, maps, labels, spec.splitter, spec.class_loss, k, spec.oc.global_norm, spec.oc.grad_leak
            )
            loss = loss + oc_alpha * term.loss
            scalars |= {"o_loss": term.loss.detach(), "oc_alpha": oc_alpha, "k": float(k)}
        if spec.ppc is not None:  # view 2 through the generator, contrasted with view 1 (core/cam/ppc.py)
            ppc_loss, terms = ppc.generator_ppc_term(cg, images, maps, embeddings, labels, spec.ppc)
            loss = loss + ppc_loss
            scalars |= {"ppc_loss": ppc_loss.detach(), **terms}
    ctx.update("cg", loss)
    if term is not None and spec.splitter is not None:
        spec.splitter.update_focal(term.logits, term.remaining, labels)
    if spec.puzzle is not None or spec.oc is not None or spec.ppc is not None:
        scalars = {"loss": loss.detach(), "c_loss": c_loss.detach(), **scalars}
    else:
        scalars = {"loss": loss.detach()}
    return scalars, maps.detach(), term


def to_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Scalar tensors and floats -> floats, reading every tensor back from the device in one transfer."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    read = torch.stack([values[k].float().reshape(()) for k in keys]).tolist() if keys else []
    return {k: float(v) for k, v in (values | dict(zip(keys, read, strict=True))).items()}


def _puzzle_total(
    c_loss: torch.Tensor, p_loss: torch.Tensor, re_loss: torch.Tensor, alpha: float, terms: frozenset[str]
) -> torch.Tensor:
    # --loss_option drops terms, as the reference Puzzle script does; cl_pcl_re gives L_c + L_p + α·L_re.
    loss = torch.zeros_like(c_loss)
    if "cl" in terms:
        loss = loss + c_loss
    if "pcl" in terms:
        loss = loss + p_loss
    if "re" in terms:
        loss = loss + alpha * re_loss
    return loss


def cam_step(ctx: TrainContext, batch: dict[str, Any], step: int, spec: MethodSpec) -> dict[str, float]:
    """The engine's step function for every CAM method (bind ``spec`` with :func:`build_step_fn`).

    Mixing methods: one update on the mixed batch (:func:`core.cam.mixing.mixed_generator_step`) instead.
    P-NOC: after the generator's update, every ``--oc-train-interval-steps`` batches, the OC's adversarial step on
    the hard-masked images of the same batch.
    """
    images, labels = ctx.to_device(batch["image"]), ctx.to_device(batch["label"]).float()
    if spec.mix is not None:
        return to_floats(mixing.mixed_generator_step(ctx, images, labels, spec.mix, spec.class_loss))
    scalars, maps, term = generator_step(ctx, images, labels, step, spec)
    if spec.adversary is not None and term is not None:
        weight = spec.adversary.weight.at(step, ctx.total_steps)
        scalars["ow"] = weight
        if (step + 1) % spec.adversary.interval == 0:
            inputs = adversary_inputs(images, maps, term, spec.adversary)
            scalars["ot_loss"] = pnoc_oc_step(ctx, inputs, labels, weight, spec.class_loss)
    return to_floats(scalars)


def build_step_fn(
    method: str,
    args: argparse.Namespace,
    splitter: LabelSplitter | None = None,
    class_weight: torch.Tensor | None = None,
) -> StepFn:
    """The step function of ``method`` for :func:`core.engine.fit` (or a benchmark calling it per batch).

    The context must hold ``cg`` (trainable) and, for occse/poc/pnoc, ``oc`` (frozen, or trainable for pnoc);
    ``splitter`` is required for the OC methods and should be registered with ``ctx.add_state`` for resuming.
    """
    return functools.partial(cam_step, spec=method_spec(method, args, splitter, class_weight))
