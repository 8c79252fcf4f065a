"""Generate the synthetic VOC 2012 benchmark (class = a small emblem on a class-agnostic striped body).

Reads:  scikit-image's bundled photos (backgrounds; no network)
Writes: <out>/{JPEGImages,Annotations,SegmentationClass,SegmentationClassAug}/<id>.*,
        <out>/ImageSets/Segmentation/{train,val,train_aug,trainval}.txt, <out>/synthetic.json
Example:
    python tools/make_synthetic_voc.py --out data/synthetic/VOC2012 --train 200 --val 100 --aug 300 --classes 10
    python scripts/cam/train_vanilla.py --dataset voc12 --data_dir data/synthetic/VOC2012 ...

The tree is an ordinary VOC layout: every stage reads it with ``--dataset voc12``. See
``core/datasets/synthetic.py`` for the design of the scenes.
"""

from __future__ import annotations

import argparse
import logging

from core import cli
from core.datasets.synthetic import MAX_CLASSES, make_synthetic_voc

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_synthetic_voc", description=__doc__.split("\n")[0], add_help=add_help)
    cli.add_arg(parser, "--out", type=str, required=True, help="destination VOC2012-like folder (created)")
    cli.add_arg(parser, "--train", type=int, default=200, help="number of train ids (with VOC and SBD-like masks)")
    cli.add_arg(parser, "--val", type=int, default=100, help="number of val ids")
    cli.add_arg(parser, "--aug", type=int, default=300, help="extra SBD-like ids added to train_aug")
    cli.add_arg(parser, "--size", type=int, default=128, help="image side in pixels")
    cli.add_arg(
        parser, "--classes", type=int, default=MAX_CLASSES, help=f"use the first K VOC classes (1..{MAX_CLASSES})"
    )
    cli.add_arg(parser, "--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    cli.add_arg(
        parser,
        "--body_tint",
        type=float,
        default=0.0,
        help="control variant: mix this share of the class's emblem colour into the body stripes, so every body "
        "pixel shows its class (default 0: class-agnostic bodies, the benchmark)",
    )
    cli.add_arg(
        parser, "--overwrite", action="store_true", help="regenerate a folder that already holds a synthetic set"
    )
    return parser


def main(args: argparse.Namespace) -> dict:
    summary = make_synthetic_voc(
        args.out,
        train=args.train,
        val=args.val,
        aug=args.aug,
        size=args.size,
        classes=args.classes,
        seed=args.seed,
        overwrite=args.overwrite,
        body_tint=args.body_tint,
    )
    logger.info(
        "splits %s; %.2f objects per image; emblems cover %.1f%% of object pixels",
        summary["splits"],
        summary["objects_per_image"],
        100 * summary["emblem_fraction"],
    )
    return summary


if __name__ == "__main__":
    cli.run(main, get_args_parser())
