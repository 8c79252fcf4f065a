"""The reference's Caffe ResNet-50 (``resnet50_caffe.pth``): key mapping, input normalisation and stride layout.

The file is a manual download of the original PoolNet release. Two key layouts are accepted:

* torchvision names (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``,
  ``layer1.0.downsample.1.weight``...), possibly under a ``resnet.`` / ``base.resnet.`` prefix: what the
  reference's ``load_state_dict(strict=False)`` fills its ResNet with;
* Caffe blob names of the ResNet-50 prototxt as converters write them: ``conv1``, ``bn_conv1`` (mean, variance)
  with ``scale_conv1`` (gamma, beta), and per block ``res<s><b>_branch2{a,b,c}`` / ``bn...`` / ``scale...``, the
  projection ``res<s>a_branch1`` (stage ``s`` = 2..5 is ``layer1..layer4``, block letter ``a, b, c...`` its index).

Caffe ResNets differ from torchvision's in three ways that this module handles when the file is used:
input images are BGR in 0..255 minus the Caffe mean (no std scaling); the stride of a stage's first block sits in
its 1x1 ``conv1`` instead of the 3x3 ``conv2``; the stem's max pool rounds its size up (``ceil_mode``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from core.errors import WSSSError
from core.models import Backbone, describe_state_dict, read_checkpoint, unwrap_state_dict
from core.models.compat import compare_state_dicts

logger = logging.getLogger(__name__)

#: Caffe ImageNet mean in BGR order (0..255), subtracted from BGR images; no division by a std.
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)

_PREFIXES = ("module.", "base.resnet.", "resnet.", "base.")
_BLOCK = re.compile(r"^(res|bn|scale)([2-5])([a-z])_branch(1|2a|2b|2c)\.(.+)$")
_STEM = re.compile(r"^(conv1|bn_conv1|scale_conv1)\.(.+)$")
_BRANCH_TO_TORCHVISION = {"2a": "1", "2b": "2", "2c": "3"}
_BN_STATS = {"running_mean", "running_var", "num_batches_tracked"}


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _caffe_key(key: str) -> str | None:
    """torchvision name of one Caffe blob key, or None when the key is not in Caffe naming."""
    stem = _STEM.match(key)
    if stem:
        layer, param = stem.groups()
        return f"conv1.{param}" if layer == "conv1" else f"bn1.{param}"
    block = _BLOCK.match(key)
    if block is None:
        return None
    kind, stage, letter, branch, param = block.groups()
    prefix = f"layer{int(stage) - 1}.{ord(letter) - ord('a')}"
    if branch == "1":
        module = "downsample.0" if kind == "res" else "downsample.1"
    else:
        module = ("conv" if kind == "res" else "bn") + _BRANCH_TO_TORCHVISION[branch]
    return f"{prefix}.{module}.{param}"


def is_caffe_naming(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys use Caffe blob names (``bn_conv1``, ``res2a_branch2a``...)."""
    return any(_caffe_key(_strip(key)) is not None and not _strip(key).startswith("conv1.") for key in state_dict)


def to_torchvision_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Caffe ResNet state dict (either layout of the module docstring) to torchvision backbone keys.

    The classifier (``fc``/``fc1000``) is dropped. In Caffe naming a BatchNorm's statistics come from ``bn*`` and its
    affine parameters from ``scale*`` (a ``bn*`` weight/bias, written by some converters, is used when no ``scale*``
    is given).
    """
    caffe = is_caffe_naming(state_dict)
    renamed: dict[str, torch.Tensor] = {}
    scale_params: dict[str, torch.Tensor] = {}
    for raw_key, value in state_dict.items():
        key = _strip(raw_key)
        if key.startswith(("fc.", "fc1000.")):
            continue
        if not caffe:
            renamed[key] = value
            continue
        target = _caffe_key(key)
        if target is None:
            renamed[key] = value  # left as is: reported as unexpected by the caller
        elif key.startswith("scale"):
            scale_params[target] = value
        else:
            renamed[target] = value
    renamed.update(scale_params)  # Caffe's Scale layer holds the BatchNorm's gamma and beta
    return renamed


def load_caffe_backbone(backbone: Backbone, path: str | os.PathLike) -> None:
    """Fill ``backbone`` (a Bottleneck ResNet) from the Caffe ResNet file at ``path``; strict, one-line errors.

    Missing ``num_batches_tracked`` counters (Caffe has none) keep the backbone's values.

    Raises:
        WSSSError: unreadable file, or keys/shapes that do not fit the backbone (the message names both networks).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WSSSError(
            f"Caffe ResNet file {path} not found; download resnet50_caffe.pth (PoolNet release) or pass "
            "--backbone_weights imagenet or none"
        )
    state_dict = to_torchvision_names(unwrap_state_dict(read_checkpoint(path), path))
    expected = backbone.state_dict()
    for key, value in expected.items():
        if key.rsplit(".", 1)[-1] == "num_batches_tracked":
            state_dict.setdefault(key, value)
    mismatch = compare_state_dicts(expected, state_dict)
    if not mismatch.is_empty():
        raise WSSSError(
            f"Caffe ResNet file {path} holds a {describe_state_dict(state_dict)}, which does not fit "
            f"{backbone.architecture} ({mismatch.summary()}); pass --architecture resnet50 with the reference's "
            "resnet50_caffe.pth, or --input_style torchvision for a torchvision file"
        )
    backbone.load_state_dict(state_dict, strict=True)
    logger.info("%s: Caffe ResNet weights loaded from %s (BGR input, Caffe mean)", backbone.architecture, path)


def set_caffe_strides(backbone: Backbone, caffe: bool) -> None:
    """Put each strided first block's stride in its 1x1 ``conv1`` (Caffe) or its 3x3 ``conv2`` (torchvision).

    Only Bottleneck blocks (``conv3`` present) are changed; weights keep their shapes. The stem's max pool rounds up
    in Caffe layout (``ceil_mode``), as the reference's ResNet.
    """
    backbone.maxpool.ceil_mode = caffe
    for name in ("layer1", "layer2", "layer3", "layer4"):
        block = getattr(backbone, name)[0]
        if not hasattr(block, "conv3") or block.downsample is None:
            continue
        stride = block.downsample[0].stride
        if stride == (1, 1):
            continue
        conv1, conv2 = block.conv1, block.conv2
        conv1.stride, conv2.stride = (stride, (1, 1)) if caffe else ((1, 1), stride)


def requires_bottleneck(backbone: nn.Module, path: str) -> None:
    """Refuse the Caffe file for a backbone without Bottleneck blocks (resnet18/34, which Caffe never had)."""
    if not hasattr(backbone.layer1[0], "conv3"):
        raise WSSSError(
            f"--backbone_weights {path} is a Caffe ResNet, which exists for Bottleneck ResNets only; "
            f"pass --architecture resnet50 (not {backbone.architecture})"
        )
