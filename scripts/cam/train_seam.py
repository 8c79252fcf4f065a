"""Train SEAM: equivariant attention with the Pixel Correlation Module (stage: cam, METHODS §4).

Loss: ``L = L_cls + L_min + L_ER + L_ECR`` on two views, the crop x and x' = x resized by ``--seam_view_scale``
(0.3): classification of a C+1-channel head (background first, never classified), adaptive min-pooling of the PCM
maps, equivariance of the normalised maps, and equivariant cross regularisation of each view's PCM maps by the other
view's maps with OHEM over the top ``--ecr_top`` (20 %) errors (see :mod:`core.cam.seam`). Defaults are the
published recipe: ResNet-38 (``--architecture resnet38``, frozen BatchNorm, conv1a and b2 frozen), lr 0.01, batch 8,
8 epochs, crop 448 after a random resize of the longer side to 448-768, weight decay 5e-4, colour jitter. Any
registry backbone works (``--architecture resnet50 --dilated true`` for example).

``--ppc true`` adds PPC's pixel-to-prototype contrast (the wseg system's SEAM branch, METHODS §6): a projection head
(1x1 conv -> 128, ReLU) on the last features after the dropout, the second view becomes the crop resized to a fixed
``--ppc_view_size`` (128) square, and ``L_nce = 0.1 L_cp + 0.1 L_cc + 0.1 L_intra`` contrasts the two views'
embeddings with prototypes of their PCM maps (background θ ``--ppc_bg`` 0.20, top-k ``--ppc_topk`` 1/8 of the grid,
over the global batch under torchrun). Inference is unchanged (the projection head is dropped).

The CAMs of the saved model are its PCM maps: ``scripts/cam/inference.py`` recognises a SEAM checkpoint (its PCM
weights) and writes ordinary CAM files, with the same ``--architecture``/``--mode``/``--dilated`` as here. A released
SEAM/PPC ResNet-38 ``.pth`` runs through it as well (``--architecture resnet38 --weights PATH``).

Reads:  <data_dir> images and labels of --domain_train; --backbone_weights (ResNet-38: a converted ImageNet .pth,
        core/models/resnet38.py); GT masks of --domain_valid with --validate true
Writes: experiments/models/<tag>.pth; experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl,
        manifest.json}
Example:
    python scripts/cam/train_seam.py --tag seam/voc12-r38 --data_dir $WSSS_DATA_DIR \\
        --backbone_weights experiments/models/resnet38d_imagenet.pth --mixed_precision true
    python scripts/cam/train_seam.py --tag seam-ppc/voc12-r38 --ppc true ...
    python scripts/cam/inference.py --tag seam/voc12-r38 --architecture resnet38 --mode fix --data_dir $WSSS_DATA_DIR
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli, engine
from core.cam import seam, training
from core.cam.seam import SeamClassifier

logger = logging.getLogger(__name__)

# The published recipe (SEAM's train_SEAM.py; METHODS §4, §1.1).
RECIPE = {
    "architecture": "resnet38",
    "mode": "fix",
    "dilated": True,
    "trainable_stem": False,
    "image_size": 448,
    "min_image_size": 448,
    "max_image_size": 768,
    "augment": "colorjitter",
    "batch_size": 8,
    "max_epoch": 8,
    "lr": 0.01,
    "wd": 5e-4,
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_seam", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    seam.add_seam_args(parser)
    engine.add_training_args(parser)
    parser.set_defaults(**RECIPE)
    return parser


def build_network(args: argparse.Namespace, num_classes: int) -> SeamClassifier:
    model = seam.seam_classifier(args, num_classes, args.trainable_backbone)
    return training.load_restore_weights(model, args)  # type: ignore[return-value]


def main(args: argparse.Namespace) -> dict[str, Any]:
    config = seam.SeamConfig.from_args(args)
    return training.train_cam_generator(
        args,
        "seam",
        __file__,
        build_network=build_network,
        build_step=lambda args, splitter, class_weight: seam.build_seam_step(args, class_weight, config),
        supports_ppc=True,
    )


if __name__ == "__main__":
    cli.run(main, get_args_parser())
