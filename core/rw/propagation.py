"""The per-image step of random-walk inference (``scripts/rw/inference.py``): one CAM file in, one RW CAM file out.

* ``irn``: the boundary map of the image and its mirror (padded to ``--image_size``), stride-4 CAMs, the walk of
  :func:`core.rw.walk.random_walk`, :func:`core.rw.walk.rw_maps` (bilinear x4, global or per-class maximum).
* ``psa``: the PSA AffinityNet's stride-8 features of the image (padded to a multiple of 8), the seeds
  ``[bg, cams]`` pooled x8 (:func:`core.rw.walk.psa_seeds`), :func:`core.rw.walk.psa_random_walk`, and
  :func:`core.rw.walk.psa_rw_maps` (each class against the walked background, so threshold 0.5 is PSA's argmax).

Both write ordinary CAM files with the input's keys, which ``scripts/evaluate.py`` and ``make_pseudo_labels.py``
read unchanged.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core import inference
from core.artifacts import cam_path, load_cam, save_cam, strided_size
from core.multiscale import imagenet_normalize
from core.precision import ComputeFormat
from core.rw.network import AffinityNet, load_affinity_net
from core.rw.psa import PsaAffinityNet, load_psa_affinity_net
from core.rw.walk import psa_random_walk, psa_rw_maps, psa_seeds, random_walk, rw_maps

OOM_HINT = "--device cpu (the walk itself needs little memory) or a smaller --image_size"


def load_network(args: argparse.Namespace, weights: Any, device: torch.device) -> AffinityNet | PsaAffinityNet:
    """The AffinityNet of ``--method`` from ``weights`` (one-line WSSSError for the other method's weights)."""
    load = load_psa_affinity_net if args.method == "psa" else load_affinity_net
    return load(
        weights, args.architecture, mode=args.mode, dilated=args.dilated, trusted=args.trust_checkpoint,
        device=device, flag="--model_name",
    )  # fmt: skip


def stride4_cams(hr_cam: np.ndarray, cam: np.ndarray | None, device: torch.device) -> torch.Tensor:
    """The CAM file's stride-4 ``cam``, else its ``hr_cam`` bilinearly resized to the stride-4 grid: ``[n, h, w]``."""
    if cam is not None:
        return torch.from_numpy(cam).to(device)
    size = strided_size(*hr_cam.shape[1:])
    return F.interpolate(torch.from_numpy(hr_cam)[None].to(device), size, mode="bilinear", align_corners=False)[0]


class Timer:
    """Seconds spent per step, summed over the images of this process (for the log)."""

    def __init__(self, first: str = "edge") -> None:
        self.seconds = {first: 0.0, "walk": 0.0}
        self.images = 0

    def add(self, first: float, walk: float) -> None:
        names = list(self.seconds)
        self.seconds[names[0]] += first
        self.seconds["walk"] += walk
        self.images += 1

    def per_image(self) -> str:
        count = max(self.images, 1)
        return ", ".join(f"{name} {total / count:.3f} s" for name, total in self.seconds.items())


def make_rw_writer(
    args: argparse.Namespace,
    model: AffinityNet | PsaAffinityNet,
    job: inference.CamFolderJob,
    fmt: ComputeFormat,
    timer: Timer,
) -> Callable[[dict[str, Any]], None]:
    """The per-image step of :func:`core.inference.run_over_images`: network, walk, ``<id>.npz`` (see the module
    docstring; ``args``: ``method``, ``beta``, ``exp_times``, ``image_size``, ``rw_normalize``, ``bg_alpha``,
    ``bg_score``)."""
    device = next(model.parameters()).device

    def write(item: dict[str, Any]) -> None:
        image_id, image = item["id"], item["image"]
        size = image.shape[:2]
        cams = load_cam(
            job.cam_file(image_id), job.allow_pickle, size=size, num_classes=job.source.num_classes,
            size_of=f"image {image_id}",
        )  # fmt: skip
        if not len(cams.keys):  # a CAM file without classes: nothing to walk
            save_cam(cam_path(job.out_dir, image_id), cams.keys, *rw_maps(torch.zeros(0, *strided_size(*size)), size))
            return
        start = time.perf_counter()
        normalized = torch.from_numpy(imagenet_normalize(image)).to(device)
        with inference.stop_on_oom(image_id, size, OOM_HINT), fmt.autocast():
            if args.method == "psa":
                affinity_source = model.feature_map(normalized)
            else:
                affinity_source = model.edge_map(normalized, pad_size=args.image_size)
        middle = time.perf_counter()
        with inference.stop_on_oom(image_id, size, OOM_HINT):
            if args.method == "psa":
                seeds = psa_seeds(torch.from_numpy(cams.hr_cam).to(device), args.bg_alpha, args.bg_score)
                maps = psa_rw_maps(psa_random_walk(seeds, affinity_source, args.beta, args.exp_times), size)
            else:
                seeds = stride4_cams(cams.hr_cam, cams.cam, device)
                maps = rw_maps(random_walk(seeds, affinity_source, args.beta, args.exp_times), size, args.rw_normalize)
        save_cam(cam_path(job.out_dir, image_id), cams.keys, *maps)
        timer.add(middle - start, time.perf_counter() - middle)

    return write
