"""Add the SBD augmentation to Pascal VOC 2012: SegmentationClassAug PNGs and the train_aug list.

Reads:  <sbd_dir>/{train,val}.txt, <sbd_dir>/cls/<id>.mat (GTcls.Segmentation),
        <voc_dir>/ImageSets/Segmentation/{train,val}.txt, <voc_dir>/JPEGImages
Writes: <voc_dir>/SegmentationClassAug/<id>.png (index PNGs, 0..20 and 255; existing files are kept),
        <voc_dir>/ImageSets/Segmentation/{train_aug,trainval_aug}.txt
Example:
    python tools/prepare_voc12.py --voc_dir data/VOCdevkit/VOC2012 --sbd_dir data/benchmark_RELEASE/dataset

train_aug = (SBD train + SBD val + VOC train) - VOC val, sorted: 10,582 ids for the real data. Original VOC files
(SegmentationClass, the VOC lists) are never modified; readers prefer SegmentationClass where it exists.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from core import cli
from core.artifacts import atomic_write
from core.datasets.base import check_mask_values, read_id_list
from core.errors import WSSSError

logger = logging.getLogger(__name__)

EXPECTED_COUNTS = {"train": 1464, "val": 1449, "train_aug": 10582}
NUM_VOC_CLASSES = 20


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("prepare_voc12", description=__doc__.split("\n")[0], add_help=add_help)
    cli.add_arg(parser, "--voc_dir", type=str, required=True, help=".../VOCdevkit/VOC2012")
    cli.add_arg(
        parser, "--sbd_dir", type=str, required=True, help=".../benchmark_RELEASE/dataset (holds cls/ and train.txt)"
    )
    cli.add_arg(parser, "--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="conversion processes")
    return parser


def read_sbd_mask(mat_path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file: uint8 [H, W], values 0..20 (and 255)."""
    from scipy.io import loadmat

    try:
        gt = loadmat(str(mat_path), squeeze_me=True, struct_as_record=False)["GTcls"]
        mask = np.asarray(gt.Segmentation)
    except (OSError, KeyError, AttributeError, ValueError) as e:
        raise WSSSError(f"cannot read GTcls.Segmentation from {mat_path} ({e}); re-extract the SBD archive") from e
    check_mask_values(mask, NUM_VOC_CLASSES, mat_path)
    return mask.astype(np.uint8)


def convert_one(paths: tuple[Path, Path]) -> str:
    """Convert one ``.mat`` to an index PNG (atomic write). Returns the id."""
    mat_path, png_path = paths
    buffer = io.BytesIO()
    Image.fromarray(read_sbd_mask(mat_path), mode="L").save(buffer, format="PNG")
    with atomic_write(png_path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    return png_path.stem


def convert_all(jobs: list[tuple[Path, Path]], num_workers: int) -> None:
    """Run :func:`convert_one` over ``jobs`` with a progress bar, in a process pool when ``num_workers > 1``."""
    progress = tqdm(total=len(jobs), desc="SBD .mat -> png", unit="mask", disable=None)
    if num_workers > 1 and len(jobs) > 1:
        with Pool(num_workers) as pool:  # a worker's exception is re-raised here by imap
            for _ in pool.imap_unordered(convert_one, jobs, chunksize=16):
                progress.update()
    else:
        for job in jobs:
            convert_one(job)
            progress.update()
    progress.close()


def read_required_list(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise WSSSError(f"{what} list {path} does not exist; check the folder passed with its flag")
    return read_id_list(path)


def write_list(path: Path, ids: list[str]) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def check_counts(counts: dict[str, int]) -> list[str]:
    """Warn (and return the messages) for every list whose size differs from the real VOC/SBD numbers."""
    warnings = []
    for name, expected in EXPECTED_COUNTS.items():
        if counts.get(name) != expected:
            warnings.append(f"{name} has {counts.get(name)} ids, the standard VOC/SBD setup gives {expected}")
            logger.warning("%s (fine for a subset or synthetic data)", warnings[-1])
    return warnings


def main(args: argparse.Namespace) -> dict:
    voc_dir, sbd_dir = Path(args.voc_dir), Path(args.sbd_dir)
    for folder, flag in ((voc_dir, "--voc_dir"), (sbd_dir / "cls", "--sbd_dir")):
        if not folder.is_dir():
            raise WSSSError(f"folder {folder} does not exist; check {flag}")
    lists_dir = voc_dir / "ImageSets" / "Segmentation"
    voc_train = read_required_list(lists_dir / "train.txt", "VOC train")
    voc_val = read_required_list(lists_dir / "val.txt", "VOC val")
    sbd_ids = sorted(
        set(read_required_list(sbd_dir / "train.txt", "SBD train"))
        | set(read_required_list(sbd_dir / "val.txt", "SBD val"))
    )

    out_dir = voc_dir / "SegmentationClassAug"
    missing_mat = [i for i in sbd_ids if not (sbd_dir / "cls" / f"{i}.mat").is_file()]
    if missing_mat:
        logger.warning(
            "%d SBD ids have no cls/<id>.mat (first: %s); they are left out", len(missing_mat), missing_mat[0]
        )
    available = sorted(set(sbd_ids) - set(missing_mat))
    jobs = [
        (sbd_dir / "cls" / f"{i}.mat", out_dir / f"{i}.png") for i in available if not (out_dir / f"{i}.png").is_file()
    ]
    logger.info(
        "%d SBD masks, %d already converted, %d to convert", len(available), len(available) - len(jobs), len(jobs)
    )
    convert_all(jobs, args.num_workers)

    train_aug = sorted((set(available) | set(voc_train)) - set(voc_val))
    write_list(lists_dir / "train_aug.txt", train_aug)
    write_list(lists_dir / "trainval_aug.txt", sorted(set(train_aug) | set(voc_val)))
    counts = {"train": len(voc_train), "val": len(voc_val), "train_aug": len(train_aug)}
    warnings = check_counts(counts)

    no_image = [i for i in train_aug if not (voc_dir / "JPEGImages" / f"{i}.jpg").is_file()]
    no_mask = [
        i
        for i in train_aug
        if not (out_dir / f"{i}.png").is_file() and not (voc_dir / "SegmentationClass" / f"{i}.png").is_file()
    ]
    if no_image or no_mask:
        logger.warning("train_aug: %d ids without image, %d without any mask", len(no_image), len(no_mask))
    logger.info("wrote %s (%d ids) and %d masks to %s", lists_dir / "train_aug.txt", len(train_aug), len(jobs), out_dir)
    return {
        "converted": len(jobs),
        **counts,
        "missing_mat": len(missing_mat),
        "no_image": len(no_image),
        "no_mask": len(no_mask),
        "warnings": warnings,
    }


if __name__ == "__main__":
    cli.run(main, get_args_parser())
