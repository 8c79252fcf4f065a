"""Map post-processing and multi-scale + flip inference, shared by the CAM stage (class maps, SPEC §5) and the saliency
stage (the one-plane C²AM map, SPEC §7.3).

Conventions: ``keys`` are 1-based label-map indices (VOC class ``c`` of the 0-based classifier output is key
``c + 1``; 0 is the background); CAM planes are stored only for the keys, with no background plane.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.artifacts import strided_size
from core.datasets.transforms import normalize
from core.labels import check_keys

logger = logging.getLogger(__name__)

CAM_EPS = 1e-5
CAM_STRIDE = 4  # stride of the low-resolution ``cam`` array
UP_STRIDE = 16  # ``hr_cam`` is resized to a multiple of this, then cropped


def max_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Divide every map of float [..., h, w] by its own spatial max + 1e-5 (maps are expected >= 0)."""
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + CAM_EPS)


def normalize_cams(raw: torch.Tensor) -> torch.Tensor:
    """``ReLU(raw)`` divided by its per-channel spatial max + 1e-5 (the reference's ``make_cam``).

    Args:
        raw: float [..., h, w], e.g. [B, C, h, w] raw class maps.

    Returns:
        Same shape, values in [0, 1); each channel with a positive value has its max just below 1, others are 0.
    """
    return max_normalize(F.relu(raw))


def imagenet_normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W], ``(x / 255 - mean) / std`` with ImageNet statistics."""
    return np.ascontiguousarray(normalize(image).transpose(2, 0, 1))


def resize_bicubic(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize uint8 [H, W, 3] to ``(round(scale * H), round(scale * W))`` with PIL bicubic, as the reference does."""
    height, width = image.shape[:2]
    size = (round(width * scale), round(height * scale))
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"scale {scale} shrinks a {height}x{width} image to nothing")
    return np.asarray(Image.fromarray(image).resize(size, resample=Image.BICUBIC))


def flip_pairs_batch(images: Sequence[np.ndarray], device: torch.device, channels_last: bool) -> torch.Tensor:
    """Each normalised image followed by its mirror: float32 [2B, 3, h, w] on ``device``, channels-last if asked.

    The images must share one size. Channels-last is the [h, w, 3] layout normalisation already produces, so that
    batch is built without the transpose copy; the values are the same either way.
    """
    hwc = [normalize(image) for image in images]
    if channels_last:
        pairs = np.stack([view for x in hwc for view in (x, x[:, ::-1])])  # [2B, h, w, 3]
        return torch.from_numpy(pairs).to(device).permute(0, 3, 1, 2)
    singles = torch.from_numpy(np.stack(hwc).transpose(0, 3, 1, 2).copy())  # [B, 3, h, w]
    return torch.stack([singles, singles.flip(-1)], dim=1).flatten(0, 1).to(device)


ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid}


def _flip_pair_maps(
    model: nn.Module,
    images: Sequence[np.ndarray],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> torch.Tensor:
    """Raw maps of every image and of its mirror from one forward pass: float32 [B, 2, C, h, w]."""
    batch = flip_pairs_batch(images, device, channels_last)
    with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        _, maps = model(batch, with_cam=True)
    return maps.float().unflatten(0, (len(images), 2))


def _merge_flips(pair: torch.Tensor, channels: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Activated maps of an image plus the un-flipped maps of its mirror: [2, C, h, w] -> float32 [n, h, w].

    ``channels`` (long [n], 0-based) selects classes before any resizing, which is exact because the later bilinear
    resizing and summing act on each channel separately; None keeps all C channels.
    """
    if channels is not None:
        if channels.numel() and int(channels.max()) >= pair.shape[1]:
            raise ValueError(f"keys up to {int(channels.max()) + 1} but the model has only {pair.shape[1]} classes")
        pair = pair[:, channels]
    pair = ACTIVATIONS[activation](pair)
    return pair[0] + pair[1].flip(-1)


def _resize_sum(per_scale: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Bilinear-resize each [n, h_s, w_s] map to ``size`` (align_corners=False) and sum over scales: [n, *size]."""
    resized = [F.interpolate(m.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0] for m in per_scale]
    return torch.stack(resized).sum(dim=0)


def _cam_pair(per_scale: list[torch.Tensor], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``cam`` (stride 4) and ``hr_cam`` (``H x W``, via the stride-16 size) of one image's per-scale maps."""
    cam = _resize_sum(per_scale, strided_size(height, width, CAM_STRIDE))
    up_h, up_w = strided_size(height, width, UP_STRIDE)
    hr_cam = _resize_sum(per_scale, (up_h * UP_STRIDE, up_w * UP_STRIDE))[:, :height, :width]
    return max_normalize(cam).cpu().numpy().astype(np.float32), max_normalize(hr_cam).cpu().numpy().astype(np.float32)


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {tuple(image.shape)}")


CamTriple = tuple[np.ndarray, np.ndarray, np.ndarray]


def multiscale_cams(
    model: nn.Module,
    image: np.ndarray,
    scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    *,
    device: torch.device | str,
    keys: Sequence[int] | np.ndarray | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    output_size: tuple[int, int] | None = None,
    activation: str = "relu",
    average: bool = False,
) -> CamTriple:
    """Multi-scale + horizontal-flip CAMs of one image, reproducing the reference's ``inference.py``.

    Per scale: PIL bicubic resize to ``(round(s*W), round(s*H))``, ImageNet normalisation, one forward of the pair
    (image, mirrored image) with ``with_cam=True``, ReLU, map + un-flipped mirror map. ``cam`` sums the scales after
    bilinear resizing to ``(ceil(H/4), ceil(W/4))``; ``hr_cam`` sums them after resizing to
    ``(16*ceil(H/16), 16*ceil(W/16))`` and crops the top-left ``H x W`` (which lines the cells of a stride-16 model
    up with their pixels; it also makes ``hr_cam`` flip-equivariant only when H and W are multiples of 16). Each kept
    plane is divided by its own max + 1e-5.
    The model must already be on ``device`` and in eval mode.

    Args:
        model: classifier whose ``forward(x, with_cam=True)`` returns ``(logits [2, C], maps [2, C, h, w])``.
        image: uint8 [H, W, 3] RGB.
        scales: resize factors.
        device: where to run the model.
        keys: 1-based label-map indices of the classes to keep (channel ``key - 1``), normally the image's
            GT-positive classes; None keeps all C classes.
        amp_dtype: run the forward under autocast to this dtype (None: fp32); the scripts pass
            :func:`core.precision.compute_format`'s choice.
        channels_last: feed the model channels-last tensors.
        output_size: ``(H, W)`` of the original image when ``image`` was pre-resized (the reference's ``--resize``);
            default the size of ``image``.
        activation: applied to the raw maps before flipping back and resizing: ``relu`` (CAMs, default) or
            ``sigmoid`` (the C²AM map as a probability).
        average: mean over scales and flips instead of the sum (the C²AM inference; identical after the max
            normalisation up to its 1e-5).

    Returns:
        ``keys`` int64 [n] (1..C, no background slot); ``cam`` float32 [n, ceil(H/4), ceil(W/4)] in [0, 1);
        ``hr_cam`` float32 [n, H, W] in [0, 1).
    """
    (result,) = multiscale_cams_batch(
        model,
        [image],
        scales,
        device=device,
        keys=None if keys is None else [keys],
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        output_sizes=None if output_size is None else [output_size],
        activation=activation,
        average=average,
    )
    return result


def multiscale_cams_batch(
    model: nn.Module,
    images: Sequence[np.ndarray],
    scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    *,
    device: torch.device | str,
    keys: Sequence[Sequence[int] | np.ndarray] | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    output_sizes: Sequence[tuple[int, int]] | None = None,
    activation: str = "relu",
    average: bool = False,
) -> list[CamTriple]:
    """:func:`multiscale_cams` of several images of one size, with one forward pass per scale for all of them.

    The network sees ``2B`` images per pass (each image and its mirror) instead of 2, which keeps a CPU or GPU busier
    on small images; every image's maps are the ones it gets alone (the networks are per-sample in eval mode), up to
    the rounding of a batched convolution (about 1e-6 in fp32).

    Args:
        images: uint8 [H, W, 3] RGB images, all of the same H and W.
        keys: per image, as :func:`multiscale_cams`'s ``keys`` (None: all classes for every image). Images with no
            key take no part in the forward passes.
        output_sizes: per image, as :func:`multiscale_cams`'s ``output_size`` (None: the size of the images).
        model, scales, device, amp_dtype, channels_last, activation, average: as :func:`multiscale_cams`.

    Returns:
        Per image, in order, ``(keys, cam, hr_cam)`` as :func:`multiscale_cams` returns them.
    """
    if not images:
        return []
    for image in images:
        _check_image(image)
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"a batch needs images of one size, got {sorted({image.shape[:2] for image in images})}")
    if not scales:
        raise ValueError("multiscale_cams needs at least one scale")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    for name, values in (("keys", keys), ("output_sizes", output_sizes)):
        if values is not None and len(values) != len(images):
            raise ValueError(f"{len(images)} images but {len(values)} {name}")
    device = torch.device(device)
    sizes = list(output_sizes) if output_sizes is not None else [images[0].shape[:2]] * len(images)
    key_arrays = [check_keys(k) for k in keys] if keys is not None else [None] * len(images)
    active = [i for i, k in enumerate(key_arrays) if k is None or k.size]
    channels = {i: None if key_arrays[i] is None else torch.as_tensor(key_arrays[i] - 1, device=device) for i in active}

    per_scale: dict[int, list[torch.Tensor]] = {i: [] for i in active}
    with torch.inference_mode():
        if active:
            for s in scales:
                resized = [resize_bicubic(images[i], s) for i in active]
                maps = _flip_pair_maps(model, resized, device, amp_dtype, channels_last)
                for i, pair in zip(active, maps, strict=True):
                    merged = _merge_flips(pair, channels[i], activation)
                    per_scale[i].append(merged / (2 * len(scales)) if average else merged)
        results = []
        for i, (height, width) in enumerate(sizes):
            if i not in per_scale:  # no key: empty planes, no forward
                cam_h, cam_w = strided_size(height, width, CAM_STRIDE)
                empty = (np.zeros((0, cam_h, cam_w), np.float32), np.zeros((0, height, width), np.float32))
                results.append((key_arrays[i], *empty))
                continue
            cam, hr_cam = _cam_pair(per_scale[i], height, width)
            key_array = key_arrays[i] if key_arrays[i] is not None else np.arange(1, cam.shape[0] + 1, dtype=np.int64)
            results.append((key_array, cam, hr_cam))
    return results
