"""Train a CAM classifier with a sub-category head: SC-CAM (METHODS §10) and Sub-category Teaching (§11).

Loss: ``L = MLSM(z_parent, ỹ) + λ · MLSM(z_sub, y_sub)`` with the sub-labels of
``scripts/cam/cluster_subcategories.py`` (``--subcategory_weight`` λ: 5 for SC-CAM, 2 for Sub-category Teaching;
0 gives the vanilla loss). ``--knowledge_distillation true`` adds ``λ_kd · MLSM(z_parent / T, σ(z_teacher / T))``
with a frozen teacher classifier (``--teacher_weights``, e.g. a ViT of ``train_vanilla.py --architecture
vit_base_patch16_224``) run on the same batch. (The school project's flag of that name only switches the
sub-labels to the teacher's clusters, which here is the feature file you cluster.)

Both heads are bias-free 1x1 convolutions on the backbone's features; the CAMs come from the parent head, and the
saved weights load as a plain classifier (the sub-category head is dropped), so ``scripts/cam/inference.py``
takes them unchanged. Each SC-CAM round trains from the initial weights again (``--backbone_weights``), not from
the previous round's model; runners/sc-cam.sh chains the rounds.

Reads:  <data_dir> images and labels of --domain_train; --subcategories (its ids must cover --domain_train);
        --teacher_weights with --knowledge_distillation true; GT masks of --domain_valid with --validate true
Writes: experiments/models/<tag>.pth (both heads); experiments/models/<tag>/{last.pth, args.json, log.txt,
        metrics.jsonl, manifest.json}
Example:
    python scripts/cam/train_subcategory.py --tag sc-cam/voc12-r50-round1 --data_dir $WSSS_DATA_DIR \\
        --subcategories experiments/predictions/sc-cam/voc12-r50-round0@train_aug@kmeans=10
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core import cli, engine
from core.cam import subcategory, training
from core.cam.subcategory import SubLabels
from core.datasets import DataSource, source_from_args
from core.errors import WSSSError
from core.models import SubcategoryClassifier

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_subcategory", description=__doc__.splitlines()[0], add_help=add_help)
    training.add_cam_data_args(parser)
    training.add_classifier_args(parser)
    subcategory.add_subcategory_args(parser)
    engine.add_training_args(parser)
    return parser


def read_sub_labels(args: argparse.Namespace, source: DataSource) -> SubLabels:
    """The sub-category file, checked against --domain_train before any folder is created."""
    path = subcategory.resolve_file(args.subcategories, subcategory.SUBCATEGORIES_FILE, "--subcategories")
    data = subcategory.load_sub_labels(path)
    args.subcategories = str(path)  # the file itself: its fingerprint enters the run's manifest
    subcategory.check_same_ids(
        data.ids,
        source.ids,
        f"--subcategories {path} (clustered on {data.dataset} {data.domain})",
        f"cluster the features of --domain_train {args.domain} (scripts/cam/cluster_subcategories.py)",
        allow_extra=True,
    )
    if data.num_subclasses == 0:
        raise WSSSError(f"--subcategories {path} has no sub-class; cluster a domain with labels")
    sizes = data.cluster_sizes()
    logger.info(
        "%d sub-classes (%s) over %d parent classes from %s",
        data.num_subclasses, data.method, len(sizes), path,
    )  # fmt: skip
    return data


def main(args: argparse.Namespace) -> dict[str, Any]:
    source = source_from_args(args)
    data = read_sub_labels(args, source)
    # Built before the run's folder exists, so a teacher of another class count stops with nothing written.
    teacher = subcategory.build_teacher(args, source.num_classes) if args.knowledge_distillation else None
    table = dict(zip(data.ids, data.sub_labels, strict=True))

    def build_network(args: argparse.Namespace, num_classes: int) -> SubcategoryClassifier:
        model = SubcategoryClassifier(
            args.architecture,
            num_classes,
            num_subclasses=data.num_subclasses,
            backbone_weights=args.backbone_weights,
            mode=args.mode,
            dilated=args.dilated,
            trainable_stem=args.trainable_stem,
            trainable_backbone=args.trainable_backbone,
            scratch_init=args.scratch_init,
        )
        if args.restore:
            training.load_classifier_weights(model, args.restore, weights_flag="--restore")
        return model

    def add_teacher(ctx: engine.TrainContext, args: argparse.Namespace, num_classes: int) -> None:
        if teacher is not None:
            ctx.add("teacher", teacher)  # no optimizer: frozen, eval mode

    return training.train_cam_generator(
        args,
        "subcategory",
        __file__,
        add_networks=add_teacher,
        build_network=build_network,
        build_step=lambda args, splitter, class_weight: subcategory.build_subcategory_step(args, table, class_weight),
    )


if __name__ == "__main__":
    cli.run(main, get_args_parser())
