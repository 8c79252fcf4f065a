"""The C²AM network (SPEC §2.5, METHODS §9): a backbone of the CAM stage and a one-channel class-agnostic head.

State-dict keys: ``backbone.<native key>``, ``ac_head.activation_head.weight`` [1, D3 + D4, 3, 3],
``ac_head.bn_head.*`` (the reference's names) and the buffer ``inverted`` (the polarity decision, 0 or 1).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.errors import WSSSError
from core.models import build_backbone, group_parameters
from core.models.initialization import DEFAULT_SCRATCH_INIT

logger = logging.getLogger(__name__)

PARAM_GROUPINGS = ("paper", "reference")


def _distributed_training(module: nn.Module) -> bool:
    return module.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span the global batch of all torchrun processes.

    The C²AM head normalises a single channel, so the two sums it shares per step cost nothing; with them a run on
    N processes computes the same map (and, with the gathered embeddings of :mod:`core.ccam.losses`, the same update)
    as one process with the whole batch. Single-process and in eval mode it is a plain BatchNorm2d (same keys).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _distributed_training(self):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # autograd-aware: gradients reach every process

        x32 = x.float()
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        dist.all_reduce(count)
        shape = (1, -1, 1, 1)
        mean = all_reduce(x32.sum(dim=(0, 2, 3))) / count
        centred = x32 - mean.view(shape)
        # Two passes (mean, then squared deviations): E[x²] - μ² would cancel catastrophically on large activations.
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * count / (count - 1).clamp_min(1.0)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


class Disentangler(nn.Module):
    """The C²AM head: 3x3 convolution without bias to one channel, then BatchNorm(1) (the map's logits)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.activation_head = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1, bias=False)
        self.bn_head = GlobalBatchNorm2d(1)
        nn.init.kaiming_normal_(self.activation_head.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.bn_head(self.activation_head(features))


class CCAM(nn.Module):
    """Class-agnostic activation map network: separates foreground from background without class labels.

    Args:
        architecture: a key of ``core.models.BACKBONES``.
        backbone_weights: ``"none"``, ``"imagenet"`` or a ``.pth`` path (see ``build_backbone``).
        mode: ``"normal"`` (trainable BN) or ``"fix"`` (frozen backbone BN; the head's BN always trains).
        dilated: output stride 8 instead of 16 (layer3 and layer4 keep the same stride either way).
        trainable_stem: False freezes conv1/bn1.
        trainable_backbone: False freezes the whole backbone.
        scratch_init: initialisation of a random backbone.
        stage4_out_features: the reference's flag, the channels of layer3 (1024 for every ResNet/ResNeSt but
            resnet18/34); None or 0 reads them from the backbone, a value that differs is an error.

    Attributes:
        inverted: float buffer, 1 when the map was found inverted (foreground low); :meth:`forward` with
            ``with_cam=True`` returns the map already turned foreground-high.
        model_kwargs: the arguments that rebuild the network before loading a checkpoint.
    """

    def __init__(
        self,
        architecture: str,
        *,
        backbone_weights: str | os.PathLike | None = "none",
        mode: str = "normal",
        dilated: bool = False,
        trainable_stem: bool = True,
        trainable_backbone: bool = True,
        scratch_init: str = DEFAULT_SCRATCH_INIT,
        stage4_out_features: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(
            architecture,
            weights=backbone_weights,
            dilated=dilated,
            mode=mode,
            trainable_stem=trainable_stem,
            trainable_backbone=trainable_backbone,
            scratch_init=scratch_init,
        )
        layer3 = self.backbone.stage_channels[3]
        if stage4_out_features and int(stage4_out_features) != layer3:
            raise WSSSError(
                f"--stage4_out_features {stage4_out_features} does not match {architecture}, whose layer3 has "
                f"{layer3} channels; pass --stage4_out_features {layer3} or leave it out"
            )
        self.ac_head = Disentangler(layer3 + self.backbone.out_channels)
        self.register_buffer("inverted", torch.zeros(()))
        self.model_kwargs: dict[str, Any] = {
            "architecture": architecture,
            "backbone_weights": "none",
            "mode": mode,
            "dilated": bool(dilated),
            "trainable_stem": bool(trainable_stem),
            "trainable_backbone": bool(trainable_backbone),
            "stage4_out_features": layer3,
        }

    @property
    def is_inverted(self) -> bool:
        return bool(self.inverted.item() > 0.5)

    def set_inverted(self, inverted: bool) -> None:
        self.inverted.fill_(1.0 if inverted else 0.0)

    def forward(
        self, x: torch.Tensor, with_cam: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        """Run the network.

        Args:
            x: float [B, 3, H, W], normalised image.
            with_cam: return the (polarity-corrected) map for inference instead of the training outputs.

        Returns:
            Training: ``(fg, bg, logits)``: foreground and background embeddings float [B, D3 + D4] (``P·F`` and
            ``(1 - P)·F`` summed over the map and divided by h·w, not by ΣP) and the raw map logits float
            [B, 1, h, w] (unbounded, ``P = σ(logits)``), h = H / 16.
            ``with_cam=True``: ``(mean map [B, 1], map [B, 1, h, w])``, the logits negated when ``inverted`` so that
            the foreground is high for ReLU and sigmoid alike (σ(-z) = 1 - σ(z)).
        """
        _, _, _, x3, x4 = self.backbone(x)
        features = torch.cat([x4, x3], dim=1)  # [B, D, h, w], both at the backbone's output stride
        logits = self.ac_head(features)
        if with_cam:
            oriented = -logits if self.is_inverted else logits
            return oriented.mean(dim=(2, 3)), oriented
        probs = torch.sigmoid(logits).flatten(1)  # [B, hw]
        flat = features.flatten(2)  # [B, D, hw]
        hw = flat.shape[-1]
        fg = torch.bmm(flat, probs.unsqueeze(-1)).squeeze(-1) / hw
        bg = torch.bmm(flat, (1 - probs).unsqueeze(-1)).squeeze(-1) / hw
        return fg, bg, logits

    def param_groups(self, grouping: str = "paper") -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by LR group.

        ``paper``: backbone = pretrained (x1 weights, x2 biases), head = scratch (x10 conv and BN weight, x20 BN
        bias). ``reference``: what the reference's group helper effectively builds (METHODS §9): every convolution
        weight, the head's included, at x1, conv biases at x2, and no BatchNorm affine parameter at all (they are
        frozen here; running statistics still update).
        """
        if grouping == "paper":
            return group_parameters(pretrained=[self.backbone], scratch=[self.ac_head])
        if grouping != "reference":
            raise WSSSError(f"unknown --param_groups {grouping!r}; choose one of: {', '.join(PARAM_GROUPINGS)}")
        groups: dict[str, list[nn.Parameter]] = {"pretrained_weights": [], "pretrained_biases": []}
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.requires_grad_(False)
                module.bias.requires_grad_(False)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                if module.weight.requires_grad:
                    groups["pretrained_weights"].append(module.weight)
                if module.bias is not None and module.bias.requires_grad:
                    groups["pretrained_biases"].append(module.bias)
        return groups


def probability_map(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """σ of the map logits float [B, 1, h, w], bilinearly resized to ``size``: float32 [B, 1, *size] in (0, 1)."""
    return F.interpolate(torch.sigmoid(logits.float()), size=size, mode="bilinear", align_corners=False)


def load_ccam_weights(model: CCAM, path: str | os.PathLike, trusted: bool = False, flag: str = "--weights") -> bool:
    """Load a C²AM checkpoint (ours, or the reference's layouts) into ``model``, strictly.

    Returns:
        True when the file carries the polarity decision (``inverted``); a reference checkpoint does not, and the
        model's ``inverted`` is then left at 0 for the caller to decide.

    Raises:
        WSSSError: unreadable file or another network's weights (the message names both).
    """
    from core.models import load_classifier_weights, normalize_state_dict_keys, read_checkpoint, unwrap_state_dict

    name = os.fspath(path)
    state_dict = normalize_state_dict_keys(unwrap_state_dict(read_checkpoint(path, trusted=trusted), name))
    has_polarity = "inverted" in state_dict
    if not has_polarity:
        state_dict["inverted"] = torch.zeros(())
    load_classifier_weights(model, state_dict, weights_flag=flag)
    return has_polarity
