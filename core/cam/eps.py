"""EPS (CVPR 2021; METHODS §5, §16.9/18): explicit pseudo-pixel supervision of the CAMs by a saliency map.

The classifier has C + 1 output maps, the BACKGROUND LAST; logits are the spatial means of the first C. With
``s = softmax_{C+1}(A)`` and the saliency ``S`` resized to the map size (nearest), every present class ``c`` is split
by its overlap with the saliency, computed on detached, rounded maps:
``o_c = Σ round(s_c)·round(S) / (Σ round(s_c) + 1e-4·h·w)``. Classes with ``o_c > τ`` form the foreground set F; the
others join the background channel in B. Then ``M_fg = Σ_{c∈F} s_c``, ``M_bg = Σ_{c∈B} s_c``,
``Ŝ = λ M_fg + (1 - λ)(1 - M_bg)`` and ``L_sal = MSE(Ŝ, S)``; ``L = L_cls + L_sal`` (τ 0.4, λ 0.5).

Inference keeps the foreground channels of the softmax (times the labels, by the key selection of the CAM stage);
the learned background channel is not used: :class:`EPSClassifier`'s ``forward(x, with_cam=True)`` returns exactly
those C maps, so the CAM stage's inference and validation read an EPS checkpoint like any other (it is recognised by
its ``background_index`` entry, see :func:`is_eps_state_dict`).

Saliency: ``<sal_dir>/<id>.png``, single-channel 8-bit (255 = salient) as the saliency stages write them
(:func:`core.artifacts.load_saliency`), or label PNGs with ``--sal_mode segmentation``. It is cropped and flipped with
the image; pixels the crop pads are left out of ``L_sal`` (the reference counts them as background saliency).

With ``--ppc true`` (the PPC ``esp`` branch, METHODS §6): a second view resized to 128x128 runs through the network
too; ``L_cls`` and ``L_sal`` are averaged over the two views and PPC's ``L_nce`` (θ 0.10, k = hw/16) is added.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import artifacts
from core.cam import ppc
from core.cli import add_arg, unit_float
from core.datasets import ClassificationDataset, DataSource
from core.datasets.torch_datasets import Transform
from core.engine import StepFn, TrainContext
from core.errors import WSSSError, first_ids

OVERLAP_EPS = 1e-4  # x h·w in the overlap's denominator (METHODS §16.9)
PAD = 255  # saliency value marking the pixels a crop padded (real saliency is quantised to 0..254)
SAL_LEVELS = 254
MARKER_KEY = "background_index"


def add_eps_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """EPS flags: the saliency folder and how to read it, the overlap threshold τ and the blend weight λ."""
    group = parser.add_argument_group("EPS saliency supervision")
    add_arg(
        group,
        "--sal_dir",
        type=str,
        default=None,
        help="REQUIRED: folder of saliency PNGs <id>.png, 8-bit grey with 255 = salient (e.g. the output of "
        "scripts/ccam/inference_crf.py or the PoolNet stage)",
    )
    add_arg(
        group,
        "--sal_mode",
        type=str,
        default="saliency",
        choices=artifacts.SALIENCY_KINDS,
        help="saliency: grey maps read as value/255; segmentation: label PNGs, 1 on classes 1..254",
    )
    add_arg(
        group, "--eps_tau", "--tau", type=unit_float, default=0.4, help="overlap threshold τ (runner 0.4; alias --tau)"
    )
    add_arg(
        group, "--eps_lambda", "--lam", type=unit_float, default=0.5, help="λ of λ·M_fg + (1-λ)(1-M_bg) (alias --lam)"
    )
    return group


# -- network --------------------------------------------------------------------------------------------------------
class EPSClassifier(ppc.PPCClassifier):
    """The CAM classifier with C + 1 maps, the background last (optionally with PPC's projection head).

    State-dict keys: :class:`~core.models.Classifier`'s with ``classifier.weight`` ``[C + 1, D, 1, 1]``, the buffer
    ``background_index`` (= C, marks the layout) and, with PPC, ``projection.conv.weight``.

    Args:
        ppc_dim: embedding channels of the projection head, or None (default) for none.
        architecture, num_classes (C, foreground only), **kwargs: as :class:`~core.models.Classifier`.
    """

    def __init__(self, architecture: str, num_classes: int = 20, *, ppc_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(architecture, num_classes, ppc_dim=ppc_dim, **kwargs)
        self.classifier = nn.Conv2d(self.backbone.out_channels, self.num_classes + 1, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight)
        self.register_buffer(MARKER_KEY, torch.tensor(self.num_classes))
        self.model_kwargs["background"] = "last"

    def class_logits(self, maps: torch.Tensor) -> torch.Tensor:
        return maps[:, : self.num_classes].mean(dim=(2, 3))

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, with_cam: bool = False, with_embedding: bool = False, raw: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Classify a batch.

        Returns:
            logits float [B, C]; with ``with_cam``: (logits, maps), maps = the foreground channels of the softmax over
            C + 1, float32 [B, C, h, w] in [0, 1] (EPS's CAMs), or with ``raw`` the raw maps [B, C + 1, h, w];
            with ``with_embedding``: (logits, raw maps, embeddings [B, dim, h, w]).
        """
        if with_embedding:
            return super().forward(x, with_embedding=True)
        maps = self.classifier(self.backbone(x)[-1])
        logits = self.class_logits(maps)
        if not with_cam:
            return logits
        return logits, maps if raw else foreground_probabilities(maps)


def foreground_probabilities(maps: torch.Tensor) -> torch.Tensor:
    """EPS's CAMs: ``softmax_{C+1}(maps)`` without the last (background) channel, float32 [B, C, h, w] in [0, 1]."""
    return torch.softmax(maps.float(), dim=1)[:, :-1]


def is_eps_state_dict(state_dict: dict[str, Any]) -> bool:
    """Whether a (normalised) state dict holds an :class:`EPSClassifier` (its ``background_index`` entry)."""
    return MARKER_KEY in state_dict


# -- loss -----------------------------------------------------------------------------------------------------------
def resize_saliency(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of float [B, H, W] saliency (padding -1 included) to ``size``: float [B, *size]."""
    return F.interpolate(saliency[:, None].float(), size=size, mode="nearest")[:, 0]


@torch.no_grad()
def split_classes(
    probs: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """EPS's overlap rule: which present classes count as foreground (overlap with the saliency > τ).

    Args:
        probs: float [B, C + 1, h, w], softmax over the classes and the (last) background.
        saliency: float [B, h, w] in [0, 1] (padding, < 0, counts as not salient).
        labels: float [B, C] multi-hot.

    Returns:
        (foreground bool [B, C], background bool [B, C]): present classes with ``o_c > τ``, and the other present
        classes (the background channel always belongs to the background set as well).
    """
    height, width = probs.shape[2:]
    regions = torch.round(probs[:, :-1].float())  # [B, C, h, w]
    salient = torch.round(saliency.clamp(0, 1))[:, None]
    overlap = (regions * salient).sum(dim=(2, 3)) / (regions.sum(dim=(2, 3)) + OVERLAP_EPS * height * width)
    present = labels > 0.5
    foreground = present & (overlap > tau)
    return foreground, present & ~foreground


def eps_loss(
    maps: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = 0.4, lam: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_sal = MSE(λ M_fg + (1 - λ)(1 - M_bg), S)`` over the pixels the crop did not pad.

    Args:
        maps: raw maps float [B, C + 1, h, w], background last.
        saliency: float [B, H, W] in [0, 1], -1 on padding; resized here to (h, w) by nearest interpolation.
        labels: float [B, C] multi-hot.

    Returns:
        (scalar float32 loss, the predicted saliency ``Ŝ`` float32 [B, h, w]).
    """
    target = resize_saliency(saliency, tuple(maps.shape[2:]))
    probs = torch.softmax(maps.float(), dim=1)
    foreground, background = split_classes(probs, target, labels, tau)
    fg_map = (probs[:, :-1] * foreground[:, :, None, None]).sum(dim=1)
    bg_map = probs[:, -1] + (probs[:, :-1] * background[:, :, None, None]).sum(dim=1)
    predicted = lam * fg_map + (1 - lam) * (1 - bg_map)
    valid = (target >= 0).float()
    loss = ((predicted - target) ** 2 * valid).sum() / valid.sum().clamp_min(1.0)
    return loss, predicted


# -- data -----------------------------------------------------------------------------------------------------------
def saliency_path(sal_dir: str | Path, image_id: str) -> Path:
    return Path(sal_dir) / f"{image_id}{artifacts.PNG_SUFFIX}"


def check_saliency_dir(sal_dir: str | None, ids: list[str]) -> Path:
    """The ``--sal_dir`` folder, once every ``<id>.png`` of ``ids`` is known to exist (one-line WSSSError otherwise)."""
    hint = "make saliency maps first (scripts/ccam/inference_crf.py, or the PoolNet stage) and pass their folder"
    if not sal_dir:
        raise WSSSError(f"--sal_dir is required: EPS regresses a saliency map per image; {hint}")
    folder = Path(sal_dir).expanduser()
    if not folder.is_dir():
        raise WSSSError(f"--sal_dir {folder} does not exist; {hint}")
    missing = [i for i in ids if not saliency_path(folder, i).is_file()]
    if missing:
        raise WSSSError(
            f"{len(missing)} of {len(ids)} saliency maps missing in --sal_dir {folder} "
            f"(first: {first_ids(missing)}); make them for this --domain_train or pick the matching folder"
        )
    return folder


class SaliencyDataset(ClassificationDataset):
    """:class:`~core.datasets.ClassificationDataset` items plus ``saliency`` float32 [h, w] in [0, 1] (-1 = padding).

    The saliency is quantised to 255 levels so that the joint transform (nearest resize, flip, crop) can mark the
    padding with 255, as it marks an ignored mask pixel.

    Args:
        transform: a joint transform, e.g. :func:`core.datasets.transforms.build_segmentation_transform`.
        sal_dir: the saliency folder; sal_mode: see :func:`core.artifacts.load_saliency`.
    """

    def __init__(self, source: DataSource, transform: Transform, sal_dir: str | Path, sal_mode: str = "saliency"):
        super().__init__(source, transform)
        self.sal_dir = check_saliency_dir(str(sal_dir), self.ids)
        self.sal_mode = sal_mode

    def load(self, image_id: str) -> dict[str, Any]:
        image = self.source.read_image(image_id)
        path = saliency_path(self.sal_dir, image_id)
        saliency = artifacts.load_saliency(path, self.sal_mode)
        if saliency.shape != image.shape[:2]:
            raise WSSSError(
                f"saliency map {path} is {saliency.shape[1]}x{saliency.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}; the folder belongs to other images"
            )
        levels = np.rint(saliency * SAL_LEVELS).astype(np.uint8)
        image, levels = self.transform(image, levels)
        target = np.where(levels == PAD, -1.0, levels / SAL_LEVELS).astype(np.float32)
        return {
            "id": image_id,
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(self.labels[image_id].copy()),
            "saliency": torch.from_numpy(target),
        }


# -- step -----------------------------------------------------------------------------------------------------------
def eps_step(
    ctx: TrainContext,
    batch: dict[str, Any],
    step: int,
    class_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tau: float,
    lam: float,
    ppc_config: ppc.PPCConfig | None,
) -> dict[str, float]:
    """One EPS update of ``cg``: ``L_cls + L_sal`` (both averaged over the two views with PPC, plus ``L_nce``)."""
    images, labels = ctx.to_device(batch["image"]), ctx.to_device(batch["label"]).float()
    saliency = ctx.to_device(batch["saliency"])
    cg = ctx.models["cg"]
    scalars: dict[str, torch.Tensor] = {}
    with ctx.autocast():
        if ppc_config is None:
            logits, maps = cg(images, with_cam=True, raw=True)
            c_loss = class_loss(logits, labels)
            s_loss, _ = eps_loss(maps, saliency, labels, tau, lam)
            loss = c_loss + s_loss
        else:
            logits, maps, embeddings = cg(images, with_cam=True, with_embedding=True)
            view2 = ppc.second_view(images, ppc_config.view_size)
            logits2, maps2, embeddings2 = cg(view2, with_cam=True, with_embedding=True)
            saliency2 = resize_saliency(saliency, view2.shape[2:])
            c_loss = (class_loss(logits, labels) + class_loss(logits2, labels)) / 2
            s_loss = (
                eps_loss(maps, saliency, labels, tau, lam)[0] + eps_loss(maps2, saliency2, labels, tau, lam)[0]
            ) / 2
            n_loss, terms = ppc.ppc_loss(
                embeddings,
                embeddings2,
                ppc.background_first(maps, background_last=True),
                ppc.background_first(maps2, background_last=True),
                labels,
                **ppc.config_kwargs(ppc_config),
            )
            loss = c_loss + s_loss + n_loss
            scalars |= {"ppc_loss": n_loss.detach(), **terms}
    ctx.update("cg", loss)
    values = {"loss": loss.detach(), "c_loss": c_loss.detach(), "sal_loss": s_loss.detach(), **scalars}
    read = torch.stack([v.float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, read, strict=True))


def build_eps_step(
    args: argparse.Namespace, class_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> StepFn:
    """The engine's step function of EPS from its flags (``--eps_tau``, ``--eps_lambda``, the PPC flags)."""
    config = ppc.PPCConfig.from_args(args)
    return functools.partial(
        eps_step, class_loss=class_loss, tau=float(args.eps_tau), lam=float(args.eps_lambda), ppc_config=config
    )
