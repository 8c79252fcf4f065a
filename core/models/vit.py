"""Vision Transformers (timm) as CAM backbones: the patch tokens, laid out as a stride-16 feature map.

Sub-category Teaching's teacher is a ViT-B/16 fine-tuned on the image-level labels (METHODS §11). Wrapped here,
a ViT is one more ``--architecture`` of the :class:`core.models.Classifier`: its class maps are the 1x1 head on
the patch tokens, its logits their spatial mean and its "GAP feature" the mean patch token (``D`` = 768 for
ViT-B). Any input size works: timm interpolates the position embedding and pads to a multiple of 16.

Nothing is downloaded. ``--backbone_weights imagenet`` stops with one line (pass ``none`` or a PATH); a PATH is a
timm state dict (``blocks.0.attn.qkv.weight``...; its ``head.*`` is ignored) or a classifier checkpoint of ours.
``test_vit`` (timm's 2-block, 64-wide ViT, 0.3 M parameters) keeps tests fast.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from core.errors import WSSSError
from core.models.compat import compare_state_dicts, normalize_state_dict_keys, read_checkpoint, unwrap_state_dict

if TYPE_CHECKING:
    from core.models.backbones import HiddenMix

logger = logging.getLogger(__name__)

PATCH_STRIDE = 16


class ViTBackbone(nn.Module):
    """A timm VisionTransformer returning its patch tokens as a feature map.

    State-dict keys: ``vit.<timm key>`` (the classifier prefixes them with ``backbone.``).

    Attributes:
        architecture: the timm model name, e.g. ``vit_base_patch16_224``.
        output_stride: 16 (the patch size).
        stage_channels: ``(D,)``; out_channels: ``D``, the embedding width.
    """

    def __init__(self, vit: nn.Module, architecture: str) -> None:
        super().__init__()
        self.vit = vit
        self.architecture = architecture
        self.output_stride = PATCH_STRIDE
        self.out_channels = int(vit.embed_dim)
        self.stage_channels = (self.out_channels,)
        self.fixed_norm = False

    def forward(self, x: torch.Tensor, hidden_mix: HiddenMix | None = None) -> tuple[torch.Tensor]:
        """Patch tokens of a batch.

        Args:
            x: float [B, 3, H, W], normalised image, any H and W.
            hidden_mix: what :class:`core.models.Classifier` passes on for Manifold Mixup; a ViT has no such hook,
                so anything but None is refused.

        Returns:
            A 1-tuple (so ``[-1]`` reads like the ResNet backbones): float [B, D, ceil(H/16), ceil(W/16)].
        """
        if hidden_mix is not None:
            raise WSSSError("Manifold Mixup mixes ResNet/ResNeSt hidden states; a ViT --architecture cannot use it")
        h, w = self.vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]  # [B, h*w, D]
        return (tokens.transpose(1, 2).reshape(x.shape[0], self.out_channels, h, w),)


def build_vit_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = "none",
    dilated: bool = False,
    trainable_stem: bool = True,
    trainable_backbone: bool = True,
) -> ViTBackbone:
    """A timm ViT backbone with random weights or the weights of a file (see the module docstring).

    Raises:
        WSSSError: ``dilated`` (a ViT has no dilated form), ``imagenet`` weights, a missing or mismatching file.
    """
    import timm

    if dilated:
        raise WSSSError(f"--dilated true does not apply to {name} (a ViT has output stride 16): pass --dilated false")
    vit = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)
    backbone = ViTBackbone(vit, name)
    _load_weights(backbone, weights)
    if not trainable_backbone:
        backbone.requires_grad_(False)
    elif not trainable_stem:
        backbone.vit.patch_embed.requires_grad_(False)
    return backbone


def _load_weights(backbone: ViTBackbone, weights: str | os.PathLike | None) -> None:
    name = backbone.architecture
    if weights is None or str(weights).lower() == "none":
        logger.info("%s: random initialisation (no pretrained weights)", name)
        return
    if str(weights).lower() == "imagenet":
        raise WSSSError(
            f"ImageNet weights of {name} are not downloaded by this toolkit (timm would fetch them from the "
            "Hugging Face hub): pass --backbone_weights none, or --backbone_weights PATH of a timm state dict"
        )
    path = os.fspath(weights)
    state = normalize_state_dict_keys(unwrap_state_dict(read_checkpoint(path), path))
    if any(key.startswith("backbone.") for key in state):  # a classifier checkpoint of ours
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if not any(key.startswith("vit.") for key in state):  # a plain timm file
        state = {f"vit.{k}": v for k, v in state.items() if not k.startswith("head.")}
    mismatch = compare_state_dicts(backbone.state_dict(), state)
    if not mismatch.is_empty():
        raise WSSSError(
            f"backbone weights file {path} does not fit {name} ({mismatch.summary()}); "
            f"pass weights of a {name} or --backbone_weights none"
        )
    backbone.load_state_dict(state, strict=True)
    logger.info("%s: weights loaded from %s", name, path)
