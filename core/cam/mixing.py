"""The mixing CAM methods (METHODS §12–14): Mixup-CAM, FMix-CAM and Manifold-Mixup-CAM.

Each batch is mixed with a permutation ``π`` of itself:

* ``mixup``: ``x̃ = λ x + (1 - λ) x[π]``, λ ~ Beta(0.2, 0.2);
* ``fmix``: ``x̃ = m ⊙ x + (1 - m) ⊙ x[π]`` with a binary low-frequency mask m holding ⌈λHW⌉ ones, λ ~ Beta(1, 1)
  (:func:`fmix_mask`; written here, the FMix package is not a dependency);
* ``manifold``: the mixup blend applied to the hidden state at a point drawn uniformly from the input and the five
  backbone stage outputs (:data:`core.models.MIX_POINTS`), inside the classifier's own forward pass.

Every method then minimises ``L = λ MLSM(f(x̃), y) + (1 - λ) MLSM(f(x̃), y[π]) + λ_ent L_ent + λ_con L_con``:
``L_ent`` is the entropy of the classifier's sigmoid outputs (not of the labels, which made the school project's
term a no-op: METHODS §16.17) and ``L_con`` SCOPS' concentration of each class's map, the classes of ``y`` weighted
λ and those of ``y[π]`` 1 - λ (:mod:`core.losses`). For FMix, λ is the mask's exact share of ones.

Mixing is one operation per batch on the device, with no per-sample loop. λ, the mixing point and whether a batch
is mixed at all (``--mixup_prob``) are drawn from torch's CPU generator, the permutation and FMix's spectrum from the
device's; the engine seeds both from (seed, rank, epoch), so a run is deterministic for a seed and resumes exactly.
Under torchrun each process permutes its own batch: an image is only mixed with images of the same process.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from core.cli import add_arg, add_bool_arg, nonnegative_float, positive_float, str2bool
from core.engine import TrainContext
from core.errors import WSSSError
from core.losses import concentration_loss, sigmoid_entropy
from core.models import MIX_POINTS

MIX_METHODS = ("mixup", "fmix", "manifold")
DEFAULT_ALPHA = {"mixup": 0.2, "fmix": 1.0, "manifold": 0.2}  # Beta(α, α) of λ (METHODS §12–14)
DEFAULT_DECAY = 3.0  # FMix's spectrum decay δ
DEFAULT_ENT_WEIGHT = 0.02
DEFAULT_CON_WEIGHT = 2e-4
ClassLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- flags ----------------------------------------------------------------------------------------------------------
class _MixSwitch(argparse.Action):
    """The school project's ``--mixup 1`` / ``--fmix 1`` / ``--manifold_mixup 1``: another spelling of ``--mix``."""

    def __init__(self, option_strings: list[str], dest: str, kind: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.kind = kind

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        try:
            on = str2bool(values)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option}: {e}")
        if not on:
            parser.error(
                f"argument {option}: this script always mixes; pick the method with --mix, or train without "
                "mixing with scripts/cam/train_vanilla.py"
            )
        setattr(namespace, self.dest, self.kind)


def add_mix_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Flags of the mixing methods, with the school project's switches as aliases (``--mixup 1``, ``--ent 1``)."""
    group = parser.add_argument_group("mixing (Mixup-CAM, FMix-CAM, Manifold-Mixup-CAM)")
    add_arg(
        group,
        "--mix",
        type=str,
        default="mixup",
        choices=MIX_METHODS,
        help="mixup: blend images; fmix: paste a low-frequency mask of the partner image; manifold: blend hidden "
        "states at a random point (input or after a backbone stage). Each process mixes its own batch: under "
        "torchrun the partner of an image is always from the same process",
    )
    for option, kind in (("--mixup", "mixup"), ("--fmix", "fmix"), ("--manifold_mixup", "manifold")):
        add_arg(
            group,
            option,
            dest="mix",
            action=_MixSwitch,
            kind=kind,
            nargs="?",
            const="1",
            default=argparse.SUPPRESS,
            metavar="1",
            help=f"same as --mix {kind} (the school project's switch)",
        )
    add_arg(
        group,
        "--mix_alpha",
        type=positive_float,
        default=None,
        help="α of λ ~ Beta(α, α) (default: 0.2 for mixup and manifold, 1 for fmix)",
    )
    add_arg(group, "--fmix_decay", type=positive_float, default=DEFAULT_DECAY, help="FMix: spectrum decay δ of 1/f^δ")
    add_bool_arg(group, "--ent", True, "add the entropy term L_ent of the sigmoid outputs")
    add_arg(
        group,
        "--ent_loss_weight",
        type=nonnegative_float,
        default=DEFAULT_ENT_WEIGHT,
        help=f"λ_ent (default {DEFAULT_ENT_WEIGHT})",
    )
    add_bool_arg(group, "--concent", True, "add the concentration term L_con of the class maps")
    add_arg(
        group,
        "--concent_loss_weight",
        type=nonnegative_float,
        default=DEFAULT_CON_WEIGHT,
        help=f"λ_con (default {DEFAULT_CON_WEIGHT:g})",
    )
    return group


@dataclass(frozen=True)
class MixConfig:
    """A mixing method's settings: which mixing, λ's Beta parameter, FMix's decay, the mixing probability and the
    weights of the entropy and concentration terms (0 = off)."""

    kind: str = "mixup"
    alpha: float = DEFAULT_ALPHA["mixup"]
    decay: float = DEFAULT_DECAY
    prob: float = 1.0
    ent_weight: float = DEFAULT_ENT_WEIGHT
    con_weight: float = DEFAULT_CON_WEIGHT

    @classmethod
    def from_args(cls, args: argparse.Namespace, kind: str) -> MixConfig:
        """The settings of ``kind`` from :func:`add_mix_args`' flags (absent flags take their defaults, so callers
        without them, such as the benchmark, get the methods' published settings)."""
        if kind not in MIX_METHODS:
            raise WSSSError(f"unknown --mix {kind!r}: choose one of {', '.join(MIX_METHODS)}")
        prob = float(getattr(args, "mixup_prob", 1.0))
        if not 0.0 <= prob <= 1.0:
            raise WSSSError(f"--mixup_prob {prob:g}: the probability that a batch is mixed must lie in [0, 1]")
        use_ent, use_con = bool(getattr(args, "ent", True)), bool(getattr(args, "concent", True))
        return cls(
            kind=kind,
            alpha=float(getattr(args, "mix_alpha", None) or DEFAULT_ALPHA[kind]),
            decay=float(getattr(args, "fmix_decay", DEFAULT_DECAY)),
            prob=prob,
            ent_weight=float(getattr(args, "ent_loss_weight", DEFAULT_ENT_WEIGHT)) if use_ent else 0.0,
            con_weight=float(getattr(args, "concent_loss_weight", DEFAULT_CON_WEIGHT)) if use_con else 0.0,
        )


# -- mixing ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchMix:
    """How one batch is mixed.

    Attributes:
        lam: weight of each image's own labels, in [0, 1] (FMix: the mask's share of ones); 1 = no mixing.
        perm: long [B] on the device, the partner of each image.
        mask: float [1, 1, H, W] in {0, 1} (FMix: 1 keeps the image, 0 takes the partner), or None (blend by λ).
        point: index into :data:`core.models.MIX_POINTS` where the batch is mixed (0 = the input).
    """

    lam: float
    perm: torch.Tensor
    mask: torch.Tensor | None = None
    point: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Mix a batch ``x`` [B, ...] with its permutation; ``lam = 1`` without a mask returns ``x`` itself."""
        if self.mask is not None:
            mask = self.mask.to(x.dtype)
            return mask * x + (1.0 - mask) * x[self.perm]
        if self.lam == 1.0:
            return x
        return self.lam * x + (1.0 - self.lam) * x[self.perm]

    def hidden(self, point: int, hidden: torch.Tensor) -> torch.Tensor:
        """The classifier's hidden-state hook (:data:`core.models.HiddenMix`): mix at ``self.point`` only."""
        return self.apply(hidden) if point == self.point else hidden

    def label_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """``λ y + (1 - λ) y[π]``: float [B, C] in [0, 1], how much each class of the mixed image counts."""
        return self.lam * labels + (1.0 - self.lam) * labels[self.perm]


def fmix_ones(lam: float, pixels: int) -> int:
    """Pixels set to 1 in an FMix mask of ``pixels`` pixels: ⌈λ·pixels⌉, within [0, pixels]."""
    return min(pixels, max(0, math.ceil(lam * pixels - 1e-9)))  # the tolerance keeps k/pixels·pixels at k


def fmix_mask(
    lam: float, height: int, width: int, decay: float = DEFAULT_DECAY, device: torch.device | str | None = None
) -> torch.Tensor:
    """FMix's binary mask: the top ⌈λHW⌉ pixels of a random low-frequency image.

    The image is the inverse real FFT of a complex Gaussian spectrum whose amplitude falls as ``1/f^decay``
    (frequencies clamped below at ``1/max(H, W)``), so the ones form a few smooth blobs.

    Args:
        lam: share of ones, in [0, 1].
        decay: δ; larger values give smoother masks.

    Returns:
        float32 [H, W] in {0, 1} on ``device`` with exactly :func:`fmix_ones` ones.
    """
    fy = torch.fft.fftfreq(height, device=device)[:, None]  # [H, 1]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]  # [1, W//2 + 1]
    freq = torch.sqrt(fx**2 + fy**2).clamp(min=1.0 / max(height, width))
    amplitude = freq.pow(-decay)
    spectrum = torch.complex(torch.randn_like(amplitude) * amplitude, torch.randn_like(amplitude) * amplitude)
    grey = torch.fft.irfft2(spectrum, s=(height, width))  # [H, W], real
    top = grey.flatten().topk(fmix_ones(lam, height * width)).indices
    return torch.zeros(height * width, device=grey.device).index_fill_(0, top, 1.0).view(height, width)


def sample_mix(config: MixConfig, images: torch.Tensor) -> BatchMix:
    """Draw how to mix the batch ``images`` float [B, 3, H, W] (see the module docstring for the generators)."""
    batch, device = images.shape[0], images.device
    if config.prob < 1.0 and float(torch.rand(())) >= config.prob:
        return BatchMix(1.0, torch.arange(batch, device=device))
    alpha = torch.tensor(config.alpha)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(batch, device=device)
    if config.kind == "fmix":
        height, width = images.shape[-2:]
        mask = fmix_mask(lam, height, width, config.decay, device)
        return BatchMix(fmix_ones(lam, height * width) / (height * width), perm, mask[None, None])
    point = int(torch.randint(len(MIX_POINTS), ())) if config.kind == "manifold" else 0
    return BatchMix(lam, perm, point=point)


# -- losses and step ------------------------------------------------------------------------------------------------
def mixed_class_loss(logits: torch.Tensor, labels: torch.Tensor, mix: BatchMix, class_loss: ClassLoss) -> torch.Tensor:
    """``λ L(z, y) + (1 - λ) L(z, y[π])``; equals ``class_loss(logits, labels)`` exactly when λ = 1.

    Args:
        logits: float [B, C] of the mixed batch; labels: float [B, C] in [0, 1], unsmoothed (``class_loss`` smooths).
    """
    return mix.lam * class_loss(logits, labels) + (1.0 - mix.lam) * class_loss(logits, labels[mix.perm])


def mixed_losses(
    logits: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    mix: BatchMix,
    config: MixConfig,
    class_loss: ClassLoss,
) -> dict[str, torch.Tensor]:
    """The mixing methods' loss and its terms.

    Args:
        logits: float [B, C]; maps: float [B, C, h, w], raw class maps of the mixed batch.
        labels: float [B, C] in [0, 1], unsmoothed.

    Returns:
        ``loss`` (with a graph), and the detached terms ``c_loss`` and, when their weights are > 0, ``ent_loss``
        and ``con_loss`` (unweighted).
    """
    c_loss = mixed_class_loss(logits, labels, mix, class_loss)
    loss, terms = c_loss, {"c_loss": c_loss.detach()}
    if config.ent_weight > 0:
        ent_loss = sigmoid_entropy(logits)
        loss = loss + config.ent_weight * ent_loss
        terms["ent_loss"] = ent_loss.detach()
    if config.con_weight > 0:
        attention = torch.softmax(F.relu(maps.float()), dim=1)  # M̂: classes compete at each position
        con_loss = concentration_loss(attention, mix.label_weights(labels))
        loss = loss + config.con_weight * con_loss
        terms["con_loss"] = con_loss.detach()
    return {"loss": loss} | terms


def mixed_generator_step(
    ctx: TrainContext, images: torch.Tensor, labels: torch.Tensor, config: MixConfig, class_loss: ClassLoss
) -> dict[str, torch.Tensor | float]:
    """One update of the CAM generator ``cg`` on a mixed batch.

    Args:
        images: float [B, 3, H, W] on the device; labels: float [B, C] in [0, 1], unsmoothed.

    Returns:
        Values to log: ``loss``, its terms (detached scalar tensors) and ``lam``.
    """
    cg = ctx.models["cg"]
    mix = sample_mix(config, images)
    with ctx.autocast():
        if config.kind == "manifold":
            logits, maps = cg(images, with_cam=True, hidden_mix=mix.hidden)
        else:
            logits, maps = cg(mix.apply(images), with_cam=True)
        terms = mixed_losses(logits, maps, labels, mix, config, class_loss)
    ctx.update("cg", terms["loss"])
    return {**terms, "loss": terms["loss"].detach(), "lam": mix.lam}
