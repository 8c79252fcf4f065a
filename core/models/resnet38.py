"""The wide ResNet-38 ("ResNet-38d", Wu et al. 2019) of PSA, SEAM, EPS and PPC, as one more registry backbone.

Layout (METHODS §1.1, §4): ``conv1a`` 3x3 64; pre-activation blocks ``b2`` 128 x3 (stride 2), ``b3`` 256 x3
(stride 2), ``b4`` 512 x6 (stride 2), ``b5`` (512, 1024) x3 dilated 2, the bottlenecks ``b6`` (512, 1024, 2048)
dilated 4 with dropout 0.3 and ``b7`` (1024, 2048, 4096) dilated 4 with dropout 0.5, then ``bn7`` + ReLU: output
stride 8, 4096 channels (``--dilated`` has no effect: the network is OS8 by construction). 104 M parameters.

The :class:`core.models.Backbone` interface maps the block groups onto the ResNet stages:

=========  ===========================  ======  ========
 output     blocks                       stride  channels
=========  ===========================  ======  ========
 stem       conv1a, b2, b2_1, b2_2        2       128
 x1         b3, b3_1, b3_2                4       256
 x2         b4 .. b4_5                    8       512     (SEAM's ``conv4``)
 x3         b5, b5_1, b5_2                8       1024    (SEAM's ``conv5``)
 x4         b6, b7, bn7 + ReLU            8       4096    (``conv6``)
=========  ===========================  ======  ========

Blocks are pre-activation, so a group's raw output is an un-normalised sum; each returned feature is the
``ReLU(BN(.))`` of that output that the next group's first block computes anyway (the references' ``conv4`` and
``conv5`` of the PCM are exactly ``x2`` and ``x3``). ``--trainable-stem false`` freezes conv1a and the b2 blocks,
and ``--mode fix`` keeps every BatchNorm in eval mode with frozen affine parameters: the references' set-up
(METHODS §16.7).

Module names are the references' own, so their files load without renaming: a bare backbone file has the keys
``conv1a.weight``, ``b2.bn_branch2a.weight``, ``b2.conv_branch2a.weight``, ..., ``b4_5.*``,
``b7.conv_branch2b2.weight``, ``bn7.running_var``; the released CAM models add ``fc8.weight`` (PSA: 20 classes;
SEAM/PPC: 21, background first), SEAM's PCM ``f8_3``, ``f8_4``, ``f9`` and PPC's projection ``fc_proj``, which
:func:`core.models.compat.normalize_state_dict_keys` maps onto this project's names. Files without the BatchNorm
``num_batches_tracked`` counters (older PyTorch, MXNet conversions) load too.

ImageNet weights: nothing is downloaded (``--backbone_weights imagenet`` stops with one line). The original file is
MXNet's ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``; convert it once, offline, on a machine with ``mxnet``::

    import mxnet, torch
    names = {"beta": "bias", "gamma": "weight", "mean": "running_mean", "var": "running_var"}
    state = {}
    for key, value in mxnet.nd.load("ilsvrc-cls_rna-a1_cls1000_ep-0001.params").items():
        tensor, parts = torch.from_numpy(value.asnumpy()), key.split("_")   # e.g. "arg:res4b3_branch2a_weight"
        if "conv1a" in parts[0]:
            state["conv1a.weight"] = tensor
        elif "linear1000" in parts[0]:
            continue                                                         # the ImageNet classifier
        elif "branch" in parts[1]:                                           # res4b3 -> b4_3, res4a -> b4
            unit = parts[0][-1]
            block = f"b{parts[0][-3]}_{unit}" if unit != "a" else f"b{parts[0][-2]}"
            layer, leaf = ("conv", "weight") if "res" in parts[0] else ("bn", names[parts[-1]])
            state[f"{block}.{layer}_{parts[1]}.{leaf}"] = tensor
        else:
            state[f"bn7.{names[parts[-1]]}"] = tensor                        # the final BatchNorm
    torch.save(state, "resnet38d_imagenet.pth")

then pass ``--backbone_weights resnet38d_imagenet.pth``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.models.backbones import FeatureBackbone, HiddenMix, _keep_hidden

#: Block names of each group, in order: stem (conv1a + b2), layer1 .. layer4 (b7 is followed by bn7).
GROUPS: tuple[tuple[str, ...], ...] = (
    ("b2", "b2_1", "b2_2"),
    ("b3", "b3_1", "b3_2"),
    ("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"),
    ("b5", "b5_1", "b5_2"),
    ("b6", "b7"),
)
OUTPUT_STRIDE = 8


class ResidualBlock(nn.Module):
    """Pre-activation block of two 3x3 convolutions: ``x + conv(ReLU(BN(conv(ReLU(BN(x))))))``.

    The shortcut is a strided 1x1 convolution of the activated input when the shape changes.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        norm_layer: type[nn.BatchNorm2d],
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        first = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = norm_layer(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, first, first, bias=False)
        self.bn_branch2b1 = norm_layer(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, 1, dilation, dilation, bias=False)
        self.same_shape = in_channels == out_channels and stride == 1
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, ``ReLU(BN(x))``: the activated input, the previous group's feature map)."""
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(activated)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(activated))))
        return shortcut + branch, activated


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck 1x1 (C/4) -> 3x3 dilated (C/2) -> 1x1 (C), with Dropout2d before the last two convs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: type[nn.BatchNorm2d],
        dilation: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bn_branch2a = norm_layer(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, bias=False)
        self.bn_branch2b1 = norm_layer(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, 1, dilation, dilation, bias=False)
        self.bn_branch2b2 = norm_layer(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, ``ReLU(BN(x))``)."""
        activated = F.relu(self.bn_branch2a(x))
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return self.conv_branch1(activated) + branch, activated


class ResNet38(FeatureBackbone):
    """The wide ResNet-38d feature extractor (see the module docstring for its stages and file layout).

    Args:
        norm_layer: ``nn.BatchNorm2d`` or ``FixedBatchNorm2d`` (``--mode fix``).
        architecture: the registry name.
        width: channel multiplier; 1 is the published network, ``test_resnet38`` uses 1/16 to keep tests fast.
    """

    stem_modules = ("conv1a", *GROUPS[0])
    stage_modules = ("conv1a", *(name for group in GROUPS for name in group), "bn7")

    def __init__(self, norm_layer: type[nn.BatchNorm2d], architecture: str = "resnet38", width: float = 1.0) -> None:
        def w(channels: int) -> int:
            return max(1, int(channels * width))

        channels = (w(128), w(256), w(512), w(1024), w(4096))
        super().__init__(architecture, OUTPUT_STRIDE, fixed_norm=norm_layer is not nn.BatchNorm2d)
        self.conv1a = nn.Conv2d(3, w(64), 3, padding=1, bias=False)
        self.b2 = ResidualBlock(w(64), w(128), w(128), norm_layer, stride=2)
        self.b2_1 = ResidualBlock(w(128), w(128), w(128), norm_layer)
        self.b2_2 = ResidualBlock(w(128), w(128), w(128), norm_layer)
        self.b3 = ResidualBlock(w(128), w(256), w(256), norm_layer, stride=2)
        self.b3_1 = ResidualBlock(w(256), w(256), w(256), norm_layer)
        self.b3_2 = ResidualBlock(w(256), w(256), w(256), norm_layer)
        self.b4 = ResidualBlock(w(256), w(512), w(512), norm_layer, stride=2)
        for index in range(1, 6):
            setattr(self, f"b4_{index}", ResidualBlock(w(512), w(512), w(512), norm_layer))
        self.b5 = ResidualBlock(w(512), w(512), w(1024), norm_layer, dilation=2, first_dilation=1)
        self.b5_1 = ResidualBlock(w(1024), w(512), w(1024), norm_layer, dilation=2)
        self.b5_2 = ResidualBlock(w(1024), w(512), w(1024), norm_layer, dilation=2)
        self.b6 = BottleneckBlock(w(1024), w(2048), norm_layer, dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(w(2048), w(4096), norm_layer, dilation=4, dropout=0.5)
        self.bn7 = norm_layer(w(4096))
        self.stage_channels = channels
        self.out_channels = channels[-1]

    def forward(
        self, x: torch.Tensor, hidden_mix: HiddenMix | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Extract the stem and stage features (the same contract as :meth:`core.models.Backbone.forward`).

        Args:
            x: float [B, 3, H, W], normalised image.
            hidden_mix: Manifold Mixup's hook, called on the input and on each group's raw output (the tensor the
                network continues with); the returned features are the activations of the mixed tensors.

        Returns:
            (stem, x1, x2, x3, x4): float, non-negative (post-ReLU), at strides 2, 4, 8, 8, 8 with
            ``stage_channels`` channels; spatial sizes ``ceil(H / stride)``.
        """
        mix = hidden_mix or _keep_hidden
        hidden = self.conv1a(mix(0, x))
        features = []
        for point, group in enumerate(GROUPS, start=1):
            for index, name in enumerate(group):
                hidden, activated = getattr(self, name)(hidden)
                if index == 0 and point > 1:
                    features.append(activated)  # ReLU(BN(.)) of the previous group's (mixed) output
            if point < len(GROUPS):
                hidden = mix(point, hidden)
        features.append(mix(len(GROUPS), F.relu(self.bn7(hidden))))
        return tuple(features)  # type: ignore[return-value]


def build_resnet38(norm_layer: type[nn.BatchNorm2d], dilated: bool, name: str = "resnet38") -> ResNet38:
    """Registry factory: the published network, or ``test_resnet38`` (the same layers at 1/16 of the width)."""
    return ResNet38(norm_layer, name, width=1 / 16 if name == "test_resnet38" else 1.0)
