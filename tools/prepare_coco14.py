"""Index MS COCO 2014 for the toolkit: id lists and image-level labels derived from the semantic PNGs.

Reads:  <data_dir>/{train2014,val2014}/COCO_<split>_<id>.jpg, <data_dir>/coco_seg_anno/<id>.png
Writes: <data_dir>/lists/<split>.txt (ids with both image and PNG), <data_dir>/lists/<split>_labels.npz
        (``ids`` str [N], ``labels`` uint8 [N, 80]; no pickles)
Example:
    python tools/prepare_coco14.py --data_dir data/coco14 --num_workers 8

Images whose PNG holds no object (only background/ignore) are counted and reported; they stay in the lists,
and the classification datasets leave them out of training.
"""

from __future__ import annotations

import argparse
import logging
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core import cli
from core.artifacts import atomic_write
from core.datasets.base import decode_mask_file, label_from_mask, voc_palette
from core.datasets.coco import COCO_CLASSES
from core.errors import WSSSError

logger = logging.getLogger(__name__)

NUM_COCO_CLASSES = len(COCO_CLASSES) - 1
SPLITS = ("train2014", "val2014")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("prepare_coco14", description=__doc__.split("\n")[0], add_help=add_help)
    cli.add_arg(parser, "--data_dir", type=str, default=os.environ.get("WSSS_DATA_DIR"), help="the coco14 root")
    cli.add_arg(parser, "--domains", type=cli.str_list, default=list(SPLITS), help="comma-separated splits to index")
    cli.add_arg(parser, "--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="label processes")
    return parser


def list_split_ids(data_dir: Path, split: str) -> tuple[list[str], int, int]:
    """Ids (12 digits) having both ``<split>/COCO_<split>_<id>.jpg`` and ``coco_seg_anno/<id>.png``.

    Returns:
        (sorted ids, number of images, number of images without a PNG).
    """
    image_dir = data_dir / split
    if not image_dir.is_dir():
        raise WSSSError(f"image folder {image_dir} does not exist; check --data_dir or --domains")
    prefix = f"COCO_{split}_"
    image_ids = {n[len(prefix) : -4] for n in os.listdir(image_dir) if n.startswith(prefix) and n.endswith(".jpg")}
    mask_ids = {n[:-4] for n in os.listdir(data_dir / "coco_seg_anno") if n.endswith(".png")}
    ids = sorted(image_ids & mask_ids)
    return ids, len(image_ids), len(image_ids - mask_ids)


def label_of_png(path: Path) -> np.ndarray:
    """uint8 [80] multi-hot label of the classes present in one semantic PNG."""
    mask = decode_mask_file(path, voc_palette(), NUM_COCO_CLASSES)
    return label_from_mask(mask, NUM_COCO_CLASSES).astype(np.uint8)


def compute_labels(paths: list[Path], num_workers: int, desc: str) -> np.ndarray:
    """Labels of every PNG, in order: uint8 [N, 80] (process pool when ``num_workers > 1``)."""
    if num_workers > 1 and len(paths) > 1:
        with Pool(num_workers) as pool:  # a worker's exception is re-raised here by imap
            rows = list(tqdm(pool.imap(label_of_png, paths, chunksize=64), total=len(paths), desc=desc, disable=None))
    else:
        rows = [label_of_png(p) for p in tqdm(paths, desc=desc, disable=None)]
    return np.stack(rows) if rows else np.zeros((0, NUM_COCO_CLASSES), dtype=np.uint8)


def write_split(lists_dir: Path, split: str, ids: list[str], labels: np.ndarray) -> None:
    with atomic_write(lists_dir / f"{split}.txt") as tmp:
        Path(tmp).write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    with atomic_write(lists_dir / f"{split}_labels.npz") as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temporary name
            np.savez(f, ids=np.array(ids, dtype=str), labels=labels.astype(np.uint8))


def main(args: argparse.Namespace) -> dict:
    if not args.data_dir:
        raise WSSSError("no dataset folder given; pass --data_dir or set WSSS_DATA_DIR")
    data_dir = Path(args.data_dir)
    if not (data_dir / "coco_seg_anno").is_dir():
        raise WSSSError(
            f"folder {data_dir / 'coco_seg_anno'} does not exist; unpack the semantic PNGs there or fix --data_dir"
        )
    summary: dict[str, dict] = {}
    for split in args.domains:
        ids, num_images, without_png = list_split_ids(data_dir, split)
        if without_png:
            logger.warning(
                "%s: %d of %d images have no coco_seg_anno PNG and are left out", split, without_png, num_images
            )
        paths = [data_dir / "coco_seg_anno" / f"{i}.png" for i in ids]
        labels = compute_labels(paths, args.num_workers, desc=f"{split} labels")
        write_split(data_dir / "lists", split, ids, labels)
        no_object = int((labels.sum(axis=1) == 0).sum()) if len(ids) else 0
        logger.info("%s: %d ids listed, %d without any object (background only)", split, len(ids), no_object)
        summary[split] = {"ids": len(ids), "no_object": no_object, "without_png": without_png}
    return summary


if __name__ == "__main__":
    cli.run(main, get_args_parser())
