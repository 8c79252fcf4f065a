"""Package a folder of VOC 2012 test predictions for the PASCAL VOC evaluation server.

The server takes a tar archive holding ``results/VOC2012/Segmentation/comp6_test_cls/<id>.png`` (comp6: trained on
data outside VOC, which SBD's train_aug counts as), one single-channel class-index PNG (0..20, VOC palette) per id of
the test list. Every prediction is read and checked (single channel, values 0..C, the image's size when the data
folder is given) and rewritten as a palette PNG, then the archive is written; with --data_dir every id of --domain
must have its prediction, so an incomplete folder is refused before it is uploaded.

Reads:  <pred_dir>/<id>.png (scripts/segmentation/inference.py --domain test); optionally the VOC id list and images
Writes: <out>/results/VOC2012/Segmentation/comp6_test_cls/<id>.png and <out>/results.tar.gz
Example:
    python tools/export_voc_test.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain test \\
        --pred_dir "experiments/predictions/seg/voc12-d3p-rs269@rw@test@scale=0.5,1.0,1.5,2.0@crf=10"
"""

from __future__ import annotations

import argparse
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from core import cli, paths
from core.artifacts import PNG_SUFFIX, atomic_write, check_writable, load_label_map, save_label_map
from core.datasets import source_from_args
from core.errors import WSSSError, first_ids

logger = logging.getLogger(__name__)

RESULTS_SUBDIR = Path("results/VOC2012/Segmentation/comp6_test_cls")
ARCHIVE_NAME = "results.tar.gz"
VOC_CLASSES = 20


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("export_voc_test", description=__doc__.splitlines()[0], add_help=add_help)
    group = cli.add_dataset_args(parser, domain="test")
    cli.add_arg(group, "--pred_dir", type=str, required=True, help="folder of <id>.png predictions")
    cli.add_arg(
        group,
        "--out",
        type=str,
        default=None,
        help="export folder (default experiments/results/voc_test/<prediction folder name>)",
    )
    return parser


def expected_ids(args: argparse.Namespace, pred_dir: Path) -> tuple[list[str], Any]:
    """The ids to export: the --domain list when --data_dir is given (all must be present), else the folder's PNGs."""
    if not args.data_dir:
        ids = sorted(p.stem for p in pred_dir.glob(f"*{PNG_SUFFIX}"))
        if not ids:
            raise WSSSError(f"{pred_dir} holds no <id>.png predictions; run scripts/segmentation/inference.py first")
        return ids, None
    source = source_from_args(args)
    missing = [i for i in source.ids if not (pred_dir / f"{i}{PNG_SUFFIX}").is_file()]
    if missing:
        raise WSSSError(
            f"{len(missing)} of {len(source.ids)} ids of {args.domain} have no prediction in {pred_dir} (first: "
            f"{first_ids(missing)}); finish scripts/segmentation/inference.py --domain {args.domain} (it resumes)"
        )
    return list(source.ids), source


def export(pred_dir: Path, ids: list[str], out: Path, source: Any = None) -> Path:
    """Check and copy the predictions into the server layout under ``out`` and write the archive; returns its path."""
    num_classes = source.num_classes if source is not None else VOC_CLASSES
    target = out / RESULTS_SUBDIR
    for image_id in ids:
        labels = load_label_map(pred_dir / f"{image_id}{PNG_SUFFIX}")
        if labels.size and int(labels.max()) > num_classes:
            raise WSSSError(
                f"{pred_dir / (image_id + PNG_SUFFIX)} has class {int(labels.max())}, outside 0..{num_classes}; "
                "the server takes class indices only (no 255)"
            )
        if source is not None and labels.shape != tuple(source.image_size(image_id)):
            raise WSSSError(
                f"{pred_dir / (image_id + PNG_SUFFIX)} is {labels.shape[1]}x{labels.shape[0]}, not its image's size; "
                "predict at the original image size"
            )
        save_label_map(target / f"{image_id}{PNG_SUFFIX}", np.ascontiguousarray(labels))
    archive = out / ARCHIVE_NAME
    with atomic_write(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(out / "results", arcname="results")
    return archive


def main(args: argparse.Namespace) -> dict[str, Any]:
    pred_dir = Path(args.pred_dir)
    if not pred_dir.is_dir():
        raise WSSSError(f"--pred_dir {pred_dir} does not exist; run scripts/segmentation/inference.py first")
    out = Path(args.out) if args.out else paths.RESULTS_DIR / "voc_test" / pred_dir.name
    check_writable(out, "--out", folder=True)
    ids, source = expected_ids(args, pred_dir)
    archive = export(pred_dir, ids, out, source)
    logger.info("exported %d predictions to %s; upload %s to the VOC evaluation server", len(ids), out, archive)
    return {"exported": len(ids), "archive": str(archive), "folder": str(out / RESULTS_SUBDIR)}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
