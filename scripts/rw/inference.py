"""Random-walk inference: spread each image's CAMs over the regions that a trained AffinityNet's boundaries enclose.

Per image (SPEC §9.3): boundary map of the image and its mirror image (padded to --image_size), stride-4 CAMs (the
CAM file's ``cam``, or its ``hr_cam`` resized to stride 4), the random walk ``(cams * (1 - edge)) @ T^(2^exp_times)``
with a sparse transition matrix (core/rw/walk.py: float32, O(N) memory, no N x N matrix), then bilinear x4 to the
image size and division by the global maximum (``--rw_normalize per_class``: each class by its own). The output is
an ordinary CAM file (``cam`` = stride-4 RW, ``hr_cam`` = full-size RW, the CAM file's keys), so
``scripts/evaluate.py`` sweeps thresholds on it and ``make_pseudo_labels`` reads it unchanged. Images without a
foreground class have no CAM file (CAM inference's default) and get none here, counted in the log; a CAM file without
keys gives an empty RW file. Finished files are skipped (resumable); under torchrun each process takes
``ids[rank::world_size]``.

Reads:  experiments/models/<model_name>.pth (scripts/rw/train_affinity.py), the CAM folder
        experiments/predictions/<cam_dir>/<id>.npz (legacy <id>.npy with --allow_pickle), the images of --domain
Writes: experiments/predictions/<model_name>@<domain>@beta=<beta>@exp_times=<exp_times>@rw/<id>.npz, with args.json,
        log.txt and manifest.json (weights, CAM folder, flags, counts)
Example:
    python scripts/rw/inference.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train \\
        --model_name rw/voc12-rs269-affnet --cam_dir "pnoc/voc12-rs269-pnoc@train@scale=0.5,1.0,1.5,2.0" \\
        --beta 10 --exp_times 8
    torchrun --nproc_per_node=4 scripts/rw/inference.py ...
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core import cli, distributed, inference, manifest, paths, runtime
from core.artifacts import CAM_SUFFIX, cam_path, check_writable, load_cam, save_cam, strided_size
from core.datasets import source_from_args
from core.errors import WSSSError
from core.multiscale import imagenet_normalize
from core.precision import ComputeFormat, compute_format, log_compute_format
from core.rw.network import AffinityNet, load_affinity_net
from core.rw.training import ARCHITECTURES
from core.rw.walk import NORMALIZATIONS, check_walk_params, random_walk, rw_maps

logger = logging.getLogger(__name__)

OOM_HINT = "--device cpu (the walk itself needs little memory) or a smaller --image_size"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("rw_inference", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train")
    group = parser.add_argument_group("affinity network")
    cli.add_arg(
        group,
        "--model_name",
        type=str,
        required=True,
        help="AffinityNet weights: experiments/models/<model_name>.pth or a .pth path; names the output folder",
    )
    cli.add_arg(
        group,
        "--architecture",
        type=str,
        default=None,
        choices=ARCHITECTURES,
        help="backbone of the AffinityNet (default: read from the weights)",
    )
    cli.add_arg(group, "--mode", type=str, default="fix", choices=("normal", "fix"), help="BatchNorm mode as trained")
    cli.add_bool_arg(group, "--dilated", False, "output stride 8 instead of 16 (as trained)")
    cli.add_bool_arg(group, "--trust_checkpoint", False, "allow full unpickling of legacy .pth files (trusted only)")
    cli.add_arg(
        group,
        "--image_size",
        type=cli.positive_int,
        default=512,
        help="images are zero-padded up to this size for the boundary map, as in training (default 512)",
    )
    group = parser.add_argument_group("random walk")
    cli.add_arg(
        group,
        "--cam_dir",
        type=str,
        required=True,
        help="CAM folder: experiments/predictions/<cam_dir> (scripts/cam/inference.py), or a folder path",
    )
    cli.add_bool_arg(group, "--allow_pickle", False, "read legacy pickled .npy CAM files (trusted files only)")
    cli.add_arg(group, "--beta", type=float, default=10.0, help="affinity exponent, in (0, 100] (default 10)")
    cli.add_arg(group, "--exp_times", type=int, default=8, help="the walk takes 2^exp_times steps, 0..12 (default 8)")
    cli.add_arg(
        group,
        "--rw_normalize",
        type=str,
        default="global",
        choices=NORMALIZATIONS,
        help="divide the maps by their global maximum (reference) or each class by its own",
    )
    group = parser.add_argument_group("output")
    cli.add_arg(group, "--pred_dir", type=str, default=None, help="output folder (default: see Writes above)")
    cli.add_overwrite_arg(group)
    cli.add_arg(
        group, "--device", type=str, default="auto", choices=distributed.DEVICES, help="auto = cuda if available"
    )
    cli.add_bool_arg(group, "--mixed_precision", False, "autocast the AffinityNet forward (the walk stays float32)")
    cli.add_arg(group, "--num_workers", type=int, default=2, help="image-decoding worker processes per process")
    return parser


def cam_dir(args: argparse.Namespace) -> Path:
    """``experiments/predictions/<cam_dir>``, else ``--cam_dir`` as a path; must exist."""
    for folder in (paths.PREDICTIONS_DIR / args.cam_dir, Path(args.cam_dir)):
        if folder.is_dir():
            return folder
    raise WSSSError(
        f"CAM folder {paths.PREDICTIONS_DIR / args.cam_dir} does not exist; run scripts/cam/inference.py for "
        f"--domain {args.domain} first or fix --cam_dir"
    )


def output_dir(args: argparse.Namespace) -> Path:
    """``--pred_dir``, else ``experiments/predictions/<model_name>@<domain>@beta=<b>@exp_times=<e>@rw[@per_class]``."""
    if args.pred_dir:
        return Path(args.pred_dir)
    name = Path(args.model_name).stem if args.model_name.endswith(".pth") else args.model_name
    suffix = "" if args.rw_normalize == "global" else f"@{args.rw_normalize}"
    domain = paths.domain_name(args.domain)
    return (
        paths.PREDICTIONS_DIR
        / f"{paths.check_tag(name)}@{domain}@beta={args.beta:g}@exp_times={args.exp_times}@rw{suffix}"
    )


def check_cam_folder(args: argparse.Namespace, job: inference.CamFolderJob, ids: list[str]) -> None:
    """Every id with a foreground class needs a CAM file; the message says which domain the folder was made for."""
    missing = job.missing_cam_files(ids)
    if not missing:
        return
    made = manifest.read_manifest(job.cam_dir)
    made_for = (made or {}).get("context", {}).get("domain")
    note = f" (its manifest says it holds --domain {made_for})" if made_for and made_for != args.domain else ""
    raise WSSSError(
        f"{job.describe_missing(missing, len(ids))}{note}; run scripts/cam/inference.py for --domain {args.domain} "
        "first or pass that domain's CAM folder as --cam_dir"
    )


def edge_size(size: tuple[int, int]) -> tuple[int, int]:
    return strided_size(*size)


def stride4_cams(hr_cam: np.ndarray, cam: np.ndarray | None, device: torch.device) -> torch.Tensor:
    """The CAM file's stride-4 ``cam``, else its ``hr_cam`` bilinearly resized to the stride-4 grid: ``[n, h, w]``."""
    if cam is not None:
        return torch.from_numpy(cam).to(device)
    size = strided_size(*hr_cam.shape[1:])
    return F.interpolate(torch.from_numpy(hr_cam)[None].to(device), size, mode="bilinear", align_corners=False)[0]


class Timer:
    """Seconds spent per step, summed over the images of this process (for the log)."""

    def __init__(self) -> None:
        self.seconds = {"edge": 0.0, "walk": 0.0}
        self.images = 0

    def per_image(self) -> str:
        count = max(self.images, 1)
        return ", ".join(f"{name} {total / count:.3f} s" for name, total in self.seconds.items())


def make_rw_writer(
    args: argparse.Namespace, model: AffinityNet, job: inference.CamFolderJob, fmt: ComputeFormat, timer: Timer
) -> Callable[[dict[str, Any]], None]:
    """The per-image step of :func:`core.inference.run_over_images`: boundary map, walk, ``<id>.npz``."""
    device = next(model.parameters()).device

    def write(item: dict[str, Any]) -> None:
        image_id, image = item["id"], item["image"]
        size = image.shape[:2]
        cams = load_cam(
            job.cam_file(image_id), job.allow_pickle, size=size, num_classes=job.source.num_classes,
            size_of=f"image {image_id}",
        )  # fmt: skip
        if not len(cams.keys):  # a CAM file without classes: nothing to walk
            save_cam(cam_path(job.out_dir, image_id), cams.keys, *rw_maps(torch.zeros(0, *edge_size(size)), size))
            return
        start = time.perf_counter()
        with inference.stop_on_oom(image_id, size, OOM_HINT), fmt.autocast():
            edge = model.edge_map(torch.from_numpy(imagenet_normalize(image)).to(device), pad_size=args.image_size)
        middle = time.perf_counter()
        with inference.stop_on_oom(image_id, size, OOM_HINT):
            walked = random_walk(stride4_cams(cams.hr_cam, cams.cam, device), edge, args.beta, args.exp_times)
        cam, hr_cam = rw_maps(walked, size, args.rw_normalize)
        save_cam(cam_path(job.out_dir, image_id), cams.keys, cam, hr_cam)
        timer.seconds["edge"] += middle - start
        timer.seconds["walk"] += time.perf_counter() - middle
        timer.images += 1

    return write


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_walk_params(args.beta, args.exp_times)
    source = source_from_args(args)
    cams, out_dir = cam_dir(args), output_dir(args)
    check_writable(out_dir, "--pred_dir", folder=True)
    labels = source.labels()
    background_only = [i for i, label in labels.items() if label is not None and not np.any(np.asarray(label) > 0)]
    job = inference.CamFolderJob(source, cams, out_dir, args.allow_pickle, frozenset(background_only))
    check_cam_folder(args, job, source.ids)
    ids = [i for i in source.ids if job.cam_file(i) is not None]  # background-only ids may have a file or not
    weights = paths.existing_weights_path(
        args.model_name, f"train it first (python scripts/rw/train_affinity.py --tag {args.model_name})"
    )
    inputs = {"weights": manifest.file_fingerprint(weights), "cams": manifest.folder_fingerprint(cams)}
    with runtime.stage_run(
        args, "rw", __file__, out_dir, inputs, runtime.data_context(args), outputs=out_dir.glob(f"*{CAM_SUFFIX}"),
        device=args.device,
    ) as run:  # fmt: skip
        fmt = compute_format(bool(args.mixed_precision), run.device, channels_last=False)
        log_compute_format(fmt, "AffinityNet boundary maps")
        model = load_affinity_net(
            weights, args.architecture, mode=args.mode, dilated=args.dilated, trusted=args.trust_checkpoint,
            device=run.device, flag="--model_name",
        )  # fmt: skip
        skipped = len(source.ids) - len(ids)
        logger.info(
            "random walk (beta %g, 2^%d steps, %s normalisation) of %d of %d images of %s from %s -> %s; "
            "%d background-only images have no CAM file and get no RW file",
            args.beta, args.exp_times, args.rw_normalize, len(ids), len(source.ids), args.domain, cams, out_dir,
            skipped,
        )  # fmt: skip
        timer = Timer()
        writer = make_rw_writer(args, model, job, fmt, timer)
        summary = inference.run_over_images(
            source, ids, writer, out_dir, CAM_SUFFIX, num_workers=args.num_workers, desc="rw"
        )
        logger.info(
            "wrote %d RW files (%d already done) at %.2f images/s; per image on rank %d: %s",
            summary.written, summary.skipped, summary.images_per_s, run.dist.rank, timer.per_image(),
        )  # fmt: skip
        run.counts = {"written": summary.written, "skipped": summary.skipped, "background_only": skipped}
        return {**run.counts, "out_dir": str(out_dir), "images_per_s": round(summary.images_per_s, 3)}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
