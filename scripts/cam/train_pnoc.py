"""Train a CAM generator with P-NOC: Puzzle-CAM plus an adversarially trained ordinary classifier (SPEC §4.6).

Two networks, two optimizers, alternating on every batch:

* CAM generator ``cg``: ``L_cg = L_c + L_p + a_p(t)·L_re + a_o(t)·L_o`` as in train_poc.py (``a_p`` 0 -> ``--alpha`` 4
  over the first 50 % of the steps, ``a_o`` 0.3 -> 1.0 over the run), ``L_o`` from the OC on the soft-masked image.
* Ordinary classifier ``oc`` (initialised from ``--oc-pretrained``, frozen BatchNorm), every
  ``--oc-train-interval-steps`` batches: ``L_noc = a_w(t)·MLSM(oc(x·1[M̂_r <= δ]), ỹ)``; it learns to recognise
  ALL labels, the erased class included, from what lies outside the generator's CAM (``δ = --oc_train_mask_t``,
  ``a_w`` ``--ow-init`` 0 -> ``--ow`` 0.5 over the run). Its optimizer uses ``--lr`` x ``--lr_alpha_oc`` and its own
  poly schedule; the generator, via ``L_o``, is pushed to cover the evidence the OC still finds.

``--oc-grad-leak`` (default false): the reference lets the generator's backward of ``a_o·L_o`` also accumulate
gradients in the OC's parameters, which the OC's next step then applies (SPEC §13.2.1). Default false trains the
documented objective (the OC learns from ``L_noc`` only: its parameters are kept out of the generator's graph);
true reproduces the reference for parity experiments.

Reads:  <data_dir> images and labels of --domain_train (default train_aug); --oc-pretrained weights;
        GT masks of --domain_valid (default train) with --validate true
Writes: experiments/models/<tag>.pth (generator weights, EMA if --ema true); with --oc-persist true also
        experiments/models/<tag>-oc.pth, written first (<tag>.pth marks both complete);
        experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl, manifest.json}
Example:
    torchrun --nproc_per_node=4 scripts/cam/train_pnoc.py --tag pnoc/voc12-rs269-pnoc-b16-lr0.1-ls@rs269-r1 \\
        --data_dir $WSSS_DATA_DIR --architecture resnest269 --batch_size 16 --accumulate_steps 2 \\
        --label_smoothing 0.1 --mixed_precision true --ow 1.0 \\
        --oc-architecture resnest269 --oc-pretrained experiments/models/vanilla/voc12-rs269ls-r1.pth
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from core import cli, engine
from core.cam import methods, training
from core.cam.occse import LabelSplitter

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_pnoc", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    methods.add_puzzle_args(parser, alpha=4.0)
    methods.add_oc_args(parser)
    methods.add_pnoc_args(parser)
    engine.add_training_args(parser)
    return parser


def add_adversary(ctx: engine.TrainContext, args: argparse.Namespace, num_classes: int) -> LabelSplitter:
    """The ordinary classifier ``oc``, trained against the generator with its own LR, schedule and clipping."""
    oc = methods.build_ordinary_classifier(args, num_classes, trainable=True)
    training.add_trained_classifier(
        ctx,
        "oc",
        oc,
        args,
        lr_alpha=args.lr_alpha_oc,
        steps_divisor=args.oc_train_interval_steps,
        max_grad_norm=args.max_grad_norm_oc,
        ema=False,
    )
    splitter = methods.build_label_splitter(args, num_classes)
    ctx.add_state("label_splitter", splitter)
    logger.info("OC gradient leak from the generator's loss: %s", "on (reference)" if args.oc_grad_leak else "off")
    return splitter


def oc_weights(args: argparse.Namespace, final_path: Path) -> dict[str, Path]:
    """With ``--oc-persist true``: the trained OC's weights as ``<tag>-oc.pth`` beside the generator's."""
    return {"oc": methods.oc_weights_path(final_path)} if args.oc_persist else {}


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_cam_generator(args, "pnoc", __file__, add_networks=add_adversary, also_save=oc_weights)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
