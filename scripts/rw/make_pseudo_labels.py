"""Pseudo labels from random-walk folders: argmax([threshold; rw]), an optional label CRF, the class ids, as palette
PNGs (SPEC §9.4); several domains (e.g. train_aug and val) go into one folder, the segmentation stage's masks.

Per image: background = --threshold (or 1 - saliency with --sal_dir); a pixel takes the class of its largest RW score
when that beats the background (ties go to the background), then the label CRF (--crf_t, --crf_gt_prob). Images
whose image-level label has no foreground class get all-zero masks without an RW file; domains without image labels
(e.g. test) need an RW file for every id. Each domain's RW folder comes from --experiment_name (with {domain} in it
for several domains) or --rw_dirs. When the folder is written, its masks must carry classes (USERS §1.15): a
folder that is almost all background stops the run (--min_foreground). Finished PNGs are skipped (resumable); a
rerun with other flags or inputs refuses (--overwrite true). scripts/segmentation/make_pseudo_labels.py runs the same
code.

Reads:  <RW folder>/<id>.npz per domain (CAM-format files whose hr_cam holds the RW scores, from
        scripts/rw/inference.py; legacy <id>.npy with --allow_pickle), <sal_dir>/<id>.png (optional), the
        image-level labels, the images (sizes; pixels only with --crf_t > 0)
Writes: <output>/<id>.png, uint8 palette PNG: 0 = background, 1..C = classes (default output
        experiments/predictions/<RW folder name>@crf=<crf_t>, for several domains without the @<domain> part), with
        args.json, log.txt and manifest.json (every RW folder's manifest id, flags, counts, label statistics)
Example:
    python scripts/rw/make_pseudo_labels.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domains train_aug,val \\
        --experiment_name "rw/voc12-an@{domain}@beta=10@exp_times=8@rw" --threshold 0.3 --crf_t 1 --crf_gt_prob 0.9
    (writes experiments/predictions/rw/voc12-an@beta=10@exp_times=8@rw@crf=1/)
"""

from __future__ import annotations

import argparse
from typing import Any

from core import cli, pseudo_masks


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_pseudo_labels", description=__doc__.split("\n\n")[0], add_help=add_help)
    pseudo_masks.add_rw_pseudo_label_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    return pseudo_masks.make_rw_pseudo_labels(args, __file__)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
