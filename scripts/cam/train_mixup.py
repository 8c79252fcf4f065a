"""Train a CAM generator on mixed batches: Mixup-CAM, FMix-CAM or Manifold-Mixup-CAM (stage: cam, METHODS §12–14).

``--mix mixup`` blends each batch with a permutation of itself (λ ~ Beta(0.2, 0.2)); ``--mix fmix`` pastes the
partner through a low-frequency binary mask with ⌈λHW⌉ ones (λ ~ Beta(1, 1), decay δ = 3); ``--mix manifold`` blends
the hidden states at a point drawn uniformly from the input and the five backbone stage outputs. Loss:
``L = λ MLSM(f(x̃), ỹ_a) + (1 - λ) MLSM(f(x̃), ỹ_b) + λ_ent L_ent + λ_con L_con`` with the entropy of the sigmoid
outputs (``--ent``, λ_ent 0.02) and SCOPS' concentration of the class maps (``--concent``, λ_con 2e-4), see
:mod:`core.cam.mixing`. Each process mixes its own batch (under torchrun, partners come from the same process);
``--mixup_prob`` is the probability that a batch is mixed at all (default 1).
The school project's switches run unchanged: ``--mixup 1``, ``--fmix 1``, ``--manifold_mixup 1``, ``--ent 1``,
``--concent 1``, ``--max_epochs``. CAMs, inference and evaluation are the CAM stage's.

Reads:  <data_dir> images and labels of --domain_train (default train_aug);
        GT masks of --domain_valid (default train) with --validate true
Writes: experiments/models/<tag>.pth (final weights, EMA if --ema true);
        experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl, manifest.json}
Example:
    python scripts/cam/train_mixup.py --mix fmix --tag fmix/voc12-r50-r1 --data_dir $WSSS_DATA_DIR \\
        --architecture resnet50 --max_epoch 25
    torchrun --nproc_per_node=4 scripts/cam/train_mixup.py --mix manifold --tag manifold/voc12-r50-r1 ...
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli, engine
from core.cam import mixing, training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_mixup", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    mixing.add_mix_args(parser)
    engine.add_training_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    mixing.MixConfig.from_args(args, args.mix)  # bad settings fail before any folder is created
    return training.train_cam_generator(args, args.mix, __file__)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
