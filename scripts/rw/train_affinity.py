"""Train AffinityNet: a class-boundary map on a frozen backbone, learned from affinity labels (stage: rw, SPEC §9.2).

Pairs of the stride-4 grid closer than 10 cells get affinity ``1 - max(boundary on the path between them)``; pairs
with equal labels (background or the same class) are pulled to 1, pairs with different labels to 0, uncertain (255)
pixels are left out: ``L = ((L_bg + L_fg) / 2 + L_neg) / 2``. Only the edge branch trains (one group, poly SGD).
Images: random longer side --min_image_size..--max_image_size, flip, crop --image_size; labels move with them and are
reduced to stride 4 by nearest neighbour. The reference's script crashes at HEAD (SPEC §13.1.1); this one runs.

--method psa (PSA / SEAM / PPC, METHODS §2): stride-8 features of 1x1 convs on the backbone's last three levels
(64/128/256, ELU, concatenated, 1x1 to 448, ELU); pairs closer than 5 cells get affinity exp(-mean|f_i - f_j|), with
the same targets and L = 1/4 L_bg + 1/4 L_fg + 1/2 L_neg; the whole network trains (stem frozen; backbone x1, new
layers x10, biases x2). Recipe defaults follow --method: lr 0.01 (SEAM/PPC; PSA used 0.1), wd 5e-4, batch 8,
8 epochs, crop 448 after a random longer side of 448-768, --dilated true (irn: lr 0.1, wd 1e-4, batch 32, 3 epochs,
crop 512, 320-640). Labels from make_affinity_labels.py --method psa, sampled at stride 8.

Reads:  <data_dir> images of --domain (default train_aug); --label_dir (<id>.png affinity labels of that domain,
        made by scripts/rw/make_affinity_labels.py; its manifest becomes an input of the run)
Writes: experiments/models/<tag>.pth; experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl,
        manifest.json}
Example (P-NOC runner):
    python scripts/rw/train_affinity.py --tag rw/voc12-an@rs269pnoc --architecture resnest269 --batch_size 32 \\
        --image_size 512 --min_image_size 320 --max_image_size 640 --data_dir $WSSS_DATA_DIR \\
        --label_dir experiments/predictions/pnoc/voc12-rs269@train_aug@scale=0.5,1.0,1.5,2.0@aff_fg=0.40_bg=0.10
    torchrun --nproc_per_node=4 scripts/rw/train_affinity.py ...   # same global batch
    python scripts/rw/train_affinity.py --method psa --tag rw/voc12-psa --architecture resnet38 \\
        --backbone_weights PATH --label_dir "experiments/predictions/<cams tag>@aff_la=4_ha=24" ...
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli
from core.rw import training

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return training.get_args_parser("train_affinity", __doc__.splitlines()[0], add_help=add_help)


def main(args: argparse.Namespace) -> dict[str, Any]:
    return training.train_affinity(args, __file__)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
