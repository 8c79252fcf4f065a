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

--method psa (PSA / SEAM / PPC, METHODS §2): the PSA AffinityNet's stride-8 features, affinities exp(-mean|f_i -
f_j|) within radius 5, A^beta (--beta 8) column-normalised, 2^logt steps (--logt 6 SEAM/PPC, 8 PSA) through the same
sparse walk, seeds [bg, cams] pooled x8 with bg = --bg_score (0.27, PPC) or (1 - max cams)^--bg_alpha (PSA 16, SEAM
6); bilinear x8; each class is written against the walked background, rw_c / (rw_c + rw_bg), so threshold 0.5 is
PSA's argmax (make_pseudo_labels.py --threshold 0.5).

Reads:  experiments/models/<model_name>.pth (scripts/rw/train_affinity.py), the CAM folder
        experiments/predictions/<cam_dir>/<id>.npz (legacy <id>.npy with --allow_pickle), the images of --domain
Writes: experiments/predictions/<model_name>@<domain>@beta=<beta>@exp_times=<exp_times>@rw/<id>.npz (psa:
        ...@beta=<beta>@logt=<logt>@bg=<bg_score>@rw or @bg_alpha=<alpha>@rw), with args.json, log.txt and
        manifest.json (weights, CAM folder, flags, counts)
Example:
    python scripts/rw/inference.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train \\
        --model_name rw/voc12-rs269-affnet --cam_dir "pnoc/voc12-rs269-pnoc@train@scale=0.5,1.0,1.5,2.0" \\
        --beta 10 --exp_times 8
    torchrun --nproc_per_node=4 scripts/rw/inference.py ...
    python scripts/rw/inference.py --method psa --model_name rw/voc12-psa --cam_dir ... --logt 6 --bg_score 0.27
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from core import cli, distributed, inference, manifest, paths, runtime
from core.artifacts import CAM_SUFFIX, check_writable
from core.datasets import source_from_args
from core.errors import WSSSError
from core.precision import compute_format, log_compute_format
from core.rw.propagation import Timer, load_network, make_rw_writer
from core.rw.recipes import MethodDefaultsParser, add_method_arg
from core.rw.training import ARCHITECTURES
from core.rw.walk import NORMALIZATIONS, PSA_BG_SCORE, check_walk_params

logger = logging.getLogger(__name__)

METHOD_DEFAULTS = {
    "irn": {"beta": 10.0, "exp_times": 8, "image_size": 512, "dilated": False},
    "psa": {"beta": 8.0, "exp_times": 6, "dilated": True},
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = MethodDefaultsParser(
        "rw_inference", description=__doc__.splitlines()[0], add_help=add_help, method_defaults=METHOD_DEFAULTS
    )
    cli.add_dataset_args(parser, domain="train")
    group = parser.add_argument_group("affinity network")
    add_method_arg(group, "the AffinityNet of --model_name: irn (boundaries, P-NOC) or psa (features, PSA/SEAM/PPC)")
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
    cli.add_bool_arg(group, "--dilated", None, "output stride 8 instead of 16 (as trained)")
    cli.add_bool_arg(group, "--trust_checkpoint", False, "allow full unpickling of legacy .pth files (trusted only)")
    cli.add_arg(
        group,
        "--image_size",
        type=cli.positive_int,
        default=None,
        help="irn: images are zero-padded up to this size for the boundary map, as in training",
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
    cli.add_arg(group, "--beta", type=float, default=None, help="affinity exponent, in (0, 100]")
    cli.add_arg(
        group, "--exp_times", "--logt", type=int, default=None, help="the walk takes 2^exp_times steps, 0..12 (PSA 8)"
    )
    cli.add_arg(
        group, "--bg_score", type=cli.unit_float, default=PSA_BG_SCORE, help="psa: constant background (PPC 0.27)"
    )
    cli.add_arg(
        group,
        "--bg_alpha",
        type=cli.optional_float,
        default=None,
        help="psa: background (1 - max cams)^bg_alpha instead of --bg_score (PSA 16, SEAM 6; none = off)",
    )
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
    parser.describe_defaults()
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
    walk = f"beta={args.beta:g}@exp_times={args.exp_times}"
    if args.method == "psa":
        background = f"bg={args.bg_score:g}" if args.bg_alpha is None else f"bg_alpha={args.bg_alpha:g}"
        walk = f"beta={args.beta:g}@logt={args.exp_times}@{background}"
    return paths.PREDICTIONS_DIR / f"{paths.check_tag(name)}@{paths.domain_name(args.domain)}@{walk}@rw{suffix}"


def check_flags(args: argparse.Namespace) -> None:
    check_walk_params(args.beta, args.exp_times, args.method)
    if args.method == "psa" and args.rw_normalize != "global":
        raise WSSSError("--rw_normalize applies to --method irn; psa writes each class against the walked background")
    if args.method == "psa" and args.bg_alpha is not None and args.bg_alpha <= 0:
        raise WSSSError(f"--bg_alpha {args.bg_alpha:g} must be positive (PSA 16, SEAM 6), or none for --bg_score")


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


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_flags(args)
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
    model = load_network(args, weights, "cpu")  # before the output folder exists: weights of the other --method stop
    with runtime.stage_run(
        args, "rw", __file__, out_dir, inputs, runtime.data_context(args), outputs=out_dir.glob(f"*{CAM_SUFFIX}"),
        device=args.device,
    ) as run:  # fmt: skip
        fmt = compute_format(bool(args.mixed_precision), run.device, channels_last=False)
        log_compute_format(fmt, "PSA AffinityNet features" if args.method == "psa" else "AffinityNet boundary maps")
        model.to(run.device)
        skipped = len(source.ids) - len(ids)
        logger.info(
            "%s random walk (beta %g, 2^%d steps) of %d of %d images of %s from %s -> %s; "
            "%d background-only images have no CAM file and get no RW file",
            args.method, args.beta, args.exp_times, len(ids), len(source.ids), args.domain, cams, out_dir, skipped,
        )  # fmt: skip
        timer = Timer("features" if args.method == "psa" else "edge")
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
