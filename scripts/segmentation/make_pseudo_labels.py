"""Pseudo labels for segmentation training from random-walk folders: the same script as
scripts/rw/make_pseudo_labels.py (same flags, same output, same manifest), under the path the seed README uses.

Reads:  see scripts/rw/make_pseudo_labels.py
Writes: see scripts/rw/make_pseudo_labels.py
Example:
    python scripts/segmentation/make_pseudo_labels.py --dataset voc12 --data_dir $WSSS_DATA_DIR \\
        --domains train_aug,val --experiment_name "rw/voc12-an@{domain}@beta=10@exp_times=8@rw" --threshold 0.3 \\
        --crf_t 1 --crf_gt_prob 0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core import cli, pseudo_masks

# Recorded in the manifest as the RW script, so either entry point resumes the other's folder.
RW_SCRIPT = Path(__file__).resolve().parent.parent / "rw" / "make_pseudo_labels.py"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_pseudo_labels", description=__doc__.split("\n\n")[0], add_help=add_help)
    pseudo_masks.add_rw_pseudo_label_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    return pseudo_masks.make_rw_pseudo_labels(args, RW_SCRIPT)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
