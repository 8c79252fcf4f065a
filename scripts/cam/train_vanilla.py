"""Train a vanilla CAM classifier from image-level labels (stage: cam, SPEC §4.2).

Loss: ``L = MLSM(f(x), ỹ)``, the multilabel soft-margin loss on binary-smoothed labels (``--label_smoothing``),
optionally weighted per class (``--class_weight``). The runner recipe adds ``--augment randaugment
--label_smoothing 0.1``; the result also initialises P-NOC's ordinary classifier.

Reads:  <data_dir> images and labels of --domain_train (default train_aug);
        GT masks of --domain_valid (default train) with --validate true
Writes: experiments/models/<tag>.pth (final weights, EMA if --ema true);
        experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl}
Example:
    python scripts/cam/train_vanilla.py --tag vanilla/voc12-rs269ls-r1 --data_dir $WSSS_DATA_DIR \\
        --architecture resnest269 --augment randaugment --label_smoothing 0.1 --mixed_precision true
    torchrun --nproc_per_node=4 scripts/cam/train_vanilla.py --tag vanilla/voc12-rs269ls-r1 ...   # same global batch
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli, engine, runtime
from core.cam import methods, training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_vanilla", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    engine.add_training_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    run = runtime.setup(args, stage="cam")
    try:
        source, train_loader = training.build_train_data(args, run)
        valid_loader = training.build_valid_loader(args, run)
        class_weight = training.parse_class_weight(args.class_weight, source.num_classes, run.device)

        ctx = engine.TrainContext(run, steps_per_epoch=len(train_loader))
        training.add_trained_classifier(ctx, "cg", training.build_classifier(args, source.num_classes), args)
        training.log_run_plan(ctx, args)

        step_fn = methods.build_step_fn("vanilla", args, class_weight=class_weight)
        validate_fn = training.make_validate_fn(args, valid_loader, list(source.classes[1:]))
        return engine.fit(ctx, train_loader, step_fn, validate_fn)
    finally:
        run.close()


if __name__ == "__main__":
    cli.run(main, get_args_parser())
