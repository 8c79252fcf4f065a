"""PSA's AffinityNet (``--method psa``, METHODS §2): pixel features at stride 8 whose mean L1 distance gives the
affinity ``a_ij = exp(-mean_k |f_ik - f_jk|)`` of two nearby pixels.

On any ResNet-family backbone of :data:`core.models.BACKBONES` (the published one is ResNet-38, conv4/conv5/conv6):
1x1 convs (no bias) on the last three feature levels (``x2``, ``x3``, ``x4`` of :class:`core.models.Backbone`) to
64/128/256 channels, ELU, concatenation, a 1x1 conv (no bias) to 448, ELU. Levels coarser than ``x2`` (stride 16
without ``--dilated``) are resized bilinearly to ``x2``'s stride-8 grid. Unlike IRN's boundary branch the whole
network trains (stem frozen, as PSA froze conv1a), with the four LR groups of SPEC §2.2 (backbone x1, new layers
x10, biases x2).

State-dict keys: ``backbone.<native key>`` and the reference's ``f8_3``, ``f8_4``, ``f8_5``, ``f9`` weights, so a
PSA checkpoint is told apart from an IRN one (``fc_edge*``) before anything is loaded. A PSA reference file of the
ResNet-38 layout (top-level ``conv1a.*``, ``b2.*``..``bn7.*``) loads too: :func:`core.models.normalize_state_dict_keys`
maps its backbone keys (where the registry has ``resnet38``), and its heads are taken back from the names SEAM's PCM
uses for the same three convs (``pcm.low/mid/fuse`` -> ``f8_3/f8_4/f9``, told apart by ``f8_5``); BatchNorm
``num_batches_tracked`` counters such files lack are filled with zeros (they change no output).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import WSSSError
from core.models import describe_state_dict, group_parameters, read_checkpoint
from core.models.compat import architecture_of, compare_state_dicts, normalize_state_dict_keys, unwrap_state_dict
from core.models.initialization import DEFAULT_SCRATCH_INIT
from core.rw.network import staged_backbone

logger = logging.getLogger(__name__)

FEATURE_STRIDE = 8  # the affinity grid's stride relative to the input image
LEVEL_CHANNELS = (64, 128, 256)  # f8_3, f8_4, f8_5 (PSA)
FEATURE_CHANNELS = 448  # f9
HEAD_LAYERS = ("f8_3", "f8_4", "f8_5", "f9")
IRN_KEY = "fc_edge"
# SEAM's PCM convs share PSA's names f8_3, f8_4, f9; the key normaliser renames them for SEAM, and a PSA file
# (which also has f8_5) takes them back.
_PCM_NAMES = {"pcm.low.": "f8_3.", "pcm.mid.": "f8_4.", "pcm.fuse.": "f9."}


class PsaAffinityNet(nn.Module):
    """PSA's AffinityNet: stride-8 pixel features whose L1 distances give the affinities (see the module docstring).

    Args:
        architecture: a ResNet/ResNeSt (or ResNet-38) key of ``core.models.BACKBONES``.
        backbone_weights: ``"imagenet"``, ``"none"`` (tests; also when a checkpoint follows) or a ``.pth`` of backbone
            or classifier weights (PSA starts from the CAM classifier's backbone).
        mode: backbone BatchNorm, ``"fix"`` (the ResNet-38 methods keep every BN frozen) or ``"normal"``.
        dilated: output stride 8 for every level (the references) instead of 16 for the last two.
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
        dilated: bool = True,
        scratch_init: str = DEFAULT_SCRATCH_INIT,
    ) -> None:
        super().__init__()
        self.backbone, channels = staged_backbone(
            architecture,
            "the PSA AffinityNet",
            "resnet*, resnest* or resnet38",
            weights=backbone_weights,
            dilated=dilated,
            mode=mode,
            trainable_stem=False,
            scratch_init=scratch_init,
        )
        self.f8_3 = nn.Conv2d(channels[2], LEVEL_CHANNELS[0], kernel_size=1, bias=False)
        self.f8_4 = nn.Conv2d(channels[3], LEVEL_CHANNELS[1], kernel_size=1, bias=False)
        self.f8_5 = nn.Conv2d(channels[4], LEVEL_CHANNELS[2], kernel_size=1, bias=False)
        self.f9 = nn.Conv2d(sum(LEVEL_CHANNELS), FEATURE_CHANNELS, kernel_size=1, bias=False)
        for layer in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(layer.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)  # PSA's initialisation of f9
        self.model_kwargs: dict[str, Any] = {
            "architecture": architecture,
            "backbone_weights": "none",
            "mode": mode,
            "dilated": bool(dilated),
        }

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The four named LR groups: the backbone's (stem frozen) and the new layers'."""
        return group_parameters(pretrained=[self.backbone], scratch=[getattr(self, n) for n in HEAD_LAYERS])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel features of a batch.

        Args:
            images: float [B, 3, H, W], normalised; H and W multiples of 8 keep the grid aligned with the image.

        Returns:
            float [B, 448, h, w] >= -1 (ELU), ``(h, w)`` the backbone's stride-8 grid (``ceil(H/8), ceil(W/8)``).
        """
        _, _, x2, x3, x4 = self.backbone(images)
        size = x2.shape[-2:]
        levels = []
        for layer, x in ((self.f8_3, x2), (self.f8_4, x3), (self.f8_5, x4)):
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            levels.append(F.elu(layer(x)))
        return F.elu(self.f9(torch.cat(levels, dim=1)))

    @torch.no_grad()
    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """Features of one image zero-padded (the normalised mean colour) at the bottom/right to a multiple of 8,
        as PSA's inference does (no mirror image).

        Args:
            image: float [3, H, W], normalised, on the network's device.

        Returns:
            float32 [448, ceil(H/8), ceil(W/8)], on the image's device.
        """
        height, width = image.shape[-2:]
        grid_h, grid_w = math.ceil(height / FEATURE_STRIDE), math.ceil(width / FEATURE_STRIDE)
        padded = F.pad(image[None], (0, grid_w * FEATURE_STRIDE - width, 0, grid_h * FEATURE_STRIDE - height))
        return self(padded).float()[0, :, :grid_h, :grid_w]


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------


def psa_state_dict(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The state dict of a PSA AffinityNet checkpoint in the current layout (see the module docstring)."""
    state_dict = normalize_state_dict_keys(unwrap_state_dict(raw, name))
    if "f8_5.weight" in state_dict:
        state_dict = {_psa_head_key(key): value for key, value in state_dict.items()}
    return state_dict


def _psa_head_key(key: str) -> str:
    for pcm, psa in _PCM_NAMES.items():
        if key.startswith(pcm):
            return psa + key[len(pcm) :]
    return key


def _with_batch_counters(expected: Mapping[str, torch.Tensor], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` plus zero ``num_batches_tracked`` counters for the BatchNorm layers it has without them."""
    for key, value in expected.items():
        layer = key.removesuffix("num_batches_tracked")
        if layer != key and key not in given and f"{layer}running_mean" in given:
            given[key] = torch.zeros_like(value, device="cpu")
    return given


def check_psa_keys(state_dict: Mapping[str, Any], name: str, flag: str) -> None:
    """WSSSError (one line) unless ``state_dict`` is a PSA AffinityNet's: an IRN AffinityNet says to pass
    ``--method irn``, anything else what it holds."""
    if any(key.startswith(IRN_KEY) for key in state_dict):
        raise WSSSError(
            f"{flag} {name} holds an IRN AffinityNet (boundary branch fc_edge*), not a PSA one; pass --method irn, "
            "or weights of scripts/rw/train_affinity.py --method psa"
        )
    if not all(f"{layer}.weight" in state_dict for layer in HEAD_LAYERS):
        raise WSSSError(
            f"{flag} {name} holds a {describe_state_dict(state_dict)}, not a PSA AffinityNet (no f8_3/f8_4/f8_5/f9 "
            "keys); pass the weights written by scripts/rw/train_affinity.py --method psa"
        )


def load_psa_affinity_net(
    path: str | os.PathLike,
    architecture: str | None = None,
    *,
    mode: str = "fix",
    dilated: bool = True,
    trusted: bool = False,
    device: str | torch.device = "cpu",
    flag: str = "--model_name",
) -> PsaAffinityNet:
    """Build a PSA AffinityNet and load its weights for inference: eval mode, on ``device``.

    Args:
        path: the ``.pth`` written by ``scripts/rw/train_affinity.py --method psa``.
        architecture: the backbone; None reads it from the file's block counts.
        mode, dilated: as the network was trained.
        trusted: allow full unpickling of legacy files (see ``core.models.read_checkpoint``).
        flag: the flag that named ``path``, for messages.

    Raises:
        WSSSError: unreadable file, an IRN AffinityNet or another network, weights of another backbone.
    """
    name = os.fspath(path)
    state_dict = psa_state_dict(read_checkpoint(path, trusted=trusted), name)
    check_psa_keys(state_dict, name, flag)
    held = architecture_of(state_dict)
    architecture = architecture or held
    if architecture is None:
        raise WSSSError(
            f"{flag} {path}: cannot tell the backbone of {describe_state_dict(state_dict)}; pass --architecture"
        )
    model = PsaAffinityNet(architecture, backbone_weights="none", mode=mode, dilated=dilated)
    state_dict = _with_batch_counters(model.state_dict(), state_dict)
    mismatch = compare_state_dicts(model.state_dict(), state_dict)
    if not mismatch.is_empty():
        raise WSSSError(
            f"{flag} {path} holds a PSA AffinityNet on {held or describe_state_dict(state_dict)}, which does not fit "
            f"the {architecture} one ({mismatch.summary()}); pass --architecture {held} or weights of a "
            f"{architecture} PSA AffinityNet"
        )
    model.load_state_dict(state_dict, strict=True)
    logger.info("loaded PSA AffinityNet weights from %s", path)
    return model.to(device).eval()
