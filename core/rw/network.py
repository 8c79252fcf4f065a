"""AffinityNet: IRN's class-boundary branch on a frozen CAM-stage backbone (SPEC §2.6, METHODS §3).

The edge branch reads the stem and the four stage outputs of any ResNet/ResNeSt of :data:`core.models.BACKBONES`;
its input widths come from the backbone itself (``Backbone.stage_channels``), so ResNet-101/152 and every ResNeSt
work (the reference chose the stem width from "50" in the architecture name, SPEC §13.1.2).

State-dict keys: ``backbone.<native key>`` (the frozen backbone), ``fc_edge{1..5}.{0,1}.*`` (1x1 conv, GroupNorm)
and ``fc_edge6.{weight,bias}``, the reference's names. :func:`load_affinity_net` also reads the reference's older
layouts (SPEC §2.4): the backbone as ``backbone.{0..4}`` (a ModuleList of stages), ``model.*``/``stage*`` keys,
``edge_layers.{0..5}`` duplicates of the edge branch, and ``path_indices_*`` buffers, which are dropped (the path
index is rebuilt for each image size by :mod:`core.rw.paths`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import WSSSError
from core.models import build_backbone, describe_state_dict, normalize_state_dict_keys, read_checkpoint
from core.models.compat import architecture_of, compare_state_dicts, unwrap_state_dict
from core.models.initialization import DEFAULT_SCRATCH_INIT

logger = logging.getLogger(__name__)

EDGE_CHANNELS = 32  # channels of each side output (IRN)
EDGE_GROUPS = 4  # GroupNorm groups of each side output
EDGE_STRIDE = 4  # the edge map's stride relative to the input image
PAD_MULTIPLE = 16  # inputs are padded to a multiple of this, so every stage output aligns with the stride-4 grid

_STAGE_LIST_KEY = re.compile(r"^backbone\.([0-4])\.")
_EDGE_DUPLICATE_KEY = re.compile(r"^edge_layers\.([0-5])\.")
_PATH_INDEX_KEY = re.compile(r"^path_indices_\d+$")


def _side_output(in_channels: int, upsample: float = 1.0) -> nn.Sequential:
    """1x1 conv (no bias) -> GroupNorm -> [bilinear upsampling] -> ReLU; indices 0 and 1 carry the weights."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, EDGE_CHANNELS, kernel_size=1, bias=False),
        nn.GroupNorm(EDGE_GROUPS, EDGE_CHANNELS),
    ]
    if upsample != 1.0:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def staged_backbone(architecture: str, network: str, choices: str, **build_kwargs: Any) -> tuple[nn.Module, tuple]:
    """``build_backbone(architecture, **build_kwargs)`` and its five feature widths (stem, four stages); a backbone
    without them (a ViT) is one line naming ``network`` and the ``choices`` of --architecture that work."""
    backbone = build_backbone(architecture, **build_kwargs)
    channels = getattr(backbone, "stage_channels", None)
    if channels is None or len(channels) != 5:
        raise WSSSError(
            f"{network} needs a backbone with a stem and four stages; {architecture} has none "
            f"(pick a {choices} --architecture)"
        )
    return backbone, tuple(channels)


class AffinityNet(nn.Module):
    """Class-boundary network: edge logits at stride 4 from the side outputs of a frozen backbone.

    Args:
        architecture: a ResNet/ResNeSt key of ``core.models.BACKBONES``.
        backbone_weights: ``"imagenet"`` (training), ``"none"`` (tests; also when a checkpoint follows) or a
            ``.pth`` of backbone or classifier weights (``backbone.*`` keys are used).
        mode: backbone BatchNorm, ``"fix"`` (reference default) or ``"normal"``; the backbone is frozen and kept in
            eval mode either way, so the two only differ in the module type.
        dilated: output stride 8 instead of 16 (the side outputs are upsampled accordingly).
        scratch_init: initialisation of a random backbone (see ``build_backbone``).

    Attributes:
        model_kwargs: the arguments that rebuild the network before loading its weights.
    """

    def __init__(
        self,
        architecture: str,
        *,
        backbone_weights: str | os.PathLike | None = "none",
        mode: str = "fix",
        dilated: bool = False,
        scratch_init: str = DEFAULT_SCRATCH_INIT,
    ) -> None:
        super().__init__()
        self.backbone, channels = staged_backbone(
            architecture,
            "AffinityNet",
            "resnet* or resnest*",
            weights=backbone_weights,
            dilated=dilated,
            mode=mode,
            trainable_backbone=False,
            scratch_init=scratch_init,
        )
        stem, c1, c2, c3, c4 = channels
        layer3_stride = 8 if dilated else 16
        self.fc_edge1 = _side_output(stem)
        self.fc_edge2 = _side_output(c1)
        self.fc_edge3 = _side_output(c2, upsample=8 / EDGE_STRIDE)
        self.fc_edge4 = _side_output(c3, upsample=layer3_stride / EDGE_STRIDE)
        self.fc_edge5 = _side_output(c4, upsample=self.backbone.output_stride / EDGE_STRIDE)
        self.fc_edge6 = nn.Conv2d(5 * EDGE_CHANNELS, 1, kernel_size=1, bias=True)
        self.model_kwargs: dict[str, Any] = {
            "architecture": architecture,
            "backbone_weights": "none",
            "mode": mode,
            "dilated": bool(dilated),
        }

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        self.backbone.eval()  # frozen: never updates BatchNorm statistics, whatever the caller asks
        return self

    def edge_layers(self) -> list[nn.Module]:
        """The trained part: ``fc_edge1..fc_edge6``."""
        return [self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4, self.fc_edge5, self.fc_edge6]

    def edge_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the edge branch (the only ones the optimizer sees, SPEC §9.2)."""
        return [p for layer in self.edge_layers() for p in layer.parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Edge logits of a batch.

        Args:
            images: float [B, 3, H, W], normalised; H and W multiples of 16 keep every side output aligned.

        Returns:
            float [B, 1, ceil(H/4), ceil(W/4)] boundary logits (unbounded; ``σ`` gives the boundary probability).
        """
        with torch.no_grad():  # the backbone is frozen: its features are constants for the edge branch
            stem, x1, x2, x3, x4 = self.backbone(images)
        sides = [self.fc_edge1(stem), self.fc_edge2(x1), self.fc_edge3(x2), self.fc_edge4(x3), self.fc_edge5(x4)]
        height, width = sides[1].shape[-2:]  # layer1's stride-4 grid; the upsampled deeper maps may overhang it
        return self.fc_edge6(torch.cat([side[..., :height, :width] for side in sides], dim=1))

    @torch.no_grad()
    def edge_map(self, image: torch.Tensor, pad_size: int | None = None) -> torch.Tensor:
        """Boundary probability of one image, averaged with its mirror image (SPEC §2.6 ``get_edge``).

        The image and its mirror are zero-padded (the normalised mean colour) at the bottom/right, up to
        ``pad_size`` when given (the reference pads to ``--image_size``, the training crop) and to a multiple of 16;
        each output is cropped to the image's stride-4 grid before the mirror's is flipped back.

        Args:
            image: float [3, H, W], normalised (``core.datasets.transforms.normalize``), on the network's device.
            pad_size: minimum padded height and width (None: only the multiple of 16).

        Returns:
            float32 [ceil(H/4), ceil(W/4)] in (0, 1), on the image's device.
        """
        height, width = image.shape[-2:]
        padded_h = _round_up(max(height, pad_size or 0), PAD_MULTIPLE)
        padded_w = _round_up(max(width, pad_size or 0), PAD_MULTIPLE)
        pair = torch.stack([image, image.flip(-1)])
        pair = F.pad(pair, (0, padded_w - width, 0, padded_h - height))
        logits = self(pair).float()[:, 0, : math.ceil(height / EDGE_STRIDE), : math.ceil(width / EDGE_STRIDE)]
        return torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------


def normalize_affinity_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map any known AffinityNet layout onto the current one (see the module docstring).

    ``path_indices_*`` buffers are dropped (never trusted: their shapes depend on the training crop);
    ``edge_layers.{i}`` duplicates are dropped when ``fc_edge*`` keys exist, else renamed to ``fc_edge{i+1}``;
    ``backbone.{k}`` stage-list keys become ``stage{k+1}`` keys, which :func:`core.models.normalize_state_dict_keys`
    maps (with ``model.*`` and ``stage*``) onto ``backbone.<native key>``.
    """
    renamed = {k: v for k, v in normalize_state_dict_keys(state_dict).items() if not _PATH_INDEX_KEY.match(k)}
    has_edges = any(key.startswith("fc_edge") for key in renamed)
    result: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        duplicate = _EDGE_DUPLICATE_KEY.match(key)
        if duplicate:
            if has_edges:
                continue
            key = f"fc_edge{int(duplicate.group(1)) + 1}." + key[duplicate.end() :]
        result[key] = value
    if any(_STAGE_LIST_KEY.match(key) for key in result):
        stages = {_STAGE_LIST_KEY.sub(lambda m: f"stage{int(m.group(1)) + 1}.", k): v for k, v in result.items()}
        result = normalize_state_dict_keys(stages)
    return result


def load_affinity_weights(
    model: AffinityNet,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    trusted: bool = False,
    flag: str = "--weights",
    name: str | None = None,
) -> None:
    """Load AffinityNet weights of any known layout into ``model`` (strict, in place).

    Args:
        source: a file path, or an already loaded checkpoint / state dict (``name`` then names it in messages).

    Raises:
        WSSSError: unreadable file, a file that is not an AffinityNet (e.g. a CAM classifier), or one of another
            backbone; the message names the file, what it holds and the fix.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "(in-memory state dict)"
    raw = read_checkpoint(source, trusted=trusted) if isinstance(source, (str, os.PathLike)) else source
    state_dict = normalize_affinity_keys(unwrap_state_dict(raw, name))
    if ("f9.weight" in state_dict or "f8_5.weight" in state_dict) and not any(
        k.startswith("fc_edge") for k in state_dict
    ):
        raise WSSSError(
            f"{flag} {name} holds a PSA AffinityNet (features f8_*/f9), not an IRN one; pass --method psa, or "
            "weights of scripts/rw/train_affinity.py --method irn"
        )
    if not any(key.startswith("fc_edge") for key in state_dict):
        raise WSSSError(
            f"{flag} {name} holds a {describe_state_dict(state_dict)}, not an AffinityNet (no fc_edge* keys); pass "
            "the weights written by scripts/rw/train_affinity.py"
        )
    mismatch = compare_state_dicts(model.state_dict(), state_dict)
    if not mismatch.is_empty():
        architecture = model.model_kwargs["architecture"]
        held = architecture_of(state_dict) or describe_state_dict(state_dict)
        raise WSSSError(
            f"{flag} {name} holds an AffinityNet on {held}, which does not fit the {architecture} AffinityNet "
            f"({mismatch.summary()}); pass --architecture {held} (and --dilated/--mode as trained) or weights of "
            f"a {architecture} AffinityNet"
        )
    model.load_state_dict(state_dict, strict=True)
    logger.info("loaded AffinityNet weights from %s", name)


def load_affinity_net(
    path: str | os.PathLike,
    architecture: str | None = None,
    *,
    mode: str = "fix",
    dilated: bool = False,
    trusted: bool = False,
    device: str | torch.device = "cpu",
    flag: str = "--weights",
) -> AffinityNet:
    """Build an AffinityNet and load its weights (any known layout) for inference: eval mode, on ``device``.

    Args:
        path: the ``.pth`` written by ``scripts/rw/train_affinity.py`` or a reference AffinityNet checkpoint.
        architecture: the backbone; None reads it from the file's block counts.
        mode, dilated: as the network was trained (the key layout does not tell them apart).
        trusted: allow full unpickling of legacy files (see ``core.models.read_checkpoint``).
        flag: the flag that named ``path``, for messages.

    Raises:
        WSSSError: see :func:`load_affinity_weights`; also when ``architecture`` is None and cannot be inferred.
    """
    state_dict = unwrap_state_dict(read_checkpoint(path, trusted=trusted), os.fspath(path))
    if architecture is None:
        architecture = architecture_of(normalize_affinity_keys(state_dict))
        if architecture is None:
            raise WSSSError(
                f"{flag} {path}: cannot tell the backbone of {describe_state_dict(state_dict)}; pass --architecture"
            )
    model = AffinityNet(architecture, backbone_weights="none", mode=mode, dilated=dilated)
    load_affinity_weights(model, state_dict, flag=flag, name=os.fspath(path))
    return model.to(device).eval()
