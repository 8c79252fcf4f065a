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
        # Only the ResNet backbones take the hook; a ViT (an SC-CAM teacher) is called without it.
        features = (self.backbone(x) if hidden_mix is None else self.backbone(x, hidden_mix))[-1]
        cams = self.classifier(features)
        # Mean of the maps equals the conv of the pooled features (linear, bias-free head), so one path serves both.
        logits = cams.mean(dim=(2, 3))
        if with_cam:
            return logits, cams
        return logits

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by LR group: backbone = pretrained, ``classifier`` = scratch (see group_parameters)."""
        return group_parameters(pretrained=[self.backbone], scratch=[self.classifier])


class SubcategoryClassifier(Classifier):
    """SC-CAM's classifier: the CAM classifier plus a bias-free 1x1 sub-category head on the same features.

    State-dict keys: :class:`Classifier`'s plus ``sub_classifier.weight`` ``[S, D, 1, 1]``. The sub-category head
    only trains (the CAMs come from ``classifier``), so :func:`core.models.load_classifier_weights` drops it when
    a plain :class:`Classifier` loads these weights (CAM inference, ``--restore``).

    Args:
        num_subclasses: S, the number of sub-categories over all parent classes.
        architecture, num_classes, **kwargs: as :class:`Classifier`.
    """

    def __init__(self, architecture: str, num_classes: int = 20, *, num_subclasses: int, **kwargs: Any) -> None:
        super().__init__(architecture, num_classes, **kwargs)
        if int(num_subclasses) < 1:
            raise WSSSError(f"the sub-category head needs at least 1 sub-class, got {num_subclasses}")
        self.model_kwargs["num_subclasses"] = int(num_subclasses)
        self.sub_classifier = nn.Conv2d(self.backbone.out_channels, int(num_subclasses), kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.sub_classifier.weight)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, with_cam: bool = False, with_sub: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """As :meth:`Classifier.forward`; ``with_sub`` also returns the sub-category logits float [B, S].

        Returns:
            logits; (logits, cams) with ``with_cam``; (logits, sub_logits) with ``with_sub``;
            (logits, sub_logits, cams) with both.
        """
        if not with_sub:
            return super().forward(x, with_cam)
        features = self.backbone(x)[-1]
        cams = self.classifier(features)
        sub_logits = self.sub_classifier(features).mean(dim=(2, 3))
        logits = cams.mean(dim=(2, 3))
        return (logits, sub_logits, cams) if with_cam else (logits, sub_logits)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """As :meth:`Classifier.param_groups`, with the sub-category head among the scratch parameters."""
        return group_parameters(pretrained=[self.backbone], scratch=[self.classifier, self.sub_classifier])
