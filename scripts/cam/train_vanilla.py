"""Train a vanilla CAM classifier from image-level labels (stage: cam, SPEC §4.2).

Loss: ``L = MLSM(f(x), ỹ)``, the multilabel soft-margin loss on binary-smoothed labels (``--label_smoothing``),
optionally weighted per class (``--class_weight``). The runner recipe adds ``--augment randaugment
--label_smoothing 0.1``; the result also initialises P-NOC's ordinary classifier.

Reads:  <data_dir> images and labels of --domain_train (default train_aug);
        GT masks of --domain_valid (default train) with --validate true
Writes: experiments/models/<tag>.pth (final weights, EMA if --ema true);
        experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl, manifest.json}
Example:
    python scripts/cam/train_vanilla.py --tag vanilla/voc12-rs269ls-r1 --data_dir $WSSS_DATA_DIR \\
        --architecture resnest269 --augment randaugment --label_smoothing 0.1 --mixed_precision true
    torchrun --nproc_per_node=4 scripts/cam/train_vanilla.py --tag vanilla/voc12-rs269ls-r1 ...   # same global batch
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli, engine
from core.cam import training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_vanilla", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    engine.add_training_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_cam_generator(args, "vanilla", __file__)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
