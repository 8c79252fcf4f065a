"""The CAM classifier: a backbone followed by a bias-free 1x1 convolution giving one activation map per class."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from core.errors import WSSSError
from core.models.backbones import HiddenMix, build_backbone, group_parameters
from core.models.initialization import DEFAULT_SCRATCH_INIT

logger = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Multi-label classifier whose logits are the spatial means of its class activation maps (SPEC §2.3).

    State-dict keys: ``backbone.<native torchvision/ResNeSt key>`` and ``classifier.weight`` ``[C, D, 1, 1]``.

    Args:
        architecture: a key of ``core.models.BACKBONES``, e.g. ``resnest269``.
        num_classes: number of foreground classes C (20 for VOC, 80 for COCO).
        backbone_weights: ``"none"``, ``"imagenet"`` or a ``.pth`` path (see ``build_backbone``).
        mode: ``"normal"`` (trainable BN) or ``"fix"`` (frozen BN).
        dilated: output stride 8 instead of 16.
        trainable_stem: False freezes conv1/bn1.
        trainable_backbone: False freezes the whole backbone.
        scratch_init: initialisation of a random backbone (``backbone_weights="none"``; see ``build_backbone``):
            ``"torchvision"`` (default) or ``"pytorch"`` (as the reference). The head is Kaiming-normal (fan_in)
            either way, as in the reference.

    Attributes:
        model_kwargs: the constructor arguments needed to rebuild this network before loading its checkpoint
            (``backbone_weights`` is recorded as ``"none"`` since the checkpoint supplies every weight).
    """

    def __init__(
        self,
        architecture: str,
        num_classes: int = 20,
        *,
        backbone_weights: str | os.PathLike | None = "none",
        mode: str = "normal",
        dilated: bool = False,
        trainable_stem: bool = True,
        trainable_backbone: bool = True,
        scratch_init: str = DEFAULT_SCRATCH_INIT,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise WSSSError(f"--num_classes must be at least 1, got {num_classes}")
        self.model_kwargs: dict[str, Any] = {
            "architecture": architecture,
            "num_classes": int(num_classes),
            "backbone_weights": "none",
            "mode": mode,
            "dilated": bool(dilated),
            "trainable_stem": bool(trainable_stem),
            "trainable_backbone": bool(trainable_backbone),
        }
        self.backbone = build_backbone(
            architecture,
            weights=backbone_weights,
            dilated=dilated,
            mode=mode,
            trainable_stem=trainable_stem,
            trainable_backbone=trainable_backbone,
            scratch_init=scratch_init,
        )
        self.classifier = nn.Conv2d(self.backbone.out_channels, int(num_classes), kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight)
        self.num_classes = int(num_classes)

    def forward(
        self, x: torch.Tensor, with_cam: bool = False, hidden_mix: HiddenMix | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Classify a batch.

        Args:
            x: float [B, 3, H, W], normalised image (contiguous or channels_last).
            with_cam: also return the raw class activation maps.
            hidden_mix: Manifold Mixup's hook on the backbone's hidden states (see ``Backbone.forward``); passed
                through the call so that a DDP-wrapped classifier mixes inside its own forward.

        Returns:
            logits float [B, C] (unbounded), or (logits, cams) with cams float [B, C, h, w] raw (unbounded, not
            ReLU'd or normalised), h = ceil(H / output_stride).
        """
        features = self.backbone(x, hidden_mix)[-1]
        cams = self.classifier(features)
        # Mean of the maps equals the conv of the pooled features (linear, bias-free head), so one path serves both.
        logits = cams.mean(dim=(2, 3))
        if with_cam:
            return logits, cams
        return logits

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by LR group: backbone = pretrained, ``classifier`` = scratch (see group_parameters)."""
        return group_parameters(pretrained=[self.backbone], scratch=[self.classifier])
