"""Train C²AM-H: C²AM guided by CAM hints, the saliency network of the P-NOC pipeline (SPEC §7.2).

``L = hint_w · L_hint + SimMax(fg) + SimMin(bg, fg) + SimMax(bg)``. The hint of an image is the max over its CAM
planes (``hr_cam`` of --cams_dir), resized bicubically to the map; ``L_hint`` is the mean BCE-with-logits of the
pixels whose hint is at least --fg_threshold towards ``1 - ε/2`` (exactly 0 for a batch without such a pixel; with
--bg_threshold also pixels below it towards ``ε/2``). Images: square resize to floor(1.15 S), random crop S, flip.

Reads:  <data_dir> images of --domain (default train_aug); --cams_dir (CAM files of that domain, made by
        scripts/cam/inference.py; its manifest becomes an input of the run); GT masks of --domain_valid (default val)
Writes: experiments/models/<tag>.pth; experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl,
        manifest.json}
Example (P-NOC README):
    python scripts/ccam/train_hints.py --tag voc12-ccamh-rs269@rs269pnoc --batch_size 128 --accumulate_steps 1 \\
        --mixed_precision true --architecture resnest269 --stage4_out_features 1024 --fg_threshold 0.4 \\
        --cams_dir experiments/predictions/pnoc/voc12-rs269@train_aug@scale=0.5,1.0,1.5,2.0 \\
        --dataset voc12 --data_dir $WSSS_DATA_DIR
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli
from core.ccam import training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return training.get_args_parser("ccam_train_hints", __doc__.splitlines()[0], hints=True, add_help=add_help)


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_ccam(args, __file__, hints=True)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
