"""ResNet and ResNeSt feature extractors with output stride 16 or 8, frozen-BN mode and stage freezing.

The backbone's own modules (``conv1``, ``bn1``, ``layer1``..``layer4``) are registered under their native
torchvision / ResNeSt names, so its state dict is the ImageNet file's minus ``fc.*`` and weights load without
renaming. ``resnet18/34`` use torchvision's BasicBlock (the reference built them with Bottleneck blocks, so
their ImageNet weights could not load; SPEC §13.1.17).

``resnet38`` is the wide ResNet-38d of PSA/SEAM/EPS/PPC (:mod:`core.models.resnet38`): a :class:`FeatureBackbone`
of its own layout with the same outputs, always at output stride 8.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import WSSSError
from core.models.compat import (
    compare_state_dicts,
    describe_state_dict,
    normalize_state_dict_keys,
    read_checkpoint,
    unwrap_state_dict,
    with_batch_counters,
)
from core.models.initialization import DEFAULT_SCRATCH_INIT, check_scratch_init, reset_to_pytorch_default

logger = logging.getLogger(__name__)

BackboneFactory = Callable[[type[nn.BatchNorm2d], bool], nn.Module]
# Manifold Mixup's hook: (mixing point, hidden state) -> the hidden state the network continues with.
HiddenMix = Callable[[int, torch.Tensor], torch.Tensor]
#: Where a hidden-state hook is called: the input, after the stem, after layer1..layer4.
MIX_POINTS = ("input", "stem", "layer1", "layer2", "layer3", "layer4")

#: ``--architecture`` name -> factory ``(norm_layer, dilated) -> network with conv1, bn1, layer1..layer4``.
BACKBONES: dict[str, BackboneFactory] = {}

MODES = ("normal", "fix")
STEM_MODULES = ("conv1", "bn1")
STAGE_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

# ImageNet files of torchvision before its weights API; the reference (and many caches) hold these names.
_LEGACY_TORCHVISION_FILES = {
    "resnet18": "resnet18-5c106cde.pth",
    "resnet34": "resnet34-333f7ec4.pth",
    "resnet50": "resnet50-19c8e357.pth",
    "resnet101": "resnet101-5d3b4d8f.pth",
    "resnet152": "resnet152-b121ed2d.pth",
}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator adding a factory ``(norm_layer, dilated) -> nn.Module`` to :data:`BACKBONES` under ``name``."""

    def register(factory: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            logger.warning("backbone %s registered twice; the later factory wins", name)
        BACKBONES[name] = factory
        return factory

    return register


def _keep_hidden(point: int, hidden: torch.Tensor) -> torch.Tensor:
    return hidden


class FixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics, in train mode too.

    Its state-dict keys are exactly BatchNorm2d's, so checkpoints move freely between ``normal`` and ``fix`` mode.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class FeatureBackbone(nn.Module):
    """What every convolutional backbone shares: its description, freezing parts, and BN frozen across ``train()``.

    Subclasses build their layers and set ``stage_channels`` / ``out_channels``; ``stem_modules`` and
    ``stage_modules`` name the children that ``--trainable-stem false`` and ``--trainable-backbone false`` freeze.

    Attributes:
        architecture: registry name, e.g. ``resnet50``.
        output_stride: 16 or 8 (stride of ``x4`` relative to the input).
        stage_channels: channels of (stem, x1, x2, x3, x4), e.g. ``(64, 256, 512, 1024, 2048)``.
        out_channels: channels of ``x4``.
        fixed_norm: True in ``fix`` mode: every BN layer stays in eval mode.
    """

    stem_modules: tuple[str, ...] = STEM_MODULES
    stage_modules: tuple[str, ...] = STAGE_MODULES

    def __init__(self, architecture: str, output_stride: int, fixed_norm: bool = False) -> None:
        super().__init__()
        self.architecture = architecture
        self.output_stride = output_stride
        self.fixed_norm = fixed_norm
        self.stage_channels: tuple[int, ...] = ()
        self.out_channels = 0
        self._frozen: list[str] = []

    def freeze(self, names: Iterable[str]) -> None:
        """Stop training the named child modules: no gradients, and BN kept in eval mode across ``train()``."""
        for name in names:
            self.get_submodule(name).requires_grad_(False)
            if name not in self._frozen:
                self._frozen.append(name)
        self.train(self.training)

    def train(self, mode: bool = True) -> FeatureBackbone:
        super().train(mode)
        # Frozen parts and fixed BN must never update running statistics, whatever the caller asks.
        for name in self._frozen:
            self.get_submodule(name).eval()
        # Checked by base class, so it still holds after e.g. SyncBatchNorm conversion replaced FixedBatchNorm2d.
        if self.fixed_norm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


class Backbone(FeatureBackbone):
    """A ResNet-family feature extractor returning the stem and the four stage outputs (see FeatureBackbone)."""

    def __init__(self, net: nn.Module, architecture: str, output_stride: int, fixed_norm: bool = False) -> None:
        super().__init__(architecture, output_stride, fixed_norm)
        # Registered in torchvision's order so state-dict keys and their order match the ImageNet files.
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.stage_channels = (self.bn1.num_features,) + tuple(
            _last_norm_channels(getattr(self, f"layer{i}")) for i in range(1, 5)
        )
        self.out_channels = self.stage_channels[-1]

    def forward(
        self, x: torch.Tensor, hidden_mix: HiddenMix | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Extract the stem and stage features.

        Args:
            x: float [B, 3, H, W], normalised image (contiguous or channels_last).
            hidden_mix: Manifold Mixup's hook ``(point, hidden) -> hidden``, called at each of the
                :data:`MIX_POINTS` points (0 = the input, 1 = after the stem, 2..5 = after layer1..layer4) and
                returning the tensor the network continues with (see :mod:`core.cam.mixing`); None = no hook.

        Returns:
            (stem, x1, x2, x3, x4): stem and x1 at stride 4, x2 at 8, x3 at 16 (8 if dilated), x4 at
            ``output_stride``; channels as in ``stage_channels``.
        """
        mix = hidden_mix or _keep_hidden
        x = mix(0, x)
        stem = mix(1, self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        x1 = mix(2, self.layer1(stem))
        x2 = mix(3, self.layer2(x1))
        x3 = mix(4, self.layer3(x2))
        x4 = mix(5, self.layer4(x3))
        return stem, x1, x2, x3, x4


def build_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = "none",
    dilated: bool = False,
    mode: str = "normal",
    trainable_stem: bool = True,
    trainable_backbone: bool = True,
    scratch_init: str = DEFAULT_SCRATCH_INIT,
) -> FeatureBackbone:
    """Build a registered backbone.

    Args:
        name: a key of :data:`BACKBONES` (a ViT name returns a :class:`core.models.vit.ViTBackbone`).
        weights: ``"none"`` (random init), ``"imagenet"`` (torch hub cache, downloaded if missing) or the path
            of a ``.pth`` holding a torchvision/ResNeSt state dict (``fc.*`` ignored; ``{"state_dict"|"model": ...}``
            wrappers and ``backbone.``-prefixed classifier checkpoints accepted).
        dilated: output stride 8 (layer3 dilation 2, layer4 dilation 4) instead of 16 (layer4 dilation 2).
        mode: ``"normal"`` (trainable BN) or ``"fix"`` (BN uses running stats, affine params frozen).
        trainable_stem: False freezes conv1/bn1.
        trainable_backbone: False freezes every backbone parameter (BN kept in eval mode).
        scratch_init: initialisation when ``weights`` is ``"none"`` (ignored otherwise: loaded weights replace
            it): ``"torchvision"`` (default) keeps the torchvision/ResNeSt constructors' Kaiming-normal (fan_out)
            convs; ``"pytorch"`` resets every layer to PyTorch's default init, as the reference's hand-built ResNets.

    Raises:
        WSSSError: unknown name or mode, missing/mismatching weights file, ImageNet weights unavailable.
    """
    if name not in BACKBONES:
        raise WSSSError(f"unknown architecture {name!r}; choose one of: {', '.join(BACKBONES)}")
    if mode not in MODES:
        raise WSSSError(f"unknown backbone mode {mode!r}; choose one of: {', '.join(MODES)}")
    check_scratch_init(scratch_init)
    if name in VIT_ARCHITECTURES:
        from core.models.vit import build_vit_backbone

        return build_vit_backbone(  # LayerNorm only: --mode and --scratch_init do not apply
            name, weights=weights, dilated=dilated, trainable_stem=trainable_stem, trainable_backbone=trainable_backbone
        )
    norm_layer = FixedBatchNorm2d if mode == "fix" else nn.BatchNorm2d
    net = BACKBONES[name](norm_layer, dilated)
    if isinstance(net, FeatureBackbone):  # a complete backbone of its own layout (ResNet-38)
        backbone = net
    else:
        backbone = Backbone(net, name, output_stride=8 if dilated else 16, fixed_norm=mode == "fix")
    if is_random(weights) and scratch_init == "pytorch":
        reset_to_pytorch_default(backbone)
    load_backbone_weights(backbone, weights)
    if mode == "fix":
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.requires_grad_(False)
    if not trainable_backbone:
        backbone.freeze(backbone.stage_modules)
    elif not trainable_stem:
        backbone.freeze(backbone.stem_modules)
    backbone.train()
    return backbone


def load_backbone_weights(backbone: FeatureBackbone, weights: str | os.PathLike | None) -> None:
    """Fill ``backbone`` from ``"none"`` (keep the random init), ``"imagenet"`` or a file (see build_backbone)."""
    if is_random(weights):
        logger.info("%s: random initialisation (no pretrained weights)", backbone.architecture)
        return
    if str(weights).lower() == "imagenet" and backbone.architecture in RESNET38_ARCHITECTURES:
        raise WSSSError(
            f"no ImageNet weights of {backbone.architecture} can be downloaded (the original is an MXNet .params "
            "file): convert it once as core/models/resnet38.py describes and pass --backbone_weights PATH "
            "(or --backbone_weights none)"
        )
    if str(weights).lower() == "imagenet":
        state_dict = imagenet_state_dict(backbone.architecture)
        backbone.load_state_dict(_without_head(state_dict), strict=True)
        logger.info("%s: ImageNet weights loaded", backbone.architecture)
        return
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise WSSSError(
            f"backbone weights file {path} not found; pass an existing .pth, --backbone_weights imagenet or none"
        )
    state_dict = _backbone_part(normalize_state_dict_keys(unwrap_state_dict(read_checkpoint(path), path)))
    state_dict = with_batch_counters(backbone.state_dict(), state_dict)
    mismatch = compare_state_dicts(backbone.state_dict(), state_dict)
    if not mismatch.is_empty():
        raise WSSSError(
            f"backbone weights file {path} holds a {describe_state_dict(state_dict)}, which does not fit "
            f"{backbone.architecture} ({mismatch.summary()}); "
            f"pass weights of a {backbone.architecture} or --backbone_weights none"
        )
    backbone.load_state_dict(state_dict, strict=True)
    logger.info("%s: weights loaded from %s", backbone.architecture, path)


def is_random(weights: str | os.PathLike | None) -> bool:
    """True when ``--backbone_weights`` asks for no pretrained weights (``None`` or ``"none"``)."""
    return weights is None or str(weights).lower() == "none"


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of a registered backbone, from the torch hub cache or downloaded into it.

    ResNets use torchvision's ``IMAGENET1K_V1`` weights (the reference's ``resnet50-19c8e357`` file is used when it
    is already cached); ResNeSt uses the official release files (hash-checked).

    Raises:
        WSSSError: one line when the file is neither cached nor downloadable (offline) or fails its hash check.
    """
    url = _imagenet_url(name)
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    legacy = _LEGACY_TORCHVISION_FILES.get(name)
    if legacy and os.path.isfile(os.path.join(checkpoints, legacy)):
        return unwrap_state_dict(read_checkpoint(os.path.join(checkpoints, legacy)), legacy)
    file_name = os.path.basename(url)
    cached = os.path.join(checkpoints, file_name)
    if not os.path.isfile(cached):
        logger.info("downloading ImageNet weights for %s from %s", name, url)
        try:
            os.makedirs(checkpoints, exist_ok=True)
            # The file names carry the first hex digits of the SHA-256 (``resnet50-0676ba61.pth``); the download
            # goes to a temporary file that is moved into the cache only once the hash matches.
            hash_prefix = file_name.rsplit("-", 1)[-1].split(".")[0]
            torch.hub.download_url_to_file(url, cached, hash_prefix=hash_prefix, progress=False)
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a bad hash a RuntimeError
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WSSSError(
                f"cannot download ImageNet weights for {name} from {url} (offline? {reason}); "
                f"put {file_name} in {checkpoints} ($TORCH_HOME/hub/checkpoints) "
                "or pass --backbone_weights PATH or --backbone_weights none"
            ) from e
    return unwrap_state_dict(read_checkpoint(cached), cached)


def _imagenet_url(name: str) -> str:
    if name.startswith("resnest"):
        from resnest.torch.resnest import resnest_model_urls

        return resnest_model_urls[name]
    from torchvision.models import get_model_weights

    return get_model_weights(name).IMAGENET1K_V1.url


# Heads that a backbone file may carry besides the backbone: torchvision's ImageNet classifier, and the CAM heads
# of a classifier checkpoint (ours after core.models.compat renamed the ResNet-38 references' fc8/f8_3/f9/fc_proj).
_HEAD_PREFIXES = ("fc.", "avgpool.", "classifier.", "pcm.", "projection.", "linear1000.")


def _without_head(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}


def _backbone_part(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a bare backbone file, or the ``backbone.*`` part of a classifier checkpoint, without the head."""
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return _without_head(state_dict)


def _last_norm_channels(layer: nn.Module) -> int:
    norms = [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features


def _set_stride_and_dilation(layer: nn.Sequential, stride: int, dilation: int) -> None:
    """Re-stride a torchvision ResNet layer in place, keeping every weight shape.

    The first block keeps dilation 1 (as in the reference); later blocks use ``dilation`` with padding equal to
    the dilation, so a 3x3 conv preserves the spatial size. torchvision's BasicBlock refuses dilation in its
    constructor, hence this patch instead of ``replace_stride_with_dilation``.
    """
    for index, block in enumerate(layer):
        block_dilation = 1 if index == 0 else dilation
        for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)):
            conv.dilation = (block_dilation, block_dilation)
            conv.padding = (block_dilation, block_dilation)
            if conv.stride != (1, 1):
                conv.stride = (stride, stride)
        if block.downsample is not None:
            block.downsample[0].stride = (stride, stride)
        block.stride = stride if index == 0 else 1


def _torchvision_resnet(name: str, norm_layer: type[nn.BatchNorm2d], dilated: bool) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    if dilated:
        _set_stride_and_dilation(net.layer3, stride=1, dilation=2)
        _set_stride_and_dilation(net.layer4, stride=1, dilation=4)
    else:
        _set_stride_and_dilation(net.layer4, stride=1, dilation=2)
    return net


def _resnest(name: str, norm_layer: type[nn.BatchNorm2d], dilated: bool) -> nn.Module:
    import resnest.torch as resnest_models

    # resnest's own switches: dilated=True -> OS8 (layer3 dil 2, layer4 dil 4); dilation=2 -> OS16 (layer4 dil 2).
    stride_kwargs = {"dilated": True} if dilated else {"dilation": 2}
    return getattr(resnest_models, name)(pretrained=False, norm_layer=norm_layer, **stride_kwargs)


def _register_family(names: Iterable[str], builder: Callable[[str, type[nn.BatchNorm2d], bool], nn.Module]) -> None:
    for name in names:
        register_backbone(name)(lambda norm_layer, dilated, _name=name: builder(_name, norm_layer, dilated))


_register_family(("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"), _torchvision_resnet)
_register_family(("resnest50", "resnest101", "resnest200", "resnest269"), _resnest)


def _vit(name: str, norm_layer: type[nn.BatchNorm2d], dilated: bool) -> nn.Module:
    from core.models.vit import build_vit_backbone  # timm is imported only when a ViT is asked for

    return build_vit_backbone(name, dilated=dilated)


# timm Vision Transformers (core/models/vit.py): build_backbone hands them to build_vit_backbone whole, since they
# have no ResNet stages to wrap; test_vit is timm's 0.3 M-parameter ViT for tests.
VIT_ARCHITECTURES = ("vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224", "test_vit")
_register_family(VIT_ARCHITECTURES, _vit)


def _resnet38(name: str, norm_layer: type[nn.BatchNorm2d], dilated: bool) -> nn.Module:
    from core.models.resnet38 import build_resnet38  # its module imports this one

    return build_resnet38(norm_layer, dilated, name)


# The wide ResNet-38d of PSA/SEAM/EPS/PPC (core/models/resnet38.py), always output stride 8; test_resnet38 is the
# same network at 1/16 of the width, for tests.
RESNET38_ARCHITECTURES = ("resnet38", "test_resnet38")
_register_family(RESNET38_ARCHITECTURES, _resnet38)


def group_parameters(pretrained: Iterable[nn.Module], scratch: Iterable[nn.Module]) -> dict[str, list[nn.Parameter]]:
    """Split the trainable parameters into the four named LR groups of SPEC §2.2.

    A parameter whose name ends with ``weight`` (conv kernels, BN gamma) goes to ``*_weights``, anything else
    (biases, BN beta) to ``*_biases``; frozen parameters are left out.

    Returns:
        ``{"pretrained_weights", "pretrained_biases", "scratch_weights", "scratch_biases"}`` -> parameter lists.
    """
    groups: dict[str, list[nn.Parameter]] = {
        "pretrained_weights": [],
        "pretrained_biases": [],
        "scratch_weights": [],
        "scratch_biases": [],
    }
    for origin, modules in (("pretrained", pretrained), ("scratch", scratch)):
        for module in modules:
            for param_name, param in module.named_parameters():
                if param.requires_grad:
                    kind = "weights" if param_name.endswith("weight") else "biases"
                    groups[f"{origin}_{kind}"].append(param)
    return groups
