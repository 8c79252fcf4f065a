"""FixMatch-style RandAugment (``RandAugmentMC(n=2, m=10)``) followed by a 16x16 black cutout (SPEC §1.3 step 5).

Each of ``n`` operations is drawn with replacement from :data:`OPERATIONS` and applied with probability 0.5 at
magnitude ``v ~ U{1, ..., m-1}``, scaled as ``v * max_v / 10 + bias``. Geometric operations move the image
only: use it on classification images, never on an image/mask pair.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Operation = Callable[[Image.Image, int, np.random.Generator], Image.Image]


def _scaled(v: int, max_v: float, bias: float) -> float:
    return v * max_v / 10 + bias


def _random_sign(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _auto_contrast(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return ImageOps.equalize(img)


def _identity(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return img


def _brightness(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(_scaled(v, 0.9, 0.05))


def _color(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Color(img).enhance(_scaled(v, 0.9, 0.05))


def _contrast(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(_scaled(v, 0.9, 0.05))


def _sharpness(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(_scaled(v, 0.9, 0.05))


def _posterize(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return ImageOps.posterize(img, int(v * 4 / 10) + 4)


def _solarize(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return ImageOps.solarize(img, 256 - int(v * 256 / 10))


def _rotate(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    return img.rotate(_random_sign(int(v * 30 / 10), rng))


def _shear_x(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    shear = _random_sign(_scaled(v, 0.3, 0), rng)
    return img.transform(img.size, Image.Transform.AFFINE, (1, shear, 0, 0, 1, 0))


def _shear_y(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    shear = _random_sign(_scaled(v, 0.3, 0), rng)
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, shear, 1, 0))


def _translate_x(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    shift = int(_random_sign(_scaled(v, 0.3, 0), rng) * img.size[0])
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, shift, 0, 1, 0))


def _translate_y(img: Image.Image, v: int, rng: np.random.Generator) -> Image.Image:
    shift = int(_random_sign(_scaled(v, 0.3, 0), rng) * img.size[1])
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, shift))


OPERATIONS: dict[str, Operation] = {
    "AutoContrast": _auto_contrast,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Equalize": _equalize,
    "Identity": _identity,
    "Posterize": _posterize,
    "Rotate": _rotate,
    "Sharpness": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "Solarize": _solarize,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
}


def cutout(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Black out a ``size x size`` square at a random centre (clipped at the borders, as FixMatch's CutoutAbs).

    Args:
        image: uint8 [H, W, 3].

    Returns:
        A new uint8 [H, W, 3] array.
    """
    height, width = image.shape[:2]
    x0 = int(max(0.0, rng.uniform(0, width) - size / 2))
    y0 = int(max(0.0, rng.uniform(0, height) - size / 2))
    out = image.copy()
    out[y0 : min(height, y0 + size), x0 : min(width, x0 + size)] = 0
    return out


def randaugment(
    image: np.ndarray, rng: np.random.Generator, n: int = 2, m: int = 10, cutout_size: int = 16
) -> np.ndarray:
    """Apply FixMatch RandAugment then a black cutout.

    Args:
        image: uint8 [H, W, 3] RGB.
        rng: the transform's random generator.
        n: number of operations drawn (with replacement).
        m: magnitudes are drawn from ``1..m-1``.
        cutout_size: side of the black square (0 disables it).

    Returns:
        uint8 [H, W, 3] RGB, same size as the input.
    """
    names = list(OPERATIONS)
    pil = Image.fromarray(image)
    for op_index in rng.integers(0, len(names), size=n):
        magnitude = int(rng.integers(1, m))
        if rng.random() < 0.5:
            pil = OPERATIONS[names[op_index]](pil, magnitude, rng)
    out = np.asarray(pil.convert("RGB"))
    return cutout(out, cutout_size, rng) if cutout_size > 0 else out.copy()
