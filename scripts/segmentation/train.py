"""Train DeepLabV3+ on a label folder (pseudo masks) or the ground truth (the fully supervised upper bound).

Cross-entropy with 255 ignored (and --label_smoothing), SGD (--optimizer momentum: Nesterov, the runner's choice) with
poly LR, backbone x1 / ASPP and decoder x10, random resize + flip (+ colorjitter, CutMix) crops, AMP, torchrun with
SyncBatchNorm when BatchNorm is used, --resume. Every epoch ends with a full-image validation on --domain_valid
against its ground truth (--validate_against labels: against the label folder, the reference's choice). Before
training, every mask of the label folder is read: missing masks, wrong sizes, values outside 0..C and 255, or labels
that are almost all background stop the run with one line naming the files.

Reads:  <data_dir> images of --domain_train (default train_aug); masks of experiments/predictions/<label_name>,
        --masks_dir, or the dataset's ground truth; GT masks of --domain_valid (default val)
Writes: experiments/models/<tag>.pth (--final_weights last|best); experiments/models/<tag>/{last.pth, best.pth,
        args.json, log.txt, metrics.jsonl, manifest.json}
Example:
    torchrun --nproc_per_node=4 scripts/segmentation/train.py --tag seg/voc12-d3p-rs269@rw --dataset voc12 \\
        --data_dir $WSSS_DATA_DIR --label_name "rw/voc12@train_aug@beta=10@exp_times=8@rw@crf=1" \\
        --architecture resnest269 --use_gn true --optimizer momentum --lr 0.007 --wd 4e-5 --max_epoch 15 \\
        --batch_size 32 --label_smoothing 0.1 --augment colorjitter --min_image_size 320 --max_image_size 640 \\
        --mixed_precision true
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli
from core.segmentation import training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return training.get_args_parser("segmentation_train", __doc__.splitlines()[0], add_help=add_help)


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_segmentation(args, __file__)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
