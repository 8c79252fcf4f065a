"""Pixel-to-prototype contrast (PPC, CVPR 2022; METHODS §6, §16.5/10/22): a regulariser any CAM method can add.

A projection head (1x1 conv -> 128, ReLU) maps the classifier's last features to embeddings. Two views of the batch
(x and x resized to a fixed 128x128) give CAMs and embeddings; from each view's CAMs, with no gradient:

* pseudo labels: ReLU, per-image per-class min-max normalisation, the background channel set to a constant θ
  (``bg_score``), foreground channels times the image labels (background kept), argmax;
* prototypes: for every channel (absent classes and background included), the top-k positions over the WHOLE batch
  of the normalised (unmasked) CAMs, k = ``topk_fraction`` x the pixels of one image's grid; the prototype is the
  CAM-weighted mean of the raw (not normalised) embeddings there, then L2-normalised. The background channel is θ
  everywhere, so its top-k are ties and the batch's first k positions make its prototype, as in the reference;
  ``--ppc_bg_prototype complement`` weighs it by ``1 - max_c`` of the class channels instead, and
  ``--ppc_prototype_images labelled`` takes a class's top-k from the images labelled with it only (the reference
  takes them from every image: min-max scaling lifts a faint positive blip of an absent class to the same ~1 as a
  present class's peak, so its positions compete with the true ones). Under DDP every process
  all-gathers its local top-k candidates, so the prototypes equal those of one process holding the global batch
  (ties are broken by batch position, as a stable sort over the global batch would).

The loss contrasts L2-normalised pixel embeddings ``v`` with prototypes at temperature τ,
``F(v; y; P, N) = -log(exp(v·p_y/τ) / Σ_{c∈N} exp(v·p_c/τ))``:

* cross prototype ``L_cp = ½[F(v1; y1; P2) + F(v2; y2; P1)]`` and cross CAM ``L_cc = ½[F(v1; y2; P1) + F(v2; y1; P2)]``
  (means over pixels, N = all prototypes);
* intra view, per view with its own prototypes: semi-hard prototype mining (N = the positive plus the prototypes
  ranked 4th-13th by similarity, the 3 most similar skipped) and hard pixel sampling (per pseudo class: a random half
  of its pixels plus those ranked 10 %-60 % in ascending similarity to their prototype), mean per class, then over
  classes; ``L_intra = ½(view 1 + view 2)``;
* ``L_nce = w_cp L_cp + w_cc L_cc + w_intra L_intra`` (0.1 each).

Who resizes: :func:`ppc_loss` itself resizes view 1's embeddings and CAMs to view 2's grid (bilinear,
``align_corners=True``, as the reference) when their sizes differ, so callers pass the raw network outputs (passing
them already resized is the same). Everything is vectorised: no Python loop over pixels or classes (per-class
selections are sorts, per-class means ``index_add``).

Differences from the reference, on purpose: the min-max normalisation maps values at the minimum to 0 (the reference
leaves them slightly negative); a channel whose top-k CAM weights are all zero gives a zero prototype (the reference
divides 0 by 0); the intra-view mean runs over the classes that contribute pixels (the reference also counts classes
with one pixel in the denominator, METHODS §16.22).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.cli import add_arg, add_bool_arg, float_list, open_unit_float, positive_float, positive_int, unit_float
from core.errors import WSSSError
from core.models import Classifier, group_parameters

NORM_EPS = 1e-5
SKIP_MOST_SIMILAR = 3  # semi-hard mining: the 3 most similar prototypes are skipped ...
MINED_NEGATIVES = 10  # ... and the next 10 (ranks 4-13) are the negatives
HARD_BAND = (0.1, 0.6)  # hard pixels: ranks from 10 % to 60 % in ascending similarity (the hardest 10 % dropped)
TERMS = ("ppc_cp", "ppc_cc", "ppc_intra")
BG_PROTOTYPES = ("constant", "complement")
PROTOTYPE_IMAGES = ("all", "labelled")


class ProjectionHead(nn.Module):
    """``ReLU(1x1 conv(features))``: float [B, in_channels, h, w] -> raw embeddings float [B, dim, h, w] >= 0."""

    def __init__(self, in_channels: int, dim: int = 128) -> None:
        super().__init__()
        self.conv = nn.Conv2d(int(in_channels), int(dim), kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(features))


class PPCClassifier(Classifier):
    """The CAM classifier plus PPC's projection head on its last features (training only).

    State-dict keys: :class:`~core.models.Classifier`'s plus ``projection.conv.weight`` ``[dim, D, 1, 1]``; a plain
    classifier loading these weights (CAM inference, ``--restore``) drops the head (``AUXILIARY_HEADS``).

    Args:
        ppc_dim: embedding channels; None builds no head (a subclass used with PPC off, e.g. EPS).
        architecture, num_classes, **kwargs: as :class:`~core.models.Classifier`.
    """

    def __init__(self, architecture: str, num_classes: int = 20, *, ppc_dim: int | None = 128, **kwargs) -> None:
        super().__init__(architecture, num_classes, **kwargs)
        self.projection = ProjectionHead(self.backbone.out_channels, ppc_dim) if ppc_dim else None

    def class_logits(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits float [B, C] from the raw maps (their spatial means)."""
        return maps.mean(dim=(2, 3))

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, with_cam: bool = False, with_embedding: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """As :meth:`Classifier.forward`; ``with_embedding`` returns (logits, maps, embeddings float [B, dim, h, w])."""
        if not with_embedding:
            return super().forward(x, with_cam)
        if self.projection is None:
            raise ValueError("this network was built without a projection head (ppc_dim=None)")
        features = self.backbone(x)[-1]
        maps = self.classifier(features)
        return self.class_logits(maps), maps, self.projection(features)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """As :meth:`Classifier.param_groups`, with the projection head among the scratch parameters."""
        heads = [self.classifier] + ([self.projection] if self.projection is not None else [])
        return group_parameters(pretrained=[self.backbone], scratch=heads)


# -- flags ----------------------------------------------------------------------------------------------------------
def add_ppc_args(
    parser: argparse.ArgumentParser, bg: float = 0.20, topk: float = 1 / 8, view_size: int = 128
) -> argparse._ArgumentGroup:
    """PPC flags; ``bg``/``topk`` are the script's defaults (SEAM branch 0.20 and 1/8, EPS branch 0.10 and 1/16)."""
    group = parser.add_argument_group("PPC pixel-to-prototype contrast")
    add_bool_arg(
        group,
        "--ppc",
        False,
        "add the PPC loss (projection head on the last features, second view resized to --ppc_view_size). Under "
        "torchrun, prototypes come from the GLOBAL batch: each process all-gathers its top-k candidates, so the "
        "result does not depend on the number of processes",
    )
    add_arg(group, "--ppc_bg", type=unit_float, default=bg, help="constant background score θ (default %(default)s)")
    add_arg(
        group,
        "--ppc_topk",
        type=open_unit_float,
        default=topk,
        help="prototype top-k as a fraction of one image's feature grid, over the whole batch (default %(default).4g)",
    )
    add_arg(group, "--ppc_tau", type=positive_float, default=0.1, help="temperature τ of the contrast (default 0.1)")
    add_arg(
        group,
        "--ppc_weight",
        type=float_list,
        default=[0.1, 0.1, 0.1],
        help="weights of L_cp, L_cc, L_intra (one value = all three; default 0.1,0.1,0.1)",
    )
    add_arg(
        group,
        "--ppc_view_size",
        type=positive_int,
        default=view_size,
        help="side of the second view, the batch resized bilinearly (default %(default)s)",
    )
    add_arg(group, "--ppc_dim", type=positive_int, default=128, help="embedding channels of the projection head")
    add_arg(
        group,
        "--ppc_bg_prototype",
        type=str,
        default="constant",
        choices=BG_PROTOTYPES,
        help="weights of the background prototype: constant = θ everywhere, as the reference (every position ties, "
        "so the first top-k positions of the batch make it); complement = 1 - max_c of the normalised class maps "
        "(the least class-like positions)",
    )
    add_arg(
        group,
        "--ppc_prototype_images",
        type=str,
        default="all",
        choices=PROTOTYPE_IMAGES,
        help="where a class prototype's top-k positions may come from: all = every image of the batch, as the "
        "reference; labelled = only the images labelled with the class (a class absent from the batch then gets a "
        "zero prototype)",
    )
    return group


@dataclass(frozen=True)
class PPCConfig:
    """PPC settings (see :func:`add_ppc_args`)."""

    bg_score: float = 0.20
    topk_fraction: float = 1 / 8
    tau: float = 0.1
    weights: tuple[float, float, float] = (0.1, 0.1, 0.1)
    view_size: int = 128
    dim: int = 128
    bg_prototype: str = "constant"
    prototype_images: str = "all"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PPCConfig | None:
        """The settings of ``--ppc true``, or None when PPC is off (or the script has no PPC flags)."""
        if not getattr(args, "ppc", False):
            return None
        weights = list(args.ppc_weight)
        if len(weights) == 1:
            weights *= 3
        if len(weights) != 3 or min(weights) < 0:
            raise WSSSError(
                f"--ppc_weight takes one or three non-negative numbers (L_cp, L_cc, L_intra), got {weights}"
            )
        return cls(
            bg_score=float(args.ppc_bg),
            topk_fraction=float(args.ppc_topk),
            tau=float(args.ppc_tau),
            weights=(weights[0], weights[1], weights[2]),
            view_size=int(args.ppc_view_size),
            dim=int(args.ppc_dim),
            bg_prototype=str(getattr(args, "ppc_bg_prototype", "constant")),
            prototype_images=str(getattr(args, "ppc_prototype_images", "all")),
        )


# -- pseudo labels and prototypes (no gradient) ---------------------------------------------------------------------
def normalized_scores(cams: torch.Tensor, bg_score: float) -> torch.Tensor:
    """Per-image per-class min-max normalised CAMs with the background channel replaced by ``bg_score``.

    Args:
        cams: float [B, 1 + C, h, w], background channel FIRST (its values are ignored), foreground raw maps.

    Returns:
        float32 [B, 1 + C, h, w]: channel 0 = ``bg_score``; channel c: ``ReLU(A_c - min - 1e-5) / (max - min + 1e-5)``
        of ``ReLU(A_c)`` per image, in [0, 1).
    """
    fg = F.relu(cams[:, 1:].detach().float())
    low = fg.amin(dim=(2, 3), keepdim=True)
    high = fg.amax(dim=(2, 3), keepdim=True)
    fg = F.relu(fg - low - NORM_EPS) / (high - low + NORM_EPS)
    return torch.cat([torch.full_like(fg[:, :1], float(bg_score)), fg], dim=1)


def prototype_weights(
    scores: torch.Tensor, bg_prototype: str = "constant", labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The weights ``m`` of :func:`batch_prototypes`: ``scores`` themselves (``constant``: the background channel is
    θ everywhere), or with the background channel ``1 - max_c`` of the class channels (``complement``).

    Args:
        scores: float [B, 1 + C, h, w] from :func:`normalized_scores`.
        labels: float [B, C] multi-hot: when given, a class channel is zeroed in the images not labelled with it
            (``--ppc_prototype_images labelled``); the background channel is kept.
    """
    if bg_prototype not in BG_PROTOTYPES:
        raise ValueError(f"unknown background prototype {bg_prototype!r}; choose from {', '.join(BG_PROTOTYPES)}")
    classes = scores[:, 1:]
    background = scores[:, :1] if bg_prototype == "constant" else 1 - classes.amax(dim=1, keepdim=True)
    if labels is not None:
        classes = classes * labels.to(classes.dtype)[:, :, None, None]
    return torch.cat([background, classes], dim=1)


def pseudo_labels(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``argmax_c scores_c · [1, labels]_c``: long [B, h, w] in 0..C (0 = background); absent classes never win.

    Args:
        scores: float [B, 1 + C, h, w] from :func:`normalized_scores` (background first, θ > 0).
        labels: float [B, C] multi-hot.
    """
    keep = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1).to(scores.dtype)
    return (scores * keep[:, :, None, None]).argmax(dim=1)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_cat(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    # Concatenate every process's tensor (same shape everywhere) in rank order: the global batch order.
    parts = [torch.empty_like(tensor) for _ in range(_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def _stable_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Top-k along the last dim with ties broken by position (stable sort), so a merge of per-process top-k lists picks
    # exactly what one sort over the concatenated global batch picks.
    sorted_values, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return sorted_values[..., :k], order[..., :k]


@torch.no_grad()
def batch_prototypes(embeddings: torch.Tensor, scores: torch.Tensor, topk_fraction: float) -> torch.Tensor:
    """One L2-normalised prototype per channel from the top-k scores of the whole (global) batch.

    ``p_c = normalize(Σ_{j∈K_c} m_cj u_j / Σ_{j∈K_c} m_cj)``, ``K_c`` = the ``k = max(1, int(h·w·topk_fraction))``
    positions of the largest ``m_c`` over all images of the batch and, under DDP, over all processes (each gathers
    the others' local top-k candidates). A channel whose top weights are all 0 gets a zero prototype.

    Args:
        embeddings: float [B, D, h, w], raw projected features ``u`` (not normalised).
        scores: float [B, K, h, w] >= 0, the weights ``m`` (normalised CAMs, unmasked by labels).
        topk_fraction: k as a fraction of one image's ``h·w``.

    Returns:
        float32 [K, D], rows of norm 1 (or 0).
    """
    batch, dim, height, width = embeddings.shape
    channels = scores.shape[1]
    k = max(1, int(height * width * topk_fraction))
    feats = embeddings.detach().float().permute(0, 2, 3, 1).reshape(-1, dim)  # [N, D], N = B·h·w, batch-major
    weights = scores.detach().float().transpose(0, 1).reshape(channels, -1)  # [K, N]
    top_weights, top_index = _stable_topk(weights, min(k, weights.shape[1]))  # [K, k']
    top_feats = feats[top_index]  # [K, k', D]
    if _world_size() > 1:
        top_weights, top_feats = _gather_cat(top_weights, 1), _gather_cat(top_feats, 1)
        top_weights, merged = _stable_topk(top_weights, min(k, top_weights.shape[1]))
        top_feats = top_feats.gather(1, merged[..., None].expand(-1, -1, dim))
    total = top_weights.sum(dim=1, keepdim=True)  # [K, 1]
    means = (top_weights[..., None] * top_feats).sum(dim=1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return F.normalize(means, dim=-1)


# -- the contrast ---------------------------------------------------------------------------------------------------
def pixel_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """float [B, D, h, w] -> L2-normalised float32 [B·h·w, D] (batch-major, the order of the flattened labels)."""
    dim = embeddings.shape[1]
    return F.normalize(embeddings.float().permute(0, 2, 3, 1).reshape(-1, dim), dim=-1)


def contrast(pixels: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over pixels of ``F(v; y; P, all) = -log softmax_y(v·P^T / τ)``.

    Args:
        pixels: float [N, D] normalised; prototypes: float [K, D]; targets: long [N] in 0..K-1.
    """
    return F.cross_entropy(pixels @ prototypes.T / tau, targets)


def _rank_within_class(keys: torch.Tensor, classes: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    # Rank (0-based) of every pixel among the pixels of its class in ascending ``keys``: sort by key, then stably
    # by class, so each class's run is in key order; subtract where the run starts.
    by_key = torch.argsort(keys, stable=True)
    order = by_key[torch.argsort(classes[by_key], stable=True)]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device) - starts[classes[order]]
    return ranks


def intra_view_loss(
    pixels: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    tau: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Intra-view contrast with semi-hard prototype mining and hard pixel sampling, mean over pseudo classes.

    Per pixel: ``-log(exp(s_y/τ) / (exp(s_y/τ) + Σ_{r=4..13} exp(s_(r)/τ)))``, ``s_(r)`` the r-th largest similarity
    to all prototypes (the positive included in the ranking, as the reference ranks them). Per class with ``n >= 2``
    pixels: the mean over ``n // 2`` random pixels plus the ``n // 2`` pixels ranked ``int(0.6n) - n//2 ..
    int(0.6n) - 1`` in ascending similarity to their own prototype (a pixel drawn twice counts twice). Classes with
    fewer than 2 pixels are left out of the mean. Vectorised: sorts and ``index_add``, no loop over classes.

    Args:
        pixels: float [N, D] normalised; prototypes: float [K, D]; targets: long [N] in 0..K-1.
        generator: for the random half (default: torch's global stream).

    Returns:
        Scalar float32 (0 with a graph when no class has 2 pixels).
    """
    num_pixels, num_protos = pixels.shape[0], prototypes.shape[0]
    sims = pixels @ prototypes.T  # [N, K]
    positive = sims.gather(1, targets[:, None])  # [N, 1]
    ranked = min(SKIP_MOST_SIMILAR + MINED_NEGATIVES, num_protos)
    with torch.no_grad():
        mined = sims.topk(ranked, dim=1).indices[:, SKIP_MOST_SIMILAR:]  # [N, <= 10]
    logits = torch.cat([positive, sims.gather(1, mined)], dim=1) / tau
    per_pixel = -F.log_softmax(logits, dim=1)[:, 0]  # [N]

    with torch.no_grad():
        counts = torch.bincount(targets, minlength=num_protos)
        starts = torch.cumsum(counts, 0) - counts
        size = counts[targets]  # class size of every pixel
        half, band_end = size // 2, (size * 6) // 10  # int(0.6 n) for integer n
        by_similarity = _rank_within_class(positive[:, 0], targets, starts)
        noise_device = generator.device if generator is not None else pixels.device
        noise = torch.rand(num_pixels, generator=generator, device=noise_device).to(pixels.device)
        at_random = _rank_within_class(noise, targets, starts)
        picks = (at_random < half).float() + ((by_similarity >= band_end - half) & (by_similarity < band_end)).float()
        picks = picks * (size >= 2)
        picked = torch.zeros(num_protos, device=pixels.device).index_add_(0, targets, picks)
    sums = torch.zeros(num_protos, device=pixels.device).index_add(0, targets, per_pixel * picks)
    used = picked > 0
    if not bool(used.any()):
        return per_pixel.sum() * 0.0
    return (sums[used] / picked[used]).mean()


def ppc_loss(
    emb1: torch.Tensor,
    emb2: torch.Tensor,
    cams1: torch.Tensor,
    cams2: torch.Tensor,
    labels: torch.Tensor,
    *,
    bg_score: float,
    topk_fraction: float,
    tau: float = 0.1,
    weights: tuple[float, float, float] = (0.1, 0.1, 0.1),
    generator: torch.Generator | None = None,
    bg_prototype: str = "constant",
    prototype_images: str = "all",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPC's ``L_nce = w_cp L_cp + w_cc L_cc + w_intra L_intra`` of two views (see the module docstring).

    Args:
        emb1, emb2: raw projected features float [B, D, h1, w1] and [B, D, h2, w2] of views 1 and 2 (view 1 is
            resized here to view 2's grid, bilinear with ``align_corners=True``, when the sizes differ).
        cams1, cams2: CAMs of the two views (PCM-refined where the method has a PCM), float [B, 1 + C, h, w] with the
            BACKGROUND CHANNEL FIRST (its values are replaced by ``bg_score``, so methods without a background map
            may pass zeros there), each at its view's embedding size.
        labels: float [B, C] multi-hot.
        bg_score: θ, the constant background score (0.20 SEAM branch, 0.10 EPS branch).
        topk_fraction: prototype top-k per channel as a fraction of view 2's ``h2·w2`` (1/8; EPS branch 1/16).
        tau: temperature.
        weights: (w_cp, w_cc, w_intra).
        generator: random stream of the hard pixel sampling (default: torch's global one).
        bg_prototype: the background prototype's weights (:func:`prototype_weights`).
        prototype_images: ``all`` (the reference) or ``labelled``: class prototypes from the labelled images only.

    Returns:
        (scalar float32 loss with graphs into both embeddings only -- CAMs and prototypes carry no gradient --,
        detached terms ``{"ppc_cp", "ppc_cc", "ppc_intra"}`` before weighting).
    """
    if emb1.shape[0] != emb2.shape[0] or cams1.shape[:2] != cams2.shape[:2]:
        raise ValueError(f"views disagree: embeddings {emb1.shape} / {emb2.shape}, CAMs {cams1.shape} / {cams2.shape}")
    if prototype_images not in PROTOTYPE_IMAGES:
        raise ValueError(f"unknown prototype images {prototype_images!r}; choose from {', '.join(PROTOTYPE_IMAGES)}")
    if cams2.shape[2:] != emb2.shape[2:]:
        raise ValueError(f"view 2's CAMs {tuple(cams2.shape)} and embeddings {tuple(emb2.shape)} differ in size")
    with torch.autocast(device_type=emb2.device.type, enabled=False):  # similarities / τ need fp32
        embeddings = (emb1.float(), emb2.float())
        return _ppc_loss(
            *embeddings,
            cams1,
            cams2,
            labels,
            bg_score,
            topk_fraction,
            tau,
            weights,
            generator,
            bg_prototype,
            prototype_images == "labelled",
        )


def _ppc_loss(
    emb1: torch.Tensor,
    emb2: torch.Tensor,
    cams1: torch.Tensor,
    cams2: torch.Tensor,
    labels: torch.Tensor,
    bg_score: float,
    topk_fraction: float,
    tau: float,
    weights: tuple[float, float, float],
    generator: torch.Generator | None,
    bg_prototype: str,
    labelled_only: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    size = emb2.shape[2:]
    if emb1.shape[2:] != size:
        emb1 = F.interpolate(emb1, size=size, mode="bilinear", align_corners=True)
    if cams1.shape[2:] != size:
        cams1 = F.interpolate(cams1.detach().float(), size=size, mode="bilinear", align_corners=True)
    scores1, scores2 = normalized_scores(cams1, bg_score), normalized_scores(cams2, bg_score)
    labels = labels.float()
    y1, y2 = pseudo_labels(scores1, labels).reshape(-1), pseudo_labels(scores2, labels).reshape(-1)
    mask = labels if labelled_only else None
    protos1 = batch_prototypes(emb1, prototype_weights(scores1, bg_prototype, mask), topk_fraction)
    protos2 = batch_prototypes(emb2, prototype_weights(scores2, bg_prototype, mask), topk_fraction)
    v1, v2 = pixel_embeddings(emb1), pixel_embeddings(emb2)

    cross_proto = (contrast(v1, protos2, y1, tau) + contrast(v2, protos1, y2, tau)) / 2
    cross_cam = (contrast(v1, protos1, y2, tau) + contrast(v2, protos2, y1, tau)) / 2
    intra = (intra_view_loss(v1, protos1, y1, tau, generator) + intra_view_loss(v2, protos2, y2, tau, generator)) / 2
    w_cp, w_cc, w_intra = weights
    loss = w_cp * cross_proto + w_cc * cross_cam + w_intra * intra
    terms = dict(zip(TERMS, (cross_proto.detach(), cross_cam.detach(), intra.detach()), strict=True))
    return loss, terms


# -- wiring into a method's step ------------------------------------------------------------------------------------
def second_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """PPC's second view: the batch float [B, 3, H, W] resized bilinearly to a fixed ``size x size``."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)


def background_first(maps: torch.Tensor, background_last: bool = False) -> torch.Tensor:
    """Maps in :func:`ppc_loss`'s layout [B, 1 + C, h, w]: EPS's last channel moved first (``background_last``), or a
    zero background slot in front of the C class maps of a method without one (PPC replaces it by θ anyway)."""
    if background_last:
        return torch.cat([maps[:, -1:], maps[:, :-1]], dim=1)
    return torch.cat([torch.zeros_like(maps[:, :1]), maps], dim=1)


def config_kwargs(config: PPCConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`ppc_loss` from a :class:`PPCConfig`."""
    return {
        "bg_score": config.bg_score,
        "topk_fraction": config.topk_fraction,
        "tau": config.tau,
        "weights": config.weights,
        "bg_prototype": config.bg_prototype,
        "prototype_images": config.prototype_images,
    }


def generator_ppc_term(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    config: PPCConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPC for a CAM generator without a background map (vanilla, Puzzle, OC-CSE, P-OC, P-NOC).

    Runs the second view through ``model`` (a :class:`PPCClassifier`, DDP-wrapped or not) and contrasts it with the
    first; the method's own terms stay on view 1.

    Args:
        images: float [B, 3, H, W], view 1; maps: its raw class maps float [B, C, h, w]; embeddings: its raw
            projected features float [B, dim, h, w]; labels: float [B, C] multi-hot.
    """
    _, maps2, embeddings2 = model(second_view(images, config.view_size), with_cam=True, with_embedding=True)
    return ppc_loss(
        embeddings, embeddings2, background_first(maps), background_first(maps2), labels, **config_kwargs(config)
    )
