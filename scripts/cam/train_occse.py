"""Train a CAM generator with OC-CSE: class-specific erasing against a frozen ordinary classifier (SPEC §4.4).

Loss: ``L = L_c + a_o(t)·L_o``. Per image one present class ``r`` is chosen (``--oc-strategy``); its ReLU'd map,
upsampled and divided by the batch maximum (``--oc-mask-globalnorm true``), softly erases it: ``x·(1 - M_r)``.
The frozen ordinary classifier (``--oc-pretrained``, e.g. a train_vanilla.py model) must then still recognise the
other classes but not ``r``: ``L_o = MLSM(oc(x·(1 - M_r)), smooth(y \\ r))``, whose gradient reaches the generator
through the mask. ``a_o`` ramps from ``--oc-alpha-init`` 0.3 to ``--oc-alpha`` 1.0 over the run.
The reference recipe uses ``--mode fix --trainable-stem false --dilated true``.

Reads:  <data_dir> images and labels of --domain_train (default train_aug); --oc-pretrained weights;
        GT masks of --domain_valid (default train) with --validate true
Writes: experiments/models/<tag>.pth (final weights, EMA if --ema true);
        experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl, manifest.json}
Example:
    torchrun --nproc_per_node=4 scripts/cam/train_occse.py --tag occse/voc12-rs269-occse-r1 \\
        --data_dir $WSSS_DATA_DIR --architecture resnest269 --mode fix --trainable-stem false --dilated true \\
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
    parser = argparse.ArgumentParser("train_occse", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    methods.add_oc_args(parser)
    engine.add_training_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_cam_generator(args, "occse", __file__, add_networks=training.add_frozen_ordinary_classifier)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
