"""Train a CAM generator with P-OC: Puzzle-CAM plus OC-CSE against a frozen ordinary classifier (SPEC §4.5).

Loss: ``L = L_c + L_p + a_p(t)·L_re + a_o(t)·L_o``, the Puzzle-CAM terms of train_puzzle.py and the OC-CSE term of
train_occse.py (soft masks from the full-image maps). ``a_p`` ramps from ``--alpha_init`` 0 to ``--alpha`` over the
first ``--alpha_schedule`` 50 % of the steps (script default ``--alpha 1.0``, runner 4.0); ``a_o`` from
``--oc-alpha-init`` 0.3 to ``--oc-alpha`` 1.0 over the run.

Reads:  <data_dir> images and labels of --domain_train (default train_aug); --oc-pretrained weights;
        GT masks of --domain_valid (default train) with --validate true
Writes: experiments/models/<tag>.pth (final weights, EMA if --ema true);
        experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl, manifest.json}
Example:
    torchrun --nproc_per_node=4 scripts/cam/train_poc.py --tag poc/voc12-rs269-poc-r1 --data_dir $WSSS_DATA_DIR \\
        --architecture resnest269 --alpha 4.0 --label_smoothing 0.1 --mixed_precision true \\
        --oc-architecture resnest269 --oc-pretrained experiments/models/vanilla/voc12-rs269ls-r1.pth
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli, engine
from core.cam import methods, training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_poc", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    methods.add_puzzle_args(parser, alpha=1.0)
    methods.add_oc_args(parser)
    engine.add_training_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_cam_generator(args, "poc", __file__, add_networks=training.add_frozen_ordinary_classifier)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
