"""Train C²AM without labels: a class-agnostic foreground map learned by contrasting pooled embeddings (SPEC §7.1).

``L = SimMax(fg) + SimMin(bg, fg) + SimMax(bg)`` over every pair of the (global) batch, cosine similarities clamped
to [5e-4, 0.9995], SimMax rank-weighted by ``exp(-α(rank - 1))``. After the first epoch the polarity of the map is
decided from its border band and stored in the weights, so inference writes foreground-high maps either way. The
reference's script crashes at HEAD (SPEC §13.1.5); this one runs.

Reads:  <data_dir> images of --domain (default train_aug; labels unused); GT masks of --domain_valid (default val)
Writes: experiments/models/<tag>.pth; experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl,
        manifest.json}
Example:
    python scripts/ccam/train.py --tag ccam/voc12-r50 --data_dir $WSSS_DATA_DIR --architecture resnet50 \\
        --backbone_weights experiments/models/moco_r50_v2.pth --batch_size 128
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli
from core.ccam import training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return training.get_args_parser("ccam_train", __doc__.splitlines()[0], hints=False, add_help=add_help)


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_ccam(args, __file__, hints=False)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
