"""Train C²AM-H (the name the P-NOC README and seed-001 use): the same script as ``scripts/ccam/train_hints.py``.

Reads and writes what train_hints.py does; every flag is the same (``--help`` lists them).
Example:
    python scripts/ccam/train_with_cam_hints.py --tag voc12-ccamh-rs269@rs269pnoc --architecture resnest269 \\
        --stage4_out_features 1024 --fg_threshold 0.4 --cams_dir experiments/predictions/pnoc/voc12-rs269 ...
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli
from core.ccam import training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return training.get_args_parser("ccam_train_with_cam_hints", __doc__.splitlines()[0], hints=True, add_help=add_help)


def main(args: argparse.Namespace) -> dict[str, Any]:
    # Recorded as train_hints.py, so both names make the same run (same manifest id; --resume works across them).
    return training.train_ccam(args, __file__.replace("train_with_cam_hints", "train_hints"), hints=True)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
