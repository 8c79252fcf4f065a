"""Transforms: exact values of the building blocks, image/mask alignment, and seeding."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from core.datasets.randaugment import OPERATIONS, cutout, randaugment
from core.datasets.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_classification_transform,
    build_segmentation_transform,
    build_validation_transform,
    color_jitter,
    denormalize,
    normalize,
    parse_augment,
    random_crop,
    random_hflip,
    random_resize_long_side,
    resize_short_side,
    to_chw,
    top_left_crop,
)

# Well separated colours, one per mask value 0..4 (255 = ignore is drawn grey).
CLASS_COLORS = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], dtype=np.uint8)


def drawn_mask(height: int = 90, width: int = 120) -> np.ndarray:
    """Rectangles, a disk and a triangle of classes 1-4 plus an ignore stripe: uint8 [H, W]."""
    mask = np.zeros((height, width), np.uint8)
    mask[10:40, 8:50] = 1
    cv2.circle(mask, (85, 30), 18, 2, -1)
    cv2.fillPoly(mask, [np.array([[20, 85], [60, 50], [70, 85]], np.int32)], 3)
    mask[55:80, 80:112] = 4
    mask[:, 60:63] = 255
    return mask


def image_from_mask(mask: np.ndarray) -> np.ndarray:
    image = np.full(mask.shape + (3,), 128, np.uint8)
    valid = mask != 255
    image[valid] = CLASS_COLORS[mask[valid]]
    return image


def assert_aligned(image_chw: np.ndarray, mask: np.ndarray, min_agreement: float = 0.995) -> None:
    """Classify each output pixel by its nearest class colour and compare with the mask away from edges."""
    pixels = denormalize(image_chw).astype(np.int64)
    distances = ((pixels[:, :, None, :] - CLASS_COLORS[None, None].astype(np.int64)) ** 2).sum(-1)
    predicted = distances.argmin(-1)
    interior = np.zeros(mask.shape, bool)
    for value in range(len(CLASS_COLORS)):
        region = (mask == value).astype(np.uint8)
        interior |= cv2.erode(region, np.ones((5, 5), np.uint8), borderType=cv2.BORDER_REPLICATE).astype(bool)
    assert interior.sum() > 0.3 * (mask != 255).sum() > 0
    agreement = (predicted[interior] == mask[interior]).mean()
    assert agreement >= min_agreement, agreement


def test_normalize_values_and_inverse():
    image = np.array([[[255, 0, 128]]], np.uint8)
    expected = (np.array([1.0, 0.0, 128 / 255]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(normalize(image)[0, 0], expected, rtol=1e-6)
    assert normalize(image).dtype == np.float32
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(denormalize(normalize(original)), original)
    np.testing.assert_array_equal(denormalize(to_chw(normalize(original))), original)
    assert to_chw(normalize(original)).shape == (3, 5, 7)


def test_random_resize_long_side_range_and_aspect():
    rng = np.random.default_rng(0)
    image, mask = np.zeros((60, 90, 3), np.uint8), drawn_mask(60, 90)
    sizes = set()
    for _ in range(60):
        out, out_mask = random_resize_long_side(image, 40, 44, rng, mask)
        sizes.add(out.shape[1])
        assert out.shape[:2] == out_mask.shape and out.shape[0] == round(out.shape[1] * 60 / 90)
        assert set(np.unique(out_mask)) <= set(np.unique(mask))  # nearest: no new values
    assert sizes == {40, 41, 42, 43, 44}
    out, _ = resize_short_side(image, 32)
    assert out.shape == (32, 48, 3)


def test_random_crop_pads_and_cuts():
    rng = np.random.default_rng(0)
    small = np.ones((10, 12, 3), np.float32)
    out, out_mask = random_crop(small, 16, rng, np.ones((10, 12), np.uint8))
    assert out.shape == (16, 16, 3) and out_mask.shape == (16, 16)
    assert (out_mask == 1).sum() == 120 and (out_mask == 255).sum() == 256 - 120
    np.testing.assert_array_equal(out[..., 0] == 1, out_mask == 1)  # image padded with 0 exactly where mask is 255
    big = np.arange(20 * 30 * 3, dtype=np.float32).reshape(20, 30, 3)
    out, _ = random_crop(big, 16, rng)
    y, x = divmod(int(out[0, 0, 0]) // 3, 30)
    np.testing.assert_array_equal(out, big[y : y + 16, x : x + 16])
    tall = np.arange(40 * 8 * 3, dtype=np.float32).reshape(40, 8, 3) + 1
    out, _ = random_crop(tall, 16, rng)
    assert (out[:, :, 0] > 0).sum() == 16 * 8  # cut vertically, padded horizontally


def test_top_left_crop_is_exact():
    image = np.arange(5 * 20 * 3, dtype=np.float32).reshape(5, 20, 3)
    mask = np.full((5, 20), 7, np.uint8)
    out, out_mask = top_left_crop(image, 8, mask)
    np.testing.assert_array_equal(out[:5], image[:, :8])
    assert (out[5:] == 0).all() and (out_mask[5:] == 255).all() and (out_mask[:5] == 7).all()


def test_hflip_mirrors_image_and_mask_together():
    image, mask = image_from_mask(drawn_mask()), drawn_mask()

    class Always:
        def random(self):
            return 0.0

    flipped, flipped_mask = random_hflip(image, Always(), mask)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(flipped_mask, mask[:, ::-1])
    same, same_mask = random_hflip(image, np.random.default_rng(0), mask, p=0.0)
    assert same is image and same_mask is mask


def test_color_jitter_identity_brightness_and_grey_invariance():
    rng = np.random.default_rng(0)
    image = rng.integers(30, 200, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(color_jitter(image, rng, 0, 0, 0, 0), image)
    ratios = [color_jitter(image, rng, 0.3, 0, 0, 0).mean() / image.mean() for _ in range(30)]
    assert 0.69 <= min(ratios) < 0.9 and 1.1 < max(ratios) <= 1.31
    grey = np.repeat(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8), 3, axis=2)
    np.testing.assert_array_equal(color_jitter(grey, rng, 0, 0, 0.3, 0.1), grey)  # no hue, no saturation to change


def test_randaugment_cutout_and_operations():
    rng = np.random.default_rng(0)
    white = np.full((64, 64, 3), 255, np.uint8)
    out = randaugment(white, rng, n=0)
    black = out.min(-1) == 0
    ys, xs = np.nonzero(black)
    assert 0 < black.sum() <= 256 and black.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # one clipped 16x16 square
    assert cutout(white, 16, np.random.default_rng(1)).shape == white.shape
    image = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for name, op in OPERATIONS.items():
        result = np.asarray(op(Image.fromarray(image), 5, rng))
        assert result.shape == image.shape, name
    first = randaugment(image, np.random.default_rng(7))
    np.testing.assert_array_equal(first, randaugment(image, np.random.default_rng(7)))
    assert len(OPERATIONS) == 14


def test_parse_augment_and_segmentation_refuses_randaugment(caplog):
    assert parse_augment("colorjitter_randaugment") == {"colorjitter", "randaugment"}
    assert parse_augment("") == set() and parse_augment(None) == set()
    with caplog.at_level(logging.WARNING):
        transform = build_segmentation_transform(64, 96, 48, augment="colorjitter_randaugment")
    assert transform.options == {"colorjitter"} and "randaugment" in caplog.text


@pytest.mark.parametrize("crop", [48, 160])  # 160 > resized image: padding path
def test_segmentation_transform_keeps_image_and_mask_aligned(crop):
    mask = drawn_mask()
    image = image_from_mask(mask)
    transform = build_segmentation_transform(100, 180, crop, seed=0)
    for _ in range(6):
        out, out_mask = transform(image, mask)
        assert out.shape == (3, crop, crop) and out.dtype == np.float32
        assert out_mask.shape == (crop, crop) and out_mask.dtype == np.int64
        assert_aligned(out, out_mask)


def test_classification_and_validation_transforms_keep_alignment():
    mask = drawn_mask()
    image = image_from_mask(mask)
    classification = build_classification_transform(60, 150, 64, seed=1)
    for _ in range(4):
        out, out_mask = classification(image, mask)
        assert_aligned(out, out_mask)
    square = build_classification_transform(70, 70, 64, seed=1)
    no_ignore = np.where(mask == 255, 0, mask).astype(np.uint8)
    out, out_mask = square(image_from_mask(no_ignore), no_ignore)
    assert out.shape == (3, 64, 64) and (out_mask != 255).all()  # a 70x70 square always covers the crop: no padding
    validation = build_validation_transform(64)
    out, out_mask = validation(image, mask)
    assert out.shape == (3, 64, 64) and out_mask.shape == (64, 64)
    assert_aligned(out, out_mask)
    again, again_mask = validation(image, mask)
    np.testing.assert_array_equal(out, again)
    image_only, none_mask = validation(image)
    assert none_mask is None and np.array_equal(image_only, out)


def test_colour_augmentations_keep_alignment():
    mask = np.where(drawn_mask() == 255, 0, drawn_mask()).astype(np.uint8)
    image = image_from_mask(mask)  # black background, saturated objects
    transform = build_segmentation_transform(100, 180, 64, augment="colorjitter", seed=3)
    for _ in range(6):
        out, out_mask = transform(image, mask)
        # Jitter moves colours (even hues) but not pixels: bright = object must still hold away from edges.
        bright = denormalize(out).max(-1) > 60
        objects = (out_mask > 0) & (out_mask != 255)
        interior = cv2.erode(objects.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        exterior = cv2.erode((out_mask == 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert interior.sum() > 100 and exterior.sum() > 100
        assert bright[interior].mean() > 0.99 and bright[exterior].mean() < 0.01
    clahe_out, _ = build_segmentation_transform(100, 100, 64, augment="clahe", seed=3)(image, mask)
    assert clahe_out.shape == (3, 64, 64) and np.isfinite(clahe_out).all()


def test_transforms_follow_torch_seed_and_fixed_seed():
    image = image_from_mask(drawn_mask())
    outputs = []
    for torch_seed in (11, 11, 12):
        torch.manual_seed(torch_seed)
        transform = build_classification_transform(60, 150, 48, augment="colorjitter_randaugment")
        outputs.append(np.stack([transform(image)[0] for _ in range(3)]))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])
    assert not np.array_equal(outputs[0][0], outputs[0][1])  # the stream advances between calls
    fixed = [build_classification_transform(60, 150, 48, seed=5)(image)[0] for _ in range(2)]
    np.testing.assert_array_equal(fixed[0], fixed[1])


class _SameImage(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform, self.image = transform, image_from_mask(drawn_mask())

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return self.transform(self.image)[0]


def test_dataloader_workers_are_reproducible_and_distinct():
    torch.set_num_threads(1)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(
            _SameImage(build_classification_transform(60, 150, 48, augment="colorjitter")), batch_size=1, num_workers=2
        )
        runs.append(torch.cat(list(loader)).numpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0][0], runs[0][1])  # items 0 and 1 come from different workers
