"""SEAM (CVPR 2020, METHODS §4): equivariant attention with the Pixel Correlation Module (PCM).

Network (:class:`SeamClassifier`): any registry backbone, ``Dropout2d`` on the last features, a bias-free 1x1 head
with **C + 1** channels (channel 0 = background, never classified) and the PCM: on the detached CAMs (ReLU, max-norm,
background ``1 - max_fg``, foreground channels below the pixel's best one zeroed) and on features of the image
resized to the map size ⊕ 1x1(x2 → 64) ⊕ 1x1(x3 → 128) of the detached backbone stages (ResNet-38: SEAM's ``conv4``
and ``conv5``), fused by a 1x1 conv (195 → 192) and L2-normalised per pixel, it returns
``Ŷ = A·S``: every output pixel a similarity-weighted average of all input pixels (``S = ReLU(fᵀf)``, each output
pixel's weights summing to 1).

Losses (two views: x, and x' = x bilinearly resized by ``--seam_view_scale`` 0.3, or to PPC's fixed
``--ppc_view_size`` 128 square when PPC is on), maps upsampled to their view's input size as in the reference:

* ``L_cls``: MLSM of the foreground logits (GAP of the raw feature-size maps), mean over both views;
* ``L_min``: adaptive min-pooling on the PCM maps × labels (mean ReLU of each image's lowest 25 % of
  ``max_fg``), mean over both views (it only moves the best background threshold);
* ``L_ER = mean |M(A↓) − M(A')|`` over the foreground channels, ``M`` = min-max norm × label, ``A↓`` = view 1's maps
  resized to view 2's size;
* ``L_ECR``: with the background channel of the normalised raw maps set to ``1 − max_fg``,
  ``|onehot_max(A'ᵈ) − M(Ŷ)↓|`` and ``|onehot_max(A↓ᵈ) − M(Ŷ')|``, each averaged over its largest 20 % of the
  ``(C+1)·h·w`` entries per image (OHEM), summed;
* ``L = L_cls + L_min + L_ER + L_ECR``; with ``--ppc true`` plus PPC's ``L_nce`` (:mod:`core.cam.ppc`).

The PCM trains only through ``L_min`` and ``L_ECR`` (its inputs are detached); the backbone and the head through
``L_cls`` and ``L_ER``. Differences from the reference: the logits are the mean of the feature-size maps (the
reference pools the maps after upsampling them to the image size, a near-identical average); no in-place tensor
edits (the reference's ``max_onehot`` rewrites the maps it was given).

Inference: the model's ``forward(x, with_cam=True)`` returns the foreground channels of the PCM maps, so
``scripts/cam/inference.py`` writes ordinary CAM files (MS + flip, per-scale ReLU, sum) that ``evaluate.py`` and
``make_pseudo_masks.py`` read unchanged. Normalisation: the project divides each summed class map by its maximum;
SEAM/PPC use min-max ``(A − min − 1e-5)/(max − min + 1e-5)``. The project's max-norm is kept so every CAM folder
is normalised alike; a PCM map is a weighted average, so its minimum is above zero and its best background
threshold is higher under max-norm than the references' 0.26.
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.cam import methods, ppc
from core.cli import add_arg, nonnegative_float, open_unit_float
from core.engine import StepFn, TrainContext
from core.errors import WSSSError
from core.models import Classifier, group_parameters
from core.models.backbones import HiddenMix

logger = logging.getLogger(__name__)

EPS = 1e-5
MIN_POOL_FRACTION = 0.25  # L_min averages the lowest quarter of each image's max_fg
PCM_LOW, PCM_MID, PCM_FUSED = 64, 128, 192


# -- network --------------------------------------------------------------------------------------------------------
def pcm_input(maps: torch.Tensor) -> torch.Tensor:
    """SEAM's PCM input from raw maps with the background channel first, detached.

    Args:
        maps: float [B, C+1, h, w], raw head output.

    Returns:
        float [B, C+1, h, w] in [0, 1]: ReLU'd foreground maps divided by their max (+1e-5), each pixel keeping only
        its largest foreground value; channel 0 = ``1 - max_fg``.
    """
    maps = F.relu(maps.detach().float())
    peak = maps.flatten(2).amax(dim=2)[..., None, None] + EPS
    maps = F.relu(maps - EPS) / peak
    foreground = maps[:, 1:]
    best = foreground.amax(dim=1, keepdim=True)
    foreground = torch.where(foreground < best, torch.zeros_like(foreground), foreground)
    return torch.cat([1 - best, foreground], dim=1)


class PixelCorrelationModule(nn.Module):
    """SEAM's PCM: refines maps with the self-similarity of low-level features (see the module docstring).

    State-dict keys: ``low.weight`` [64, low, 1, 1], ``mid.weight`` [128, mid, 1, 1], ``fuse.weight`` [192, 195, 1, 1]
    (the references' ``f8_3``, ``f8_4``, ``f9``).
    """

    def __init__(self, low_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.low = nn.Conv2d(low_channels, PCM_LOW, 1, bias=False)
        self.mid = nn.Conv2d(mid_channels, PCM_MID, 1, bias=False)
        self.fuse = nn.Conv2d(3 + PCM_LOW + PCM_MID, PCM_FUSED, 1, bias=False)
        nn.init.kaiming_normal_(self.low.weight)
        nn.init.kaiming_normal_(self.mid.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)  # the reference's gain: sharp similarities from the start

    def affinity(
        self, image: torch.Tensor, low: torch.Tensor, mid: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """Transition weights between the pixels of the map grid.

        Args:
            image: float [B, 3, H, W], the normalised input image.
            low, mid: float [B, low, h', w'], [B, mid, h'', w''] backbone features (detached here).
            size: the map size (h, w).

        Returns:
            float [B, hw, hw], ``w[b, i, j]`` >= 0 = weight of input pixel i in output pixel j; each column sums to
            ``S/(S + 1e-5)`` ≈ 1.
        """
        parts = [
            image,
            F.relu(self.low(low.detach())),
            F.relu(self.mid(mid.detach())),
        ]
        features = torch.cat([F.interpolate(p, size, mode="bilinear", align_corners=True) for p in parts], dim=1)
        features = self.fuse(features).flatten(2).float()  # [B, 192, hw]
        features = features / (features.norm(dim=1, keepdim=True) + EPS)
        weights = F.relu(features.transpose(1, 2) @ features)  # [B, hw, hw], symmetric
        return weights / (weights.sum(dim=1, keepdim=True) + EPS)

    def forward(self, maps: torch.Tensor, image: torch.Tensor, low: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        """Refine ``maps`` float [B, K, h, w] (any values; SEAM passes :func:`pcm_input`) -> float [B, K, h, w]."""
        b, k, h, w = maps.shape
        weights = self.affinity(image, low, mid, (h, w))
        return (maps.float().reshape(b, k, h * w) @ weights).reshape(b, k, h, w)


class SeamOutputs(NamedTuple):
    """Everything a SEAM training step needs from one view.

    Attributes:
        maps: float [B, C+1, h, w], raw head output, background first.
        refined: float [B, C+1, h, w] >= 0, the PCM maps.
        embeddings: float [B, dim, h, w] >= 0, PPC's raw projected features of the last backbone features after the
            dropout (the SEAM branch of PPC), or None without a projection head.
    """

    maps: torch.Tensor
    refined: torch.Tensor
    embeddings: torch.Tensor | None = None


class SeamClassifier(Classifier):
    """The CAM classifier with SEAM's background channel and PCM (module docstring).

    State-dict keys: :class:`core.models.Classifier`'s with ``classifier.weight`` [C+1, D, 1, 1] (background first),
    plus ``pcm.low/mid/fuse.weight`` and, with PPC, ``projection.conv.weight`` (training only: dropped at inference).
    The released SEAM/PPC ResNet-38 files load directly (``fc8`` → ``classifier``, ``f8_3/f8_4/f9`` → ``pcm``,
    ``fc_proj`` → ``projection.conv``; see :mod:`core.models.compat`).

    Args:
        architecture, num_classes (foreground classes C), **kwargs: as :class:`core.models.Classifier`.
        dropout: ``Dropout2d`` probability on the last features before the head (the reference's 0.5).
        ppc_dim: channels of PPC's projection head (:class:`core.cam.ppc.ProjectionHead`), or None for none.
    """

    def __init__(
        self,
        architecture: str,
        num_classes: int = 20,
        *,
        dropout: float = 0.5,
        ppc_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(architecture, num_classes, **kwargs)
        channels = self.backbone.stage_channels
        if len(channels) < 5:
            raise WSSSError(f"SEAM's PCM needs a convolutional backbone with stage features; {architecture} has none")
        self.model_kwargs["dropout"] = float(dropout)
        self.dropout = nn.Dropout2d(float(dropout))
        self.classifier = nn.Conv2d(self.backbone.out_channels, self.num_classes + 1, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.pcm = PixelCorrelationModule(channels[2], channels[3])
        self.projection = ppc.ProjectionHead(self.backbone.out_channels, ppc_dim) if ppc_dim else None

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, with_cam: bool = False, hidden_mix: HiddenMix | None = None, *, full: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | SeamOutputs:
        """Classify a batch; the CAMs are the PCM maps.

        Args:
            x: float [B, 3, H, W], normalised image.
            with_cam: also return the foreground channels of the PCM maps (what CAM inference and validation read).
            full: return :class:`SeamOutputs` instead (training).

        Returns:
            logits float [B, C]; or (logits, float [B, C, h, w] >= 0); or SeamOutputs.
        """
        _, _, x2, x3, x4 = self.backbone(x) if hidden_mix is None else self.backbone(x, hidden_mix)
        features = self.dropout(x4)
        maps = self.classifier(features)
        logits = maps[:, 1:].mean(dim=(2, 3))
        if not (with_cam or full):
            return logits
        refined = self.pcm(pcm_input(maps), x, x2, x3)
        if full:
            embeddings = self.projection(features) if self.projection is not None else None
            return SeamOutputs(maps, refined, embeddings)
        return logits, refined[:, 1:]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Backbone = pretrained; head, PCM (and projection) = scratch, as the reference's ``from_scratch_layers``."""
        heads = [self.classifier, self.pcm] + ([self.projection] if self.projection is not None else [])
        return group_parameters(pretrained=[self.backbone], scratch=heads)


def is_seam_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for the weights of a :class:`SeamClassifier` (keys normalised by ``normalize_state_dict_keys``)."""
    return "pcm.fuse.weight" in state_dict


def seam_classifier(
    args: argparse.Namespace, num_classes: int, trainable_backbone: bool = True, dropout: float | None = None
) -> SeamClassifier:
    """A :class:`SeamClassifier` of the network flags (as ``core.cam.training.classifier_from_flags``), with PPC's
    projection head when ``--ppc true``."""
    config = ppc.PPCConfig.from_args(args)
    return SeamClassifier(
        args.architecture,
        num_classes,
        dropout=float(getattr(args, "feature_dropout", 0.5) if dropout is None else dropout),
        ppc_dim=config.dim if config is not None else None,
        backbone_weights=args.backbone_weights,
        mode=args.mode,
        dilated=args.dilated,
        trainable_stem=args.trainable_stem,
        trainable_backbone=trainable_backbone,
        scratch_init=getattr(args, "scratch_init", "torchvision"),
    )


# -- loss terms -----------------------------------------------------------------------------------------------------
def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """SEAM's ``max_norm``: ``ReLU(p − min − 1e-5) / (max − min + 1e-5)`` per image and channel of ``ReLU(maps)``.

    Args:
        maps: float [B, K, h, w].

    Returns:
        float [B, K, h, w] in [0, 1).
    """
    maps = F.relu(maps)
    low = maps.flatten(2).amin(dim=2)[..., None, None]
    high = maps.flatten(2).amax(dim=2)[..., None, None]
    return F.relu(maps - low - EPS) / (high - low + EPS)


def with_background(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` [B, C+1, h, w] with channel 0 replaced by ``1 − max_fg``."""
    return torch.cat([1 - maps[:, 1:].amax(dim=1, keepdim=True), maps[:, 1:]], dim=1)


def max_onehot(maps: torch.Tensor) -> torch.Tensor:
    """Keep, per pixel, only the largest foreground value (ties all kept); channel 0 untouched. [B, C+1, h, w]."""
    foreground = maps[:, 1:]
    keep = foreground == foreground.amax(dim=1, keepdim=True)
    return torch.cat([maps[:, :1], foreground * keep], dim=1)


def adaptive_min_pool_loss(maps: torch.Tensor) -> torch.Tensor:
    """``L_min``: mean ReLU of the lowest 25 % of each image's ``max_c maps`` (maps [B, C, h, w], labels applied)."""
    peak = maps.amax(dim=1).flatten(1)  # [B, hw]
    k = max(1, int(peak.shape[1] * MIN_POOL_FRACTION))
    lowest = torch.topk(peak, k, dim=1, largest=False).values
    return F.relu(lowest).mean()


def ohem_mean(errors: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Mean of each image's largest ``int(fraction · N)`` entries (N = entries per image), over the batch.

    Args:
        errors: float [B, ...].

    Returns:
        Scalar: the mean of the kept ``B · k`` entries (k >= 1).
    """
    flat = errors.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return torch.topk(flat, k, dim=1).values.mean()


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True``, as SEAM resizes maps and views."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def seam_losses(
    view1: SeamOutputs,
    view2: SeamOutputs,
    size1: tuple[int, int],
    size2: tuple[int, int],
    labels: torch.Tensor,
    class_loss: methods.ClassLoss,
    ohem_fraction: float = 0.2,
) -> dict[str, torch.Tensor]:
    """SEAM's four terms (module docstring) from the outputs of the two views.

    Args:
        view1, view2: the model's :class:`SeamOutputs` of x and x'.
        size1, size2: input sizes (H, W) of the two views; maps are upsampled to them.
        labels: float [B, C] in [0, 1], unsmoothed (``class_loss`` smooths).
        ohem_fraction: share of the ``(C+1)·h·w`` entries per image that ``L_ECR`` averages.

    Returns:
        ``{"cls_loss", "min_loss", "er_loss", "ecr_loss"}``: scalar tensors >= 0 with graphs into the model.
    """
    ones = torch.ones_like(labels[:, :1])
    mask = torch.cat([ones, labels], dim=1)[..., None, None]  # [B, C+1, 1, 1], background always present
    logits1, logits2 = view1.maps[:, 1:].mean(dim=(2, 3)), view2.maps[:, 1:].mean(dim=(2, 3))
    cls_loss = (class_loss(logits1.float(), labels) + class_loss(logits2.float(), labels)) / 2
    refined1, refined2 = resize(view1.refined.float(), size1), resize(view2.refined.float(), size2)
    min_loss = (adaptive_min_pool_loss((refined1 * mask)[:, 1:]) + adaptive_min_pool_loss((refined2 * mask)[:, 1:])) / 2

    maps1 = resize(minmax_normalize(resize(view1.maps.float(), size1)), size2) * mask
    maps2 = minmax_normalize(resize(view2.maps.float(), size2)) * mask
    er_loss = (maps1[:, 1:] - maps2[:, 1:]).abs().mean()

    refined1 = resize(minmax_normalize(refined1), size2) * mask
    refined2 = minmax_normalize(refined2) * mask
    target1 = max_onehot(with_background(maps2.detach()))  # view 2's raw maps teach view 1's PCM, and conversely
    target2 = max_onehot(with_background(maps1.detach()))
    ecr_loss = ohem_mean((target1 - refined1).abs(), ohem_fraction) + ohem_mean(
        (target2 - refined2).abs(), ohem_fraction
    )
    return {"cls_loss": cls_loss, "min_loss": min_loss, "er_loss": er_loss, "ecr_loss": ecr_loss}


# -- flags, configuration and the step ------------------------------------------------------------------------------
def add_seam_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """SEAM's flags: the second view, the OHEM share of ``L_ECR`` and the dropout before the head."""
    group = parser.add_argument_group("SEAM")
    add_arg(
        group,
        "--seam_view_scale",
        type=open_unit_float,
        default=0.3,
        help="second view = the crop bilinearly resized by this factor (SEAM 0.3; with --ppc true the view is the "
        "crop resized to --ppc_view_size x --ppc_view_size instead, as PPC's SEAM branch)",
    )
    add_arg(
        group,
        "--ecr_top",
        type=open_unit_float,
        default=0.2,
        help="L_ECR averages each image's largest this share of the (C+1)·h·w errors (OHEM, SEAM 0.2)",
    )
    add_arg(
        group,
        "--feature_dropout",
        type=nonnegative_float,
        default=0.5,
        help="Dropout2d probability on the last features before the head (SEAM's dropout7, 0.5)",
    )
    return group


@dataclass(frozen=True)
class SeamConfig:
    """SEAM settings: the second view's scale, the OHEM share of ``L_ECR`` and PPC's settings (None: PPC off)."""

    view_scale: float = 0.3
    ohem_fraction: float = 0.2
    ppc: ppc.PPCConfig | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SeamConfig:
        return cls(float(args.seam_view_scale), float(args.ecr_top), ppc.PPCConfig.from_args(args))

    def second_view(self, images: torch.Tensor) -> torch.Tensor:
        """x' of x float [B, 3, H, W]: bilinear (align_corners) by ``view_scale`` (``int(s · H)``, as the reference's
        ``scale_factor``), or to PPC's fixed ``view_size`` square with PPC on."""
        if self.ppc is not None:
            return ppc.second_view(images, self.ppc.view_size)
        return resize(images, tuple(max(1, int(s * self.view_scale)) for s in images.shape[-2:]))


def seam_step(
    ctx: TrainContext, batch: dict[str, Any], step: int, config: SeamConfig, class_loss: methods.ClassLoss
) -> dict[str, float]:
    """The engine's step function of SEAM: both views through ``cg``, ``L = L_cls + L_min + L_ER + L_ECR``, plus
    PPC's ``L_nce`` on the two views' embeddings and PCM maps (at feature size; PPC resizes view 1 to view 2's grid)
    with ``--ppc true``."""
    images, labels = ctx.to_device(batch["image"]), ctx.to_device(batch["label"]).float()
    cg = ctx.models["cg"]
    with ctx.autocast():
        view2 = config.second_view(images)
        out1, out2 = cg(images, full=True), cg(view2, full=True)
        terms = seam_losses(
            out1, out2, tuple(images.shape[-2:]), tuple(view2.shape[-2:]), labels, class_loss, config.ohem_fraction
        )
        loss = sum(terms.values())
        extra: dict[str, torch.Tensor] = {}
        if config.ppc is not None:
            if out1.embeddings is None or out2.embeddings is None:
                raise WSSSError("--ppc true needs a SeamClassifier built with a projection head (ppc_dim)")
            ppc_loss, extra = ppc.ppc_loss(
                out1.embeddings, out2.embeddings, out1.refined, out2.refined, labels, **ppc.config_kwargs(config.ppc)
            )
            loss = loss + ppc_loss
            extra = {"ppc_loss": ppc_loss, **extra}
    ctx.update("cg", loss)
    values = {"loss": loss, **terms, **extra}
    return methods.to_floats({k: v.detach() for k, v in values.items()})


def build_seam_step(
    args: argparse.Namespace, class_weight: torch.Tensor | None = None, config: SeamConfig | None = None
) -> StepFn:
    """SEAM's step for :func:`core.engine.fit` (the context holds a trainable :class:`SeamClassifier` as ``cg``)."""
    class_loss = methods.classification_loss(float(args.label_smoothing), class_weight)
    return functools.partial(seam_step, config=config or SeamConfig.from_args(args), class_loss=class_loss)
