"""Image/mask transforms (numpy in, numpy out; Pillow and OpenCV kernels, no per-pixel Python).

Building blocks take a ``np.random.Generator``; the composed transforms returned by the ``build_*`` functions
own one, seeded from torch's per-process seed (``torch.initial_seed()``, which a DataLoader worker sets to
``base_seed + worker_id``), so a run is reproducible under ``torch.manual_seed`` and workers draw different
augmentations. The composed transforms map ``(image uint8 [H, W, 3], mask uint8 [H, W] | None)`` to
``(image float32 [3, S, S] normalised, mask int64 [S, S] with 255 = ignore | None)``; image and mask go
through the same geometry (interpolation: bicubic for images, nearest for masks; both pixel-centre aligned).

The order of the steps follows SPEC §1.3. ``augment`` selects options by substring, e.g.
``"colorjitter_randaugment"``: ``colorjitter``, ``randaugment`` (classification only) and ``clahe``.
"""

from __future__ import annotations

import logging
import os
import sys

import cv2
import numpy as np
from PIL import Image

from core.datasets.randaugment import randaugment
from core.errors import WSSSError
from core.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
KNOWN_AUGMENTS = ("colorjitter", "randaugment", "clahe")

MaskOrNone = np.ndarray | None


# Pixel-value transforms ------------------------------------------------------------------------------
def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] in 0..255 -> float32 [H, W, 3], ``(x / 255 - mean) / std`` with ImageNet statistics."""
    return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(image: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize`: float32 [H, W, 3] (or [3, H, W]) -> uint8 [H, W, 3]."""
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    return np.clip(np.rint((image * IMAGENET_STD + IMAGENET_MEAN) * 255.0), 0, 255).astype(np.uint8)


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    # torchvision's blend: factor 1 keeps the image, 0 gives `other`; clamped after every step.
    return np.clip(factor * image + (1.0 - factor) * other, 0.0, 255.0)


def _grayscale(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(image / 255.0, cv2.COLOR_RGB2HSV)  # float input: hue in degrees [0, 360)
    hsv[..., 0] = (hsv[..., 0] + shift * 360.0) % 360.0
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.1,
) -> np.ndarray:
    """torchvision-style ColorJitter: the four adjustments in random order, factors ``U[1-x, 1+x]``, hue ``U[-h, h]``.

    Args:
        image: uint8 [H, W, 3] RGB.

    Returns:
        uint8 [H, W, 3] RGB.
    """
    out = image.astype(np.float32)
    for step in rng.permutation(4):
        if step == 0 and brightness > 0:
            out = _blend(out, 0.0, rng.uniform(1 - brightness, 1 + brightness))
        elif step == 1 and contrast > 0:
            out = _blend(out, float(_grayscale(out).mean()), rng.uniform(1 - contrast, 1 + contrast))
        elif step == 2 and saturation > 0:
            out = _blend(out, _grayscale(out)[..., None], rng.uniform(1 - saturation, 1 + saturation))
        elif step == 3 and hue > 0:
            out = _shift_hue(out.astype(np.float32), rng.uniform(-hue, hue))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def clahe(image: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited histogram equalisation of the L channel of Lab: uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


# Geometry ---------------------------------------------------------------------------------------------
def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize (Pillow, antialiased when shrinking): uint8 [H, W, 3] -> uint8 [height, width, 3]."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize (Pillow, pixel-centre aligned): uint8 [H, W] -> uint8 [height, width]."""
    if mask.shape[:2] == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def _resize_pair(image: np.ndarray, mask: MaskOrNone, height: int, width: int) -> tuple[np.ndarray, MaskOrNone]:
    height, width = max(1, height), max(1, width)
    return resize_image(image, height, width), None if mask is None else resize_mask(mask, height, width)


def random_resize_long_side(
    image: np.ndarray, min_size: int, max_size: int, rng: np.random.Generator, mask: MaskOrNone = None
) -> tuple[np.ndarray, MaskOrNone]:
    """Rescale so that the longer side is ``s ~ U{min_size..max_size}`` (inclusive), keeping the aspect ratio.

    Args:
        image: uint8 [H, W, 3]; mask: uint8 [H, W] or None.

    Returns:
        (uint8 [h, w, 3], uint8 [h, w] or None) with ``max(h, w) == s``.
    """
    size = int(rng.integers(min_size, max_size + 1))
    height, width = image.shape[:2]
    scale = size / max(height, width)
    return _resize_pair(image, mask, round(height * scale), round(width * scale))


def resize_short_side(image: np.ndarray, size: int, mask: MaskOrNone = None) -> tuple[np.ndarray, MaskOrNone]:
    """Rescale so that the shorter side equals ``size`` (torchvision ``Resize(int)``)."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    return _resize_pair(image, mask, round(height * scale), round(width * scale))


def random_hflip(
    image: np.ndarray, rng: np.random.Generator, mask: MaskOrNone = None, p: float = 0.5
) -> tuple[np.ndarray, MaskOrNone]:
    """Mirror image (and mask) left-right with probability ``p``."""
    if rng.random() >= p:
        return image, mask
    return np.ascontiguousarray(image[:, ::-1]), None if mask is None else np.ascontiguousarray(mask[:, ::-1])


def _paste(array: np.ndarray, crop: int, fill: float, offsets: tuple[int, int, int, int]) -> np.ndarray:
    # offsets = (src_y, src_x, dst_y, dst_x); copied extent = min(size, crop) per axis.
    src_y, src_x, dst_y, dst_x = offsets
    h, w = min(array.shape[0], crop), min(array.shape[1], crop)
    canvas = np.full((crop, crop) + array.shape[2:], fill, dtype=array.dtype)
    canvas[dst_y : dst_y + h, dst_x : dst_x + w] = array[src_y : src_y + h, src_x : src_x + w]
    return canvas


def _random_offsets(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    # A longer side is cut at a random window; a shorter one is pasted at a random place (SPEC §1.3).
    if length > crop:
        return int(rng.integers(0, length - crop + 1)), 0
    return 0, int(rng.integers(0, crop - length + 1))


def random_crop(
    image: np.ndarray, crop: int, rng: np.random.Generator, mask: MaskOrNone = None
) -> tuple[np.ndarray, MaskOrNone]:
    """Random ``crop x crop`` window; sides shorter than ``crop`` are padded (image 0, mask 255).

    Args:
        image: float32 [H, W, 3], already normalised (so 0 is the mean colour).
        mask: uint8 [H, W] or None.

    Returns:
        (float32 [crop, crop, 3], uint8 [crop, crop] or None).
    """
    src_y, dst_y = _random_offsets(image.shape[0], crop, rng)
    src_x, dst_x = _random_offsets(image.shape[1], crop, rng)
    offsets = (src_y, src_x, dst_y, dst_x)
    out_mask = None if mask is None else _paste(mask, crop, IGNORE_INDEX, offsets)
    return _paste(image, crop, 0.0, offsets), out_mask


def top_left_crop(image: np.ndarray, crop: int, mask: MaskOrNone = None) -> tuple[np.ndarray, MaskOrNone]:
    """The top-left ``crop x crop`` window, padded at the bottom/right (image 0, mask 255)."""
    out_mask = None if mask is None else _paste(mask, crop, IGNORE_INDEX, (0, 0, 0, 0))
    return _paste(image, crop, 0.0, (0, 0, 0, 0)), out_mask


def to_chw(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] -> contiguous float32 [3, H, W]."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def _finish_mask(mask: MaskOrNone) -> MaskOrNone:
    return None if mask is None else mask.astype(np.int64)


# Composed transforms ----------------------------------------------------------------------------------
def parse_augment(augment: str | None) -> set[str]:
    """The options named in an ``--augment`` string (substring match, as the reference does)."""
    text = (augment or "").lower()
    return {name for name in KNOWN_AUGMENTS if name in text}


def _torch_process_seed() -> tuple[int | None, int | None]:
    # Read torch's seed only when torch is already loaded: this module does not import torch itself.
    torch = sys.modules.get("torch")
    if torch is None:
        return None, None
    info = torch.utils.data.get_worker_info()
    return torch.initial_seed(), None if info is None else info.id


class RandomTransform:
    """Base of the composed transforms: owns a numpy Generator that follows torch's per-process seed.

    Args:
        seed: None (default) seeds from ``torch.initial_seed()`` in each process (0 without torch);
            an int gives a fixed stream (mixed with the DataLoader worker id inside workers).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple | None = None

    @property
    def rng(self) -> np.random.Generator:
        torch_seed, worker_id = _torch_process_seed()
        key = (os.getpid(), torch_seed)
        if self._rng is None or key != self._rng_key:
            if self.seed is None:
                entropy: int | list[int] = torch_seed if torch_seed is not None else 0
            else:
                entropy = [self.seed] if worker_id is None else [self.seed, worker_id]
            self._rng, self._rng_key = np.random.default_rng(entropy), key
        return self._rng

    def __call__(self, image: np.ndarray, mask: MaskOrNone = None) -> tuple[np.ndarray, MaskOrNone]:
        raise NotImplementedError


class TrainTransform(RandomTransform):
    """Random resize -> flip -> colour options -> normalise -> random crop -> CHW (SPEC §1.3).

    Args:
        min_size, max_size: longer side drawn from ``min..max``; equal values resize to a ``min x min`` square.
        crop: output side S (None: no crop, the image keeps its resized size).
        augment: option string, see :func:`parse_augment`.
        joint: segmentation mode: RandAugment is refused and CLAHE comes after ColorJitter.
        seed: see :class:`RandomTransform`.
    """

    def __init__(
        self,
        min_size: int,
        max_size: int,
        crop: int | None,
        augment: str = "",
        joint: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if min_size < 1 or max_size < min_size:
            raise WSSSError(
                f"resize range {min_size}..{max_size} is invalid; pass --min_image_size <= --max_image_size"
            )
        self.min_size, self.max_size, self.crop, self.joint = min_size, max_size, crop, joint
        self.options = parse_augment(augment)
        if joint and "randaugment" in self.options:
            logger.warning("randaugment moves the image but not the mask; it is not applied to segmentation samples")
            self.options.discard("randaugment")

    def __call__(self, image: np.ndarray, mask: MaskOrNone = None) -> tuple[np.ndarray, MaskOrNone]:
        rng = self.rng
        if self.min_size == self.max_size:
            image, mask = _resize_pair(image, mask, self.min_size, self.min_size)
        else:
            image, mask = random_resize_long_side(image, self.min_size, self.max_size, rng, mask)
        image, mask = random_hflip(image, rng, mask)
        if "clahe" in self.options and not self.joint:
            image = clahe(image)
        if "colorjitter" in self.options:
            image = color_jitter(image, rng)
        if "clahe" in self.options and self.joint:
            image = clahe(image)
        if "randaugment" in self.options:
            image = randaugment(image, rng)
        normalized = normalize(image)
        if self.crop:
            normalized, mask = random_crop(normalized, self.crop, rng, mask)
        return to_chw(normalized), _finish_mask(mask)


class ValidationTransform(RandomTransform):
    """Shorter side -> ``crop``, (CLAHE), normalise, top-left crop/pad to ``crop x crop``, CHW. Deterministic."""

    def __init__(self, crop: int, augment: str = "") -> None:
        super().__init__(seed=0)
        self.crop = crop
        self.options = parse_augment(augment)

    def __call__(self, image: np.ndarray, mask: MaskOrNone = None) -> tuple[np.ndarray, MaskOrNone]:
        image, mask = resize_short_side(image, self.crop, mask)
        if "clahe" in self.options:
            image = clahe(image)
        normalized, mask = top_left_crop(normalize(image), self.crop, mask)
        return to_chw(normalized), _finish_mask(mask)


def build_classification_transform(
    min_size: int, max_size: int, crop: int | None, augment: str = "", seed: int | None = None
) -> TrainTransform:
    """Training transform of the CAM classifiers: ``(image, mask=None) -> (float32 [3, crop, crop], mask)``.

    RandAugment (when selected) changes the image only, so a mask passed along is not aligned with it.
    """
    return TrainTransform(min_size, max_size, crop, augment, joint=False, seed=seed)


def build_segmentation_transform(
    min_size: int, max_size: int, crop: int | None, augment: str = "", seed: int | None = None
) -> TrainTransform:
    """Joint image+mask training transform: ``(image, mask) -> (float32 [3, crop, crop], int64 [crop, crop])``."""
    return TrainTransform(min_size, max_size, crop, augment, joint=True, seed=seed)


def build_validation_transform(crop: int, augment: str = "") -> ValidationTransform:
    """Validation transform: ``(image, mask=None) -> (float32 [3, crop, crop], int64 [crop, crop] | None)``."""
    return ValidationTransform(crop, augment)
