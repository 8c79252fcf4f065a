"""Train a CAM generator with Puzzle-CAM (stage: cam, SPEC §4.3).

Loss: ``L = L_c + L_p + α(t)·L_re``. ``L_c = MLSM(f(x), ỹ)``; the batch is also cut into ``--num_pieces`` tiles
(2x2), the tile maps are stitched back into ``A_re``, ``L_p = MLSM(GAP(A_re), ỹ)`` and
``L_re = mean(|A - A_re| · y)`` over the raw maps of the present classes (``--re_loss``, ``--re_loss_option``,
``--level``). ``α`` ramps linearly from ``--alpha_init`` 0 to ``--alpha`` 4 over the first ``--alpha_schedule`` 50 %
of the steps. ``--image_size`` must be a multiple of 2 x the output stride (32, or 16 when dilated).

Reads:  <data_dir> images and labels of --domain_train (default train_aug);
        GT masks of --domain_valid (default train) with --validate true
Writes: experiments/models/<tag>.pth (final weights, EMA if --ema true);
        experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl, manifest.json}
Example:
    torchrun --nproc_per_node=4 scripts/cam/train_puzzle.py --tag puzzle/voc12-rs269-puzzle-r1 \\
        --data_dir $WSSS_DATA_DIR --architecture resnest269 --alpha 4.0 --mixed_precision true
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli, engine
from core.cam import methods, training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_puzzle", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    methods.add_puzzle_args(parser, alpha=4.0)
    engine.add_training_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_cam_generator(args, "puzzle", __file__)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
