"""Train a CAM classifier with EPS: explicit pseudo-pixel supervision by a saliency map (stage: cam, METHODS §5).

The classifier has C + 1 maps, the background last; ``L = MLSM(GAP(A_{1..C}), ỹ) + L_sal`` with
``L_sal = MSE(λ M_fg + (1 - λ)(1 - M_bg), S)``: present classes whose rounded softmax overlaps the rounded saliency by
more than τ (``--eps_tau`` 0.4) make ``M_fg``, the others join the background channel in ``M_bg`` (λ = ``--eps_lambda``
0.5; see core/cam/eps.py). ``--sal_dir`` is a folder of saliency PNGs, as the project's saliency stages write them.
``--ppc true`` adds PPC (θ 0.10, k = hw/16 as the PPC EPS branch; the second view is the batch resized to 128x128,
and L_cls, L_sal are averaged over both views). CAMs: scripts/cam/inference.py recognises the checkpoint and keeps the
foreground channels of the softmax (the background channel is not used), so they read like any other CAM files.

Recipe defaults (the EPS runner): lr 0.01, batch 8, crop 448, longer side 256-512, wd 5e-4. The reference counts
``max_iters`` = 20,000 batches of 8 instead of epochs; here the engine runs epochs: ``--max_epoch`` E gives
E x floor(images / batch) optimizer steps, so ``max_iters`` ≈ E x 10,582 // 8 on VOC train_aug (E = 15 gives 19,830).

Reads:  <data_dir> images and labels of --domain_train (default train_aug); <sal_dir>/<id>.png for each of them
Writes: experiments/models/<tag>.pth (final weights, EMA if --ema true);
        experiments/models/<tag>/{last.pth, args.json, log.txt, metrics.jsonl, manifest.json}
Example:
    python scripts/cam/train_eps.py --tag eps/voc12-r50 --data_dir $WSSS_DATA_DIR --architecture resnet50 \\
        --sal_dir experiments/predictions/saliency/voc12-pn --max_epoch 15
    torchrun --nproc_per_node=4 scripts/cam/train_eps.py --tag eps/voc12-r50-ppc --ppc true ...   # same global batch
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli, engine
from core.cam import eps, methods, ppc, training
from core.datasets import source_from_args
from core.datasets.transforms import build_segmentation_transform

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_eps", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    eps.add_eps_args(parser)
    engine.add_training_args(parser, lr=0.01, batch_size=8, wd=5e-4)
    parser.set_defaults(image_size=448, min_image_size=256, max_image_size=512, ppc_bg=0.10, ppc_topk=1 / 16)
    return parser


def build_network(args: argparse.Namespace, num_classes: int) -> eps.EPSClassifier:
    """EPS's classifier (C + 1 maps, background last), with PPC's projection head under ``--ppc true``."""
    config = ppc.PPCConfig.from_args(args)
    model = training.classifier_from_flags(
        args, num_classes, args.trainable_backbone, network=eps.EPSClassifier, ppc_dim=config.dim if config else None
    )
    return training.load_restore_weights(model, args)


def build_dataset(args: argparse.Namespace, source) -> eps.SaliencyDataset:
    """Images, labels and saliency maps, flipped and cropped together."""
    transform = build_segmentation_transform(args.min_image_size, args.max_image_size, args.image_size, args.augment)
    return eps.SaliencyDataset(source, transform, args.sal_dir, args.sal_mode)


def main(args: argparse.Namespace) -> dict[str, Any]:
    eps.check_saliency_dir(args.sal_dir, list(source_from_args(args).ids))  # before any folder is created
    return training.train_cam_generator(
        args,
        "eps",
        __file__,
        build_network=build_network,
        build_step=lambda args, splitter, class_weight: eps.build_eps_step(
            args, methods.classification_loss(float(args.label_smoothing), class_weight)
        ),
        build_dataset=build_dataset,
        supports_ppc=True,
    )


if __name__ == "__main__":
    cli.run(main, get_args_parser())
