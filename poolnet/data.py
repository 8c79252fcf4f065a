"""PoolNet's data: the saliency-PNG folder check, the training and test datasets, and how batches are formed.

* Training items are an image (RGB floats 0..255 [3, H, W], the network normalises) and its saliency label
  (``PNG / 255``, float [1, H, W]), randomly mirrored. Images of different sizes are batched by **padding** to the
  largest height and width of the batch (bottom/right, black image, label 0); a ``valid`` mask keeps padded pixels
  out of the loss. With ``--batch_size 1`` nothing is padded (the reference's setting).
* Test batches hold images of one size only (ids are grouped by size), so a batch of any size computes exactly what
  batch 1 computes.
* Images whose shorter side is at most ``small_side`` (100 in the reference) are upscaled x2 first; at test time the
  map is resized back to the image size. (The reference skipped such images in training and upscaled them at test.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from core.datasets import DataSource
from core.datasets.transforms import RandomTransform, random_hflip, resize_image
from core.errors import WSSSError, first_ids

logger = logging.getLogger(__name__)

SINGLE_CHANNEL_MODES = ("L", "P", "1")


def upscaled_size(height: int, width: int, small_side: int) -> tuple[int, int]:
    """(H, W) doubled when ``min(H, W) <= small_side`` (0 turns it off), else unchanged."""
    if small_side and min(height, width) <= small_side:
        return 2 * height, 2 * width
    return height, width


def saliency_png(sal_dir: Path, image_id: str) -> Path:
    return Path(sal_dir) / f"{image_id}.png"


def read_saliency_label(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A saliency PNG as float32 [H, W] in [0, 1] (``value / 255``); one-line WSSSError when it cannot be a label.

    Args:
        size: the (H, W) of its image; a PNG of another size is refused.
    """
    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
            if mode not in SINGLE_CHANNEL_MODES:
                raise WSSSError(
                    f"saliency PNG {path} is a {mode} image; PoolNet trains on single-channel 8-bit PNGs (0..255, "
                    "255 = salient) such as scripts/ccam/inference_crf.py writes"
                )
            if size is not None and (height, width) != tuple(size):
                raise WSSSError(
                    f"saliency PNG {path} is {width}x{height} but its image is {size[1]}x{size[0]}; "
                    "regenerate the saliency maps at the image size"
                )
            values = np.array(image.convert("L") if mode == "1" else image, dtype=np.float32)
    except OSError as e:
        raise WSSSError(f"cannot decode saliency PNG {path} ({e}); delete it and produce it again") from e
    return values / np.float32(255.0)


def check_saliency_folder(source: DataSource, sal_dir: Path, flag: str = "--sal_dir") -> dict[str, tuple[int, int]]:
    """Check that ``sal_dir`` holds a usable ``<id>.png`` for every id of ``source`` before training starts.

    Reads PNG and image headers only (no pixels). Returns id -> image (H, W).

    Raises:
        WSSSError: missing folder; missing PNGs (how many, the first few); a PNG that is not single-channel or not
            of its image's size.
    """
    sal_dir = Path(sal_dir)
    if not sal_dir.is_dir():
        raise WSSSError(f"{flag} {sal_dir} does not exist; pass the folder of saliency PNGs (C²AM-H + CRF output)")
    missing = [i for i in source.ids if not saliency_png(sal_dir, i).is_file()]
    if missing:
        raise WSSSError(
            f"{flag} {sal_dir} lacks {len(missing)} of the {len(source.ids)} PNGs of --domain {source.domain} "
            f"(first: {first_ids(missing)}); produce them for this domain or pass the domain they were made for"
        )
    sizes = {}
    for image_id in source.ids:
        size = source.image_size(image_id)
        path = saliency_png(sal_dir, image_id)
        try:
            with Image.open(path) as image:
                mode, (width, height) = image.mode, image.size
        except OSError as e:
            raise WSSSError(f"cannot decode saliency PNG {path} ({e}); delete it and produce it again") from e
        if mode not in SINGLE_CHANNEL_MODES or (height, width) != size:
            read_saliency_label(path, size)  # raises the message of the problem
        sizes[image_id] = size
    return sizes


class SaliencyTransform(RandomTransform):
    """Upscale small images x2, mirror at random (training), and make CHW float tensors (no normalisation)."""

    def __init__(self, small_side: int, flip: bool, seed: int | None = None) -> None:
        super().__init__(seed)
        self.small_side, self.flip = small_side, flip

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        height, width = upscaled_size(*image.shape[:2], self.small_side)
        image = resize_image(image, height, width)
        if mask is not None:
            mask = np.array(Image.fromarray(mask).resize((width, height), Image.Resampling.BILINEAR))
        if self.flip:
            image, mask = random_hflip(image, self.rng, mask)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        return chw, mask


class SaliencyDataset(Dataset):
    """Images with their saliency labels: ``{"id", "image" float [3, H, W] 0..255, "label" float [1, H, W] 0..1}``."""

    def __init__(self, source: DataSource, sal_dir: Path, sizes: dict[str, tuple[int, int]], small_side: int) -> None:
        self.source, self.sal_dir, self.sizes = source, Path(sal_dir), sizes
        self.ids = list(source.ids)
        self.transform = SaliencyTransform(small_side, flip=True)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = self.source.read_image(image_id)
        label = read_saliency_label(saliency_png(self.sal_dir, image_id), image.shape[:2])
        image, label = self.transform(image, label)
        return {"id": image_id, "image": torch.from_numpy(image), "label": torch.from_numpy(label)[None]}


def pad_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of different sizes: pad images and labels to the largest (H, W) at the bottom/right.

    Returns:
        ``{"id": [B], "image" [B, 3, H, W], "label" [B, 1, H, W], "valid" bool [B, 1, H, W]}``.
    """
    height = max(int(item["image"].shape[-2]) for item in items)
    width = max(int(item["image"].shape[-1]) for item in items)
    images = torch.zeros(len(items), 3, height, width)
    labels = torch.zeros(len(items), 1, height, width)
    valid = torch.zeros(len(items), 1, height, width, dtype=torch.bool)
    for k, item in enumerate(items):
        h, w = item["image"].shape[-2:]
        images[k, :, :h, :w] = item["image"]
        labels[k, :, :h, :w] = item["label"]
        valid[k, :, :h, :w] = True
    return {"id": [item["id"] for item in items], "image": images, "label": labels, "valid": valid}


class TestImages(Dataset):
    """Images to predict: ``{"id", "image" float [3, h, w] 0..255 (upscaled when small), "size" (H, W)}``."""

    def __init__(self, source: DataSource, ids: Sequence[str], small_side: int) -> None:
        self.source, self.ids = source, list(ids)
        self.transform = SaliencyTransform(small_side, flip=False)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = self.source.read_image(image_id)
        chw, _ = self.transform(image)
        return {"id": image_id, "image": torch.from_numpy(chw), "size": tuple(image.shape[:2])}


def same_size_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": [item["id"] for item in items],
        "image": torch.stack([item["image"] for item in items]),
        "size": [item["size"] for item in items],
    }


class SizeGroupedBatches(Sampler[list[int]]):
    """Batches of at most ``batch_size`` indices whose (network input) sizes are equal, in a fixed order."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(tuple(size), []).append(index)
        self.batches = [
            indices[start : start + batch_size]
            for indices in groups.values()
            for start in range(0, len(indices), batch_size)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)
