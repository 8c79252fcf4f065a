"""Affinity labels for AffinityNet: confident foreground (class ids), confident background (0) and uncertain (255)
pixels from CAM files, with or without saliency maps (SPEC §9.1), in a pool of worker processes.

Without --sal_dir (IRN / Puzzle-CAM): a pixel is its class where the CAMs decoded at --fg_threshold give one, 0
where the CAMs decoded at --bg_threshold give background, 255 elsewhere. With --sal_dir (P-NOC): salient =
CRF(saliency > --bg_threshold); a pixel is its class where CRF(salient · CAMs decoded at --fg_threshold) gives one,
0 where it is not salient either, 255 elsewhere. The label CRF (--crf_t, --crf_gt_prob) applies in both branches.
--fg_threshold auto / --bg_threshold auto take the best threshold of the CAM folder's sweep (scripts/evaluate.py)
+0.10 / -0.10, and the log says which rule chose them. Images whose label has no foreground class get all-zero
labels. Finished PNGs are skipped (resumable); a rerun with other flags or inputs refuses (--overwrite true).

--method psa (PSA / SEAM / PPC, METHODS §2): two probability-CRF score maps of [(1 - max cams)^alpha, cams] at
--alpha_low (4) and --alpha_high (24 SEAM/PPC, the default; 32 PSA), --crf_t 10 iterations (Gaussian 3/3,
bilateral 80/13/10), average-pooled x8 before the argmax: a cell is its class where the low-alpha map has one, 255
where it says background, 0 where the high-alpha map says background. Written at full size, one label per 8x8 cell.

Reads:  <cams_dir>/<id>.npz (hr_cam, keys; legacy <id>.npy with --allow_pickle), <sal_dir>/<id>.png (optional),
        the images (sizes; pixels only with --crf_t > 0), the image-level labels of --domain, and with auto
        thresholds the sweep experiments/results/eval/<cams folder>/results.json (or --sweep_json)
Writes: experiments/predictions/<tag>@aff_fg=<fg:.2f>_bg=<bg:.2f>/<id>.png (--method psa: <tag>@aff_la=<la>_ha=<ha>;
        or --output), uint8 palette PNG:
        0 = background, 1..C = classes, 255 = uncertain; with args.json, log.txt and manifest.json (inputs, flags,
        thresholds and how they were chosen, label statistics)
Example:
    python scripts/rw/make_affinity_labels.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train_aug \\
        --tag rw/voc12-an@pnoc --cams_dir "experiments/predictions/pnoc/voc12-rs269@train_aug@scale=0.5,1.0,1.5,2.0" \\
        --sal_dir experiments/predictions/saliency/voc12-pn --fg_threshold 0.40 --bg_threshold 0.10 --crf_t 10
    python scripts/rw/make_affinity_labels.py --method psa --alpha_low 4 --alpha_high 24 --domain train_aug ...
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from core import cli, manifest, paths, pseudo_masks, runtime
from core.artifacts import PNG_SUFFIX, check_writable
from core.datasets import source_from_args
from core.errors import WSSSError
from core.rw import labels, recipes

logger = logging.getLogger(__name__)


def threshold_or_auto(value: str) -> float | str:
    """A CAM threshold in [0, 1], or ``auto`` (derived from the CAM folder's threshold sweep)."""
    return labels.AUTO if str(value).strip().lower() == labels.AUTO else cli.unit_float(value)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_affinity_labels", description=__doc__.split("\n\n")[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train")
    group = parser.add_argument_group("inputs")
    cli.add_arg(group, "--tag", type=str, default=None, help="names the output: <tag>@aff_fg=<fg>_bg=<bg>")
    cli.add_arg(group, "--cams_dir", type=str, default=None, help="CAM folder (from scripts/cam/inference.py)")
    cli.add_arg(group, "--experiment_name", type=str, default=None, help="CAM folder experiments/predictions/<name>")
    cli.add_arg(group, "--sal_dir", type=str, default=None, help="saliency PNGs (255 = salient): the P-NOC branch")
    cli.add_bool_arg(group, "--allow_pickle", False, "read legacy pickled .npy CAM files (trusted files only)")
    group = parser.add_argument_group("labels")
    cli.add_arg(
        group,
        "--method",
        type=str,
        default="irn",
        choices=recipes.METHODS,
        help="irn: CAM thresholds (and saliency); psa: la/ha CRF score maps pooled x8 (PSA, SEAM, PPC)",
    )
    cli.add_arg(group, "--alpha_low", type=float, default=4.0, help="psa: background power of the la map (4)")
    cli.add_arg(
        group,
        "--alpha_high",
        type=float,
        default=24.0,
        help="psa: background power of the ha map (24 SEAM/PPC; PSA 32)",
    )
    cli.add_arg(
        group,
        "--fg_threshold",
        type=threshold_or_auto,
        default=0.30,
        help="CAM score of confident foreground (default 0.30; P-NOC runner 0.40; auto = best sweep threshold + 0.10)",
    )
    cli.add_arg(
        group,
        "--bg_threshold",
        type=threshold_or_auto,
        default=0.05,
        help="CAM score (saliency with --sal_dir) of confident background (default 0.05; runner 0.10; auto = best "
        "sweep threshold - 0.10, without --sal_dir only)",
    )
    cli.add_arg(
        group,
        "--sweep_json",
        type=str,
        default=None,
        help="scripts/evaluate.py result of the CAM folder for auto thresholds "
        "(default experiments/results/eval/<CAM folder>/results.json)",
    )
    cli.add_arg(
        group,
        "--crf_t",
        type=int,
        default=None,
        help="CRF iterations: irn label CRF (default 0 = off; runner 10); psa probability CRF (default 10)",
    )
    cli.add_arg(group, "--crf_gt_prob", type=float, default=0.7, help="label-CRF confidence (default 0.7)")
    cli.add_pool_output_args(parser, "output folder (default experiments/predictions/<tag>@aff_fg=<fg>_bg=<bg>)")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    if not args.tag and not args.output:
        raise WSSSError("--tag is required: it names the output folder <tag>@aff_fg=<fg>_bg=<bg> (or pass --output)")
    if args.crf_t is None:
        args.crf_t = labels.DEFAULT_CRF_T[args.method]
    if args.method == "psa" and args.sal_dir:
        raise WSSSError(
            "--method psa makes labels from CAMs and CRF score maps only; drop --sal_dir or use --method irn"
        )
    if args.method == "psa" and not 0 <= args.alpha_low < args.alpha_high:
        raise WSSSError(
            f"--alpha_low {args.alpha_low:g} must be >= 0 and below --alpha_high {args.alpha_high:g} (low alpha = much "
            "background; PSA uses 4 and 32, SEAM/PPC 4 and 24)"
        )
    if args.crf_t < 0:
        raise WSSSError(f"--crf_t must be 0 (off) or a number of iterations, got {args.crf_t}")
    if args.crf_t > 0 and not 0 < args.crf_gt_prob < 1:
        raise WSSSError(f"--crf_gt_prob must lie strictly between 0 and 1 for the label CRF, got {args.crf_gt_prob}")
    if args.sal_dir and not Path(args.sal_dir).is_dir():
        raise WSSSError(f"saliency folder {args.sal_dir} does not exist; check --sal_dir")


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, float, float, str, Path]:
    """The CAM folder, the two thresholds, the rule that chose them and the sweep file auto would read."""
    cams = paths.existing_predictions_dir(
        args.experiment_name, args.cams_dir, "CAM folder", "scripts/cam/inference.py (or fix --cams_dir)"
    )
    if args.method == "psa":  # no thresholds: the two alphas decide
        return cams, 0.0, 0.0, "psa", Path()
    sweep = Path(args.sweep_json) if args.sweep_json else paths.evaluation_dir(cams) / "results.json"
    fg, bg, rule = labels.resolve_thresholds(args.fg_threshold, args.bg_threshold, sweep, bool(args.sal_dir))
    return cams, fg, bg, rule, sweep


def build_job(args: argparse.Namespace, source: Any, cams: Path, fg: float, bg: float) -> labels.AffinityLabelJob:
    if args.method == "psa":
        return labels.PsaAffinityLabelJob(
            source=source,
            cam_dir=cams,
            out_dir=Path(args.output)
            if args.output
            else labels.psa_labels_dir(args.tag, args.alpha_low, args.alpha_high),
            alpha_low=args.alpha_low,
            alpha_high=args.alpha_high,
            crf_t=args.crf_t,
            allow_pickle=args.allow_pickle,
            background_only=pseudo_masks.known_background_only(source),
        )
    out = Path(args.output) if args.output else labels.affinity_labels_dir(args.tag, fg, bg)
    return labels.AffinityLabelJob(
        source=source,
        cam_dir=cams,
        out_dir=out,
        threshold=fg,
        bg_threshold=bg,
        sal_dir=Path(args.sal_dir) if args.sal_dir else None,
        crf_t=args.crf_t,
        crf_gt_prob=args.crf_gt_prob,
        allow_pickle=args.allow_pickle,
        background_only=pseudo_masks.known_background_only(source),
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_flags(args)
    source = source_from_args(args)
    cams, fg, bg, rule, sweep = resolve_inputs(args)
    job = build_job(args, source, cams, fg, bg)
    check_writable(job.out_dir, "--output", folder=True)
    job.check_files(source.ids, args.domain)
    inputs: dict[str, Any] = {"cams": manifest.folder_fingerprint(cams)}
    if job.sal_dir is not None:
        inputs["saliency"] = manifest.folder_fingerprint(job.sal_dir)
    if rule not in ("given", "psa"):
        inputs["sweep"] = manifest.file_fingerprint(sweep)
    if args.method == "psa":
        settings = {"method": "psa", "alpha_low": args.alpha_low, "alpha_high": args.alpha_high}
        described = f"PSA la/ha score maps at alpha {args.alpha_low:g}/{args.alpha_high:g}, CRF t={args.crf_t}"
    else:
        settings = {"fg_threshold": fg, "bg_threshold": bg, "threshold_rule": rule}
        described = f"fg {fg:.2f}, bg {bg:.2f} ({rule}), " + (
            f"saliency {job.sal_dir}" if job.sal_dir else "no saliency"
        )
        described += f", label CRF t={job.crf_t} gt_prob={job.crf_gt_prob:g}" if job.crf_t > 0 else ", label CRF off"
    outputs = job.out_dir.glob(f"*{PNG_SUFFIX}")
    context = {**runtime.data_context(args), **settings}
    with runtime.stage_run(args, "rw", __file__, job.out_dir, inputs, context, outputs=outputs) as run:
        logger.info("affinity labels: %s", described)
        run.counts = dict(pseudo_masks.write_in_pool(job, source.ids, run, args.num_workers, "affinity labels"))
        pseudo_masks.summarise_folder(run, job.out_dir, source.ids, args.num_workers, "affinity labels")
        return {**run.counts, "out_dir": str(job.out_dir), **settings}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
