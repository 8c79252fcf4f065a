"""The PoolNet network (SPEC §2.8): a frozen-BN ResNet, pyramid pooling, feature aggregation and a score layer.

Structure (widths of the ResNet-50 reference; the backbone's own widths come from ``Backbone.stage_channels``, so
any backbone of ``core.models.BACKBONES`` works, e.g. resnet18 in tests)::

    image -> ResNet (BN frozen: running statistics, no affine updates; layer4 dilated, output stride 16)
          -> c0 (stem conv, stride 2), c1..c4 (layer1..layer4, strides 4, 8, 16, 16)
    c4 -> 1x1 conv 512 -> [itself, adaptive avg pools 1/3/5 -> 1x1 conv -> ReLU, upsampled] -> concat -> 3x3 -> 512
       -> "infos": 3x3 convs to 512/256/256/128, resized to the sizes of c3, c2, c1, c0 (global guidance)
    c0..c4 -> "convert" 1x1 convs to 128/256/256/512/512 channels
    DeepPool (x4..x0): x + sum of [avg pool 2/4/8 -> 3x3 conv -> upsample], ReLU, resize to the next level,
                       3x3 conv, then fuse: 3x3 conv of (x + next level + info); the last one does not fuse
    score: 1x1 conv -> 1 channel, bilinear to the input size -> saliency logits

The network normalises its own input (RGB floats in 0..255): ImageNet mean/std for torchvision/ResNeSt weights, or
BGR minus the Caffe mean for the reference's Caffe ResNet-50 (:mod:`poolnet.caffe`). Which one is a buffer of the
state dict (``input_style``), so a checkpoint always tests with the normalisation it was trained with.

Deviations from the reference, all neutral at the reference's sizes: a DeepPool window larger than its feature map
shrinks to the map (the reference crashes for inputs under ~128 px); the first block of the dilated layer4 keeps
dilation 1 (``core.models`` backbones); head convs are initialised N(0, 0.01) as in the reference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from core.errors import WSSSError
from core.models import build_backbone, describe_state_dict, group_parameters, read_checkpoint
from core.models.compat import compare_state_dicts, normalize_state_dict_keys
from poolnet import caffe

logger = logging.getLogger(__name__)

INPUT_STYLES = ("torchvision", "caffe")
PPM_POOLS = (1, 3, 5)
DEEP_POOLS = (2, 4, 8)
PPM_WIDTH = 512
CONVERT_WIDTHS = (128, 256, 256, 512, 512)  # c0..c4
INFO_WIDTHS = (512, 256, 256, 128)  # guidance for the levels of c3, c2, c1, c0
# (in, out, fuse) of the five DeepPool layers, deepest first: the reference's ResNet configuration.
DEEP_POOL_LAYERS = ((512, 512, True), (512, 256, True), (256, 256, True), (256, 128, True), (128, 128, False))
SCORE_WIDTH = 128


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def scaled(width: int, scale: float) -> int:
    """A head width times ``--head_scale`` (at least 8 channels)."""
    return max(8, round(width * scale))


class PyramidPooling(nn.Module):
    """Global guidance: pyramid pooling on the deepest features, then one map per decoder level."""

    def __init__(self, in_channels: int, scale: float = 1.0) -> None:
        super().__init__()
        width = scaled(PPM_WIDTH, scale)
        self.reduce = _conv(in_channels, width, 1)
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), _conv(width, width, 1), nn.ReLU(inplace=True))
            for size in PPM_POOLS
        )
        self.fuse = nn.Sequential(_conv(width * (len(PPM_POOLS) + 1), width, 3), nn.ReLU(inplace=True))
        self.infos = nn.ModuleList(
            nn.Sequential(_conv(width, scaled(out, scale), 3), nn.ReLU(inplace=True)) for out in INFO_WIDTHS
        )

    def forward(self, deepest: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``deepest`` [B, C4, h, w]; ``sizes``: the (h, w) of each decoder level (c3, c2, c1, c0) -> info maps."""
        x = self.reduce(deepest)
        pooled = [x] + [_resize(pool(x), x.shape[-2:]) for pool in self.pools]
        x = self.fuse(torch.cat(pooled, dim=1))
        return [info(_resize(x, size)) for info, size in zip(self.infos, sizes, strict=True)]


def _avg_pool(x: torch.Tensor, window: int) -> torch.Tensor:
    # A window larger than the map shrinks to it (a global average) instead of failing on small images.
    kernel = (min(window, x.shape[-2]), min(window, x.shape[-1]))
    return F.avg_pool2d(x, kernel, stride=kernel)


class DeepPool(nn.Module):
    """Feature aggregation: multi-scale average pooling, then (optionally) fusion with the next level and guidance."""

    def __init__(self, in_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv(in_channels, in_channels, 3) for _ in DEEP_POOLS)
        self.conv_sum = _conv(in_channels, out_channels, 3)
        self.conv_fuse = _conv(out_channels, out_channels, 3) if fuse else None

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, info: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = x
        for window, conv in zip(DEEP_POOLS, self.convs, strict=True):
            out = out + _resize(conv(_avg_pool(x, window)), x.shape[-2:])
        out = F.relu(out)
        if self.conv_fuse is None:
            return self.conv_sum(out)
        out = self.conv_sum(_resize(out, skip.shape[-2:]))
        return self.conv_fuse(out + skip + info)


class PoolNet(nn.Module):
    """Saliency network: ``forward(images)`` -> logits [B, 1, H, W] at the input size.

    Args:
        architecture: a key of ``core.models.BACKBONES`` (the reference: ``resnet50``).
        backbone_weights: ``"imagenet"``, ``"none"`` or a ``.pth`` path: a torchvision/ResNeSt state dict, or the
            reference's Caffe ResNet-50 with ``input_style="caffe"``.
        input_style: ``"torchvision"`` (RGB, ImageNet mean/std) or ``"caffe"`` (BGR minus the Caffe mean, strides in
            the 1x1 convs); ``"auto"`` picks caffe for a weights file in Caffe naming or named ``*caffe*``.
        head_scale: multiplies every head width (1 = the reference's 512/256/128; 0.25 makes a CPU-sized head).

    Attributes:
        model_kwargs: what rebuilds the network before loading a checkpoint (weights ``"none"``).
    """

    def __init__(
        self,
        architecture: str = "resnet50",
        *,
        backbone_weights: str | os.PathLike = "none",
        input_style: str = "auto",
        head_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < head_scale <= 4:
            raise WSSSError(f"--head_scale must lie in (0, 4], got {head_scale}")
        style = resolve_input_style(input_style, backbone_weights)
        caffe_file = style == "caffe" and not _is_keyword(backbone_weights)
        self.backbone = build_backbone(
            architecture, weights="none" if caffe_file else backbone_weights, dilated=False, mode="fix"
        )
        if caffe_file:
            caffe.requires_bottleneck(self.backbone, str(backbone_weights))
            caffe.load_caffe_backbone(self.backbone, backbone_weights)
        widths = self.backbone.stage_channels  # (stem, layer1..layer4)
        self.ppm = PyramidPooling(widths[-1], head_scale)
        self.convert = nn.ModuleList(
            nn.Sequential(_conv(width, scaled(out, head_scale), 1), nn.ReLU(inplace=True))
            for width, out in zip(widths, CONVERT_WIDTHS, strict=True)
        )
        self.deep_pools = nn.ModuleList(
            DeepPool(scaled(i, head_scale), scaled(o, head_scale), fuse) for i, o, fuse in DEEP_POOL_LAYERS
        )
        self.score = nn.Conv2d(scaled(SCORE_WIDTH, head_scale), 1, 1)
        for module in (self.ppm, self.convert, self.deep_pools, self.score):
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    nn.init.normal_(layer.weight, 0.0, 0.01)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)
        self.register_buffer("input_style", torch.tensor(INPUT_STYLES.index(style), dtype=torch.int64))
        # Constants of the style, moved with the network but not saved (the style buffer decides them).
        self.register_buffer("_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.apply_input_style())
        self.apply_input_style()
        self.model_kwargs: dict[str, Any] = {
            "architecture": architecture,
            "backbone_weights": "none",
            "head_scale": float(head_scale),
        }

    @property
    def style(self) -> str:
        """``"torchvision"`` or ``"caffe"``: the input normalisation and stride layout in use."""
        return INPUT_STYLES[int(self.input_style)]

    def apply_input_style(self) -> None:
        """Set the stride layout and the normalisation constants of :attr:`style` (after a checkpoint is loaded)."""
        caffe.set_caffe_strides(self.backbone, self.style == "caffe")
        if self.style == "caffe":
            mean, std = torch.tensor(caffe.CAFFE_MEAN_BGR), torch.ones(3)
        else:
            mean, std = torch.from_numpy(IMAGENET_MEAN * 255.0), torch.from_numpy(IMAGENET_STD * 255.0)
        self._mean.copy_(mean.view(1, 3, 1, 1))
        self._std.copy_(std.view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB floats in 0..255 [B, 3, H, W] -> the backbone's input (BGR for the Caffe style)."""
        if self.style == "caffe":
            images = images.flip(1)
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """c0 (stem conv before the max pool, stride 2) and layer1..layer4 outputs of the backbone."""
        b = self.backbone
        c0 = b.relu(b.bn1(b.conv1(x)))
        c1 = b.layer1(b.maxpool(c0))
        c2 = b.layer2(c1)
        c3 = b.layer3(c2)
        return [c0, c1, c2, c3, b.layer4(c3)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Saliency logits.

        Args:
            images: float [B, 3, H, W], RGB in 0..255 (not normalised).

        Returns:
            float [B, 1, H, W] logits (sigmoid gives the saliency probability).
        """
        feats = self.features(self.normalize(images))
        infos = self.ppm(feats[-1], [f.shape[-2:] for f in feats[3::-1]])  # sizes of c3, c2, c1, c0
        levels = [convert(f) for convert, f in zip(self.convert, feats, strict=True)][::-1]  # deepest first
        x = levels[0]
        for k, layer in enumerate(self.deep_pools[:-1]):
            x = layer(x, levels[k + 1], infos[k])
        x = self.deep_pools[-1](x)
        return _resize(self.score(x), images.shape[-2:])

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: backbone convs = pretrained (BN is frozen), the rest = scratch."""
        return group_parameters(
            pretrained=[self.backbone], scratch=[self.ppm, self.convert, self.deep_pools, self.score]
        )


def _is_keyword(weights: str | os.PathLike | None) -> bool:
    return weights is None or str(weights).lower() in ("none", "imagenet")


def resolve_input_style(input_style: str, backbone_weights: str | os.PathLike | None) -> str:
    """``auto`` -> ``caffe`` for a weights file in Caffe naming or whose name contains ``caffe``, else torchvision."""
    if input_style not in ("auto", *INPUT_STYLES):
        raise WSSSError(f"unknown --input_style {input_style!r}; choose auto, torchvision or caffe")
    if input_style != "auto":
        return input_style
    if _is_keyword(backbone_weights):
        return "torchvision"
    path = os.fspath(backbone_weights)
    if "caffe" in os.path.basename(path).lower():
        return "caffe"
    if os.path.isfile(path):
        from core.models import unwrap_state_dict

        if caffe.is_caffe_naming(unwrap_state_dict(read_checkpoint(path), path)):
            return "caffe"
    return "torchvision"


def poolnet_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The PoolNet state dict in a weights file's content: a bare state dict (``<tag>.pth``) or a training state
    (``last.pth``, network ``poolnet``); ``module.`` prefixes are removed."""
    if isinstance(obj, Mapping) and isinstance(obj.get("models"), Mapping):
        models = obj["models"]
        if "poolnet" not in models:
            raise WSSSError(f"{source} holds networks {sorted(models)} but no PoolNet; pass PoolNet weights")
        obj = models["poolnet"]
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WSSSError(f"{source} holds no state dict of tensors; pass a PoolNet weights file")
    return normalize_state_dict_keys(obj)


def load_poolnet_weights(model: PoolNet, path: str | os.PathLike, trusted: bool = False) -> None:
    """Load PoolNet weights strictly; another architecture or another network gives one line naming both.

    Raises:
        WSSSError: unreadable file, or a state dict that does not fit ``model``.
    """
    path = os.fspath(path)
    state_dict = poolnet_state_dict(read_checkpoint(path, trusted=trusted), path)
    mismatch = compare_state_dicts(model.state_dict(), state_dict)
    if mismatch.is_empty():
        model.load_state_dict(state_dict, strict=True)  # the post hook applies the checkpoint's input style
        logger.info("loaded PoolNet weights from %s (%s input)", path, model.style)
        return
    arch, head_scale = model.model_kwargs["architecture"], model.model_kwargs["head_scale"]
    if not any(key.startswith(("ppm.", "deep_pools.")) for key in state_dict):
        raise WSSSError(
            f"{path} holds a {describe_state_dict(state_dict)}, not PoolNet weights; pass the <tag>.pth written by "
            "poolnet/train.py"
        )
    backbone_keys = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    held = describe_state_dict(backbone_keys)
    if compare_state_dicts(
        model.backbone.state_dict(), {k[len("backbone.") :]: v for k, v in backbone_keys.items()}
    ).is_empty():
        width = state_dict["score.weight"].shape[1] if "score.weight" in state_dict else "?"
        raise WSSSError(
            f"PoolNet weights {path} have another head than --head_scale {head_scale:g} builds (score layer on {width} "
            f"channels; {mismatch.summary()}); pass the --head_scale they were trained with"
        )
    raise WSSSError(
        f"PoolNet weights {path} were trained on a {held} backbone but --architecture {arch} builds another "
        f"({mismatch.summary()}); pass the --architecture they were trained with"
    )
