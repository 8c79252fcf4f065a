"""Multi-scale + flip prediction of a segmentation network on one image (SPEC §10.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.multiscale import flip_pairs_batch, resize_bicubic


def multiscale_probs(
    model: nn.Module,
    image: np.ndarray,
    scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    *,
    device: torch.device | str,
    flip: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Class probabilities of one image, as the reference's segmentation inference computes them.

    Per scale: PIL bicubic resize, one forward of (image, mirrored image), logits bilinearly resized to the image
    size, logit + un-mirrored mirror logit; the mean over scales goes through a softmax. (The flip pair is summed,
    not averaged, as in the reference: the softmax is that of twice the mean logit.) The model must be on
    ``device`` and in eval mode.

    Args:
        model: ``forward(x [B, 3, h, w]) -> logits [B, K, h, w]``.
        image: uint8 [H, W, 3] RGB.
        scales: resize factors.
        flip: add the mirrored image (False: one forward per scale, no doubling).
        amp_dtype: autocast dtype of the forward (None: fp32).
        channels_last: feed channels-last tensors.

    Returns:
        float32 [K, H, W] on ``device``, each pixel summing to 1.
    """
    if not scales:
        raise ValueError("multiscale_probs needs at least one scale")
    device = torch.device(device)
    height, width = image.shape[:2]
    total = None
    with torch.inference_mode():
        for scale in scales:
            batch = flip_pairs_batch([resize_bicubic(image, scale)], device, channels_last)
            if not flip:
                batch = batch[:1]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(batch)
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            summed = logits[0] + logits[1].flip(-1) if flip else logits[0]
            total = summed if total is None else total + summed
        return torch.softmax(total / len(scales), dim=0)
