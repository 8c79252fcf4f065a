"""Cluster each parent class's image features into sub-categories (SC-CAM k-means, Sub-category Teaching FINCH).

Per parent class c, over the features of the images that contain c (METHODS §10-11):

* ``--clustering kmeans`` (SC-CAM): K = ``--n_clusters`` (default 10) sub-classes, scikit-learn k-means with
  ``random_state`` = ``--seed`` (default 0), 10 initialisations, at most 300 iterations: the same file for the same
  features and seed. A class with fewer images than ``--n_clusters`` is clamped to one sub-class per image (a
  warning names the class); a class without images gets no sub-class.
* ``--clustering finch`` (Sub-category Teaching): FINCH (``finch-clust``, cosine), keeping the coarsest
  partition, so K is data-driven per class; ``--n_clusters`` is not used.

An image gets one sub-class per parent class it contains (multi-hot). The feature file's ids must be exactly those
of ``--domain`` of the dataset (a file of another dataset or domain stops with one line). The log lists the cluster
sizes of every class.

Reads:  --features (features.npz of scripts/cam/extract_features.py, or its folder); the id list of --domain
Writes: experiments/predictions/<tag>@<domain>@<clustering>=<K|coarsest>/subcategories.npz (ids, sub_labels
        uint8 [N, S], parents int64 [S], method, dataset, domain) with args.json, log.txt and manifest.json
Example:
    python scripts/cam/cluster_subcategories.py --tag sc-cam/voc12-r50-round0 --data_dir $WSSS_DATA_DIR \\
        --domain train_aug --features experiments/predictions/sc-cam/voc12-r50-round0@train_aug@features
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from core import cli, manifest, paths, runtime
from core.cam import subcategory
from core.cam.subcategory import CLUSTERINGS, DEFAULT_N_CLUSTERS, SubLabels
from core.datasets import source_from_args
from core.errors import WSSSError

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("cluster_subcategories", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train_aug")
    group = parser.add_argument_group("clustering")
    cli.add_arg(group, "--features", type=str, required=True, help="features.npz of extract_features.py, or its folder")
    cli.add_arg(group, "--tag", type=str, required=True, help="run name; names the output folder")
    cli.add_arg(group, "--clustering", type=str, default="kmeans", choices=CLUSTERINGS, help="kmeans (SC-CAM) or finch")
    cli.add_arg(
        group,
        "--n_clusters",
        type=cli.positive_int,
        default=DEFAULT_N_CLUSTERS,
        help=f"k-means sub-classes per parent class (default {DEFAULT_N_CLUSTERS}; clamped to a class's image count)",
    )
    cli.add_arg(group, "--seed", type=int, default=0, help="k-means random_state")
    cli.add_arg(group, "--pred_dir", type=str, default=None, help="output folder (default <tag>@<domain>@<clustering>)")
    cli.add_overwrite_arg(group)
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    if args.pred_dir:
        return Path(args.pred_dir)
    method = f"kmeans={args.n_clusters}" if args.clustering == "kmeans" else "finch=coarsest"
    return paths.PREDICTIONS_DIR / f"{paths.check_tag(args.tag)}@{paths.domain_name(args.domain)}@{method}"


def log_cluster_sizes(data: SubLabels, class_names: list[str]) -> None:
    for parent, sizes in data.cluster_sizes().items():
        logger.info("%s: %d sub-classes of %s images", class_names[parent], len(sizes), "/".join(map(str, sizes)))


def main(args: argparse.Namespace) -> dict[str, Any]:
    source = source_from_args(args)
    features_path = subcategory.resolve_file(args.features, subcategory.FEATURES_FILE, "--features")
    features = subcategory.load_features(features_path)
    subcategory.check_same_ids(
        features.ids,
        source.ids,
        f"feature file {features_path} (extracted on {features.dataset} {features.domain})",
        f"extract the features of --domain {args.domain} of this dataset (scripts/cam/extract_features.py)",
    )
    if features.labels.shape[1] != source.num_classes:
        raise WSSSError(
            f"feature file {features_path} has labels of {features.labels.shape[1]} classes but the dataset has "
            f"{source.num_classes}: extract the features of this dataset"
        )
    out_dir = output_dir(args)
    out_file = out_dir / subcategory.SUBCATEGORIES_FILE
    with runtime.stage_run(
        args,
        "cam",
        __file__,
        out_dir,
        inputs={"features": manifest.file_fingerprint(features_path)},
        context=runtime.data_context(args),
        outputs=[out_file] if out_file.exists() else [],
    ) as run:
        if args.clustering == "finch" and args.n_clusters != DEFAULT_N_CLUSTERS:
            logger.info("--clustering finch: K is data-driven (coarsest partition); --n_clusters is not used")
        class_names = list(source.classes[1:])
        sub_labels, parents = subcategory.cluster_subcategories(
            features.features, features.labels, args.clustering, args.n_clusters, args.seed, class_names
        )
        data = SubLabels(features.ids, sub_labels, parents, args.clustering, args.dataset, args.domain)
        log_cluster_sizes(data, class_names)
        subcategory.save_sub_labels(out_file, data)
        logger.info("%d sub-classes over %d images -> %s", data.num_subclasses, len(data.ids), out_file)
        run.counts = {"images": len(data.ids), "subclasses": data.num_subclasses}
        return {"subcategories_path": str(out_file), **run.counts}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
