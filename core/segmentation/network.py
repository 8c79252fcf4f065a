"""DeepLabV3+ (SPEC §2.7): a CAM-stage backbone, ASPP with image pooling on its last features, and a decoder that
fuses the ASPP output with the layer1 features (stride 4) before the per-pixel classifier.

State-dict keys are the reference's, so its checkpoints load (every layout of SPEC §2.4, through
:func:`core.models.load_classifier_weights`): ``backbone.<native key>``, ``aspp.aspp{1..4}.{atrous_conv,bn}.*``,
``aspp.global_avg_pool.{1,2}.*``, ``aspp.{conv1,bn1}.*``, ``decoder.{conv1,bn1}.*`` and
``decoder.classifier.{0,1,4,5,8}.*`` (the last one the K-class 1x1 convolution with bias).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import WSSSError
from core.models import build_backbone, group_parameters
from core.models.backbones import VIT_ARCHITECTURES
from core.models.initialization import DEFAULT_SCRATCH_INIT

logger = logging.getLogger(__name__)

#: ASPP dilation rates of the three 3x3 branches at each output stride (the 1x1 branch has rate 1).
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48
GROUP_NORM_GROUPS = 4
#: The class head's tensors: the only keys whose shapes depend on the class count.
CLASS_HEAD_KEYS = ("decoder.classifier.8.weight", "decoder.classifier.8.bias")


def head_norm(use_gn: bool) -> type[nn.Module] | Any:
    """The head's normalisation: ``GroupNorm(4, ch)`` with ``use_gn``, else ``BatchNorm2d(ch)``."""
    if use_gn:
        return lambda channels: nn.GroupNorm(GROUP_NORM_GROUPS, channels)
    return nn.BatchNorm2d


def _init_head(module: nn.Module) -> None:
    # The reference's init of its scratch layers: Kaiming-normal convolutions, unit-scale norms.
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight)
        elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class ASPPBranch(nn.Module):
    """One atrous branch: conv (1x1 at rate 1, else 3x3 dilated) -> norm -> ReLU (keys ``atrous_conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, rate: int, norm: Any) -> None:
        super().__init__()
        kernel, padding = (1, 0) if rate == 1 else (3, rate)
        self.atrous_conv = nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=rate, bias=False)
        self.bn = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: four branches and image pooling, concatenated (1280) -> 1x1 conv 256.

    Args:
        in_channels: channels of the backbone's last features.
        output_stride: 16 (rates 6/12/18) or 8 (rates 12/24/36).
        norm: normalisation constructor ``norm(channels)``.
    """

    def __init__(self, in_channels: int, output_stride: int, norm: Any) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise WSSSError(f"DeepLabV3+ supports output stride 16 or 8, not {output_stride}")
        self.rates = (1, *ASPP_RATES[output_stride])
        for index, rate in enumerate(self.rates, start=1):
            setattr(self, f"aspp{index}", ASPPBranch(in_channels, ASPP_CHANNELS, rate, norm))
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, ASPP_CHANNELS, 1, bias=False),
            norm(ASPP_CHANNELS),
            nn.ReLU(inplace=True),
        )
        self.conv1 = nn.Conv2d(ASPP_CHANNELS * 5, ASPP_CHANNELS, 1, bias=False)
        self.bn1 = norm(ASPP_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, D, h, w] -> float [B, 256, h, w]."""
        branches = [getattr(self, f"aspp{i}")(x) for i in range(1, 5)]
        pooled = F.interpolate(self.global_avg_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=True)
        x = torch.cat([*branches, pooled], dim=1)
        return self.dropout(self.relu(self.bn1(self.conv1(x))))


class Decoder(nn.Module):
    """Low-level 1x1 conv to 48 channels, concatenated with the upsampled ASPP output, two 3x3 convs, K logits."""

    def __init__(self, num_classes: int, low_level_channels: int, norm: Any) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_channels, LOW_LEVEL_CHANNELS, 1, bias=False)
        self.bn1 = norm(LOW_LEVEL_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Sequential(
            nn.Conv2d(ASPP_CHANNELS + LOW_LEVEL_CHANNELS, 256, 3, padding=1, bias=False),
            norm(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            norm(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(256, num_classes, 1),
        )

    def forward(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        """ASPP output [B, 256, h, w] and layer1 features [B, D1, H/4, W/4] -> logits [B, K, H/4, W/4]."""
        low_level = self.relu(self.bn1(self.conv1(low_level)))
        x = F.interpolate(x, size=low_level.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(torch.cat([x, low_level], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ semantic segmentation network over a ResNet/ResNeSt backbone of the CAM stage.

    Args:
        architecture: a ResNet-family key of ``core.models.BACKBONES`` (ViTs have no stride-4 features: refused).
        num_classes: K, the classes of the label maps including the background (21 for VOC, 81 for COCO).
        backbone_weights: ``"none"``, ``"imagenet"`` or a ``.pth`` path (see ``build_backbone``).
        mode: ``"normal"`` (trainable backbone BN) or ``"fix"`` (frozen backbone BN; the head's norms still train).
        dilated: output stride 8 (ASPP rates 12/24/36) instead of 16 (6/12/18).
        use_gn: GroupNorm (4 groups) in ASPP and decoder instead of BatchNorm.
        scratch_init: initialisation of a random backbone.

    Attributes:
        model_kwargs: the arguments that rebuild the network before loading a checkpoint.
        output_stride: 16 or 8.
    """

    class_head_keys = CLASS_HEAD_KEYS

    def __init__(
        self,
        architecture: str,
        num_classes: int = 21,
        *,
        backbone_weights: str | os.PathLike | None = "none",
        mode: str = "normal",
        dilated: bool = False,
        use_gn: bool = True,
        scratch_init: str = DEFAULT_SCRATCH_INIT,
    ) -> None:
        super().__init__()
        if architecture in VIT_ARCHITECTURES:
            raise WSSSError(
                f"--architecture {architecture}: DeepLabV3+ needs a backbone with stride-4 features for its decoder; "
                "choose a ResNet or ResNeSt"
            )
        if int(num_classes) < 2:
            raise WSSSError(f"DeepLabV3+ needs at least 2 classes (background and one class), got {num_classes}")
        self.model_kwargs: dict[str, Any] = {
            "architecture": architecture,
            "num_classes": int(num_classes),
            "backbone_weights": "none",
            "mode": mode,
            "dilated": bool(dilated),
            "use_gn": bool(use_gn),
        }
        self.num_classes = int(num_classes)
        self.backbone = build_backbone(
            architecture, weights=backbone_weights, dilated=dilated, mode=mode, scratch_init=scratch_init
        )
        self.output_stride = self.backbone.output_stride
        norm = head_norm(use_gn)
        self.aspp = ASPP(self.backbone.out_channels, self.output_stride, norm)
        self.decoder = Decoder(self.num_classes, self.backbone.stage_channels[1], norm)
        _init_head(self.aspp)
        _init_head(self.decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits.

        Args:
            x: float [B, 3, H, W], normalised image (contiguous or channels_last).

        Returns:
            float [B, K, H, W], unbounded logits (bilinearly upsampled from stride 4, align_corners=True).
        """
        _, low_level, _, _, features = self.backbone(x)
        logits = self.decoder(self.aspp(features), low_level)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by LR group: backbone = pretrained (x1), ASPP + decoder = scratch (x10)."""
        return group_parameters(pretrained=[self.backbone], scratch=[self.aspp, self.decoder])
