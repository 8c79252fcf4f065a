"""Label maps from CAM-format folders (class CAMs, or random-walk scores stored as CAM files), written as palette
PNGs, and a summary of what a folder of label maps holds.

The decoding rule itself is :func:`core.labels.pseudo_mask`; this module reads the files (CAMs, saliency, images),
checks that they belong together and writes ``<out_dir>/<id>.png`` atomically. The CAM stage
(``scripts/cam/make_pseudo_masks.py``) and the random-walk stage (affinity labels, RW pseudo labels) share it.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import artifacts, cli, distributed, inference, manifest, paths, runtime
from core.artifacts import check_writable
from core.datasets import source_from_args
from core.errors import WSSSError, first_ids
from core.labels import IGNORE_INDEX, pseudo_mask
from core.parallel import chunked, parallel_map
from core.paths import PREDICTIONS_DIR

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoMaskJob(inference.CamFolderJob):
    """Settings of a pseudo-mask run, sent once to each worker process (``source``: ``read_image``, ``image_path``,
    ``palette``, ``num_classes``; ``out_dir``: the ``<id>.png`` label maps; ``background_only`` ids get an all-zero
    mask without a CAM file).

    Attributes:
        threshold: background score (foreground threshold of the band).
        bg_threshold: lower threshold of the uncertain band, or None.
        sal_dir: folder of saliency PNGs (background = 1 - saliency), or None.
        crf_t, crf_gt_prob: label CRF.
        producer: the script that writes the CAM folder, named in the messages about missing files.
    """

    threshold: float = 0.25
    bg_threshold: float | None = None
    sal_dir: Path | None = None
    crf_t: int = 0
    crf_gt_prob: float = 0.7
    producer: str = "scripts/cam/inference.py"

    def read_cams(self, image_id: str, size: tuple[int, int]) -> artifacts.CamFile:
        """The checked CAM file of one id (``hr_cam`` of the image's ``size``, keys within the dataset's classes)."""
        path = self.cam_file(image_id)
        if path is None:
            raise WSSSError(f"CAM file {self.cam_dir / image_id}.npz not found; run {self.producer} first")
        return artifacts.load_cam(
            path,
            allow_pickle=self.allow_pickle,
            with_cam=False,
            size=size,
            num_classes=self.source.num_classes,
            size_of=f"image {image_id}",
        )

    def read_saliency(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        """The saliency map of one id from ``sal_dir``: float32 [H, W] in [0, 1], checked against ``size``."""
        assert self.sal_dir is not None
        saliency = artifacts.load_saliency(self.sal_dir / f"{image_id}{artifacts.PNG_SUFFIX}")
        if saliency.shape != tuple(size):
            raise WSSSError(
                f"saliency map of {image_id} in {self.sal_dir} is {saliency.shape} but its CAMs are "
                f"{tuple(size)}; the folders belong to different images"
            )
        return saliency

    def background_mask(self, image_id: str) -> np.ndarray | None:
        """uint8 [H, W] zeros for an id without a CAM file whose label has no foreground class, else None."""
        if self.cam_file(image_id) is not None:
            return None
        if image_id not in self.background_only:
            raise WSSSError(f"CAM file {self.cam_dir / image_id}.npz not found; run {self.producer} first")
        return np.zeros(self.source.image_size(image_id), dtype=np.uint8)

    def label_map(self, image_id: str) -> np.ndarray:
        """The pseudo mask of one id: uint8 [H, W], values in {0..C, 255}."""
        zeros = self.background_mask(image_id)
        if zeros is not None:
            return zeros
        image = self.source.read_image(image_id) if self.crf_t > 0 else None
        size = image.shape[:2] if image is not None else self.source.image_size(image_id)
        cams = self.read_cams(image_id, size)
        background: float | np.ndarray = self.threshold
        if self.sal_dir is not None:
            background = 1.0 - self.read_saliency(image_id, cams.size)
        return pseudo_mask(
            cams.hr_cam,
            cams.keys,
            background,
            bg_threshold=self.bg_threshold,
            image=image,
            crf_t=self.crf_t,
            crf_gt_prob=self.crf_gt_prob,
        )

    def check_files(self, ids: Sequence[str], domain: str, hint: str = "") -> None:
        """Every id needs a CAM file (or a background-only label), and with ``sal_dir`` the ids that are decoded a
        saliency map; else a one-line WSSSError naming the folder, the first missing ids, the domain the folder was
        made for when its manifest names another one, and ``producer``.

        Args:
            ids: the ids of the run.
            domain: the ``--domain`` the folder should have been made for (named in the message).
            hint: appended to the message about missing CAM files.
        """
        missing = self.missing_cam_files(ids)
        if missing:
            raise WSSSError(
                f"{self.describe_missing(missing, len(ids))}{folder_domain_hint(self.cam_dir, domain)}; "
                f"run {self.producer} for --domain {domain} first{hint}"
            )
        if self.sal_dir is not None:
            decoded = [i for i in ids if i not in self.background_only or self.cam_file(i) is not None]
            no_saliency = [i for i in decoded if not (self.sal_dir / f"{i}{artifacts.PNG_SUFFIX}").is_file()]
            if no_saliency:
                raise WSSSError(
                    f"{len(no_saliency)} of {len(decoded)} saliency maps missing in {self.sal_dir} "
                    f"(first: {first_ids(no_saliency)}); make them first or fix --sal_dir"
                )


def known_background_only(source: Any) -> frozenset[str]:
    """Ids whose image-level label is known and has no foreground class (ids without a label, e.g. of VOC
    ``test``, are not among them: they need a CAM file)."""
    return frozenset(i for i, label in source.labels().items() if label is not None and not np.any(label > 0))


def folder_domain_hint(folder: Path, domain: str) -> str:
    """``" (the folder was made for --domain val)"`` when ``folder``'s manifest records another domain, else ``""``."""
    made = (manifest.read_manifest(folder) or {}).get("context", {}).get("domain")
    if made and paths.domain_name(str(made)) != paths.domain_name(domain):
        return f" (the folder was made for --domain {made})"
    return ""


def write_pseudo_masks(job: PseudoMaskJob, ids: Sequence[str]) -> int:
    """Write ``<out_dir>/<id>.png`` (palette PNG, atomic) of ``job.label_map`` for each id; returns how many."""
    for image_id in ids:
        artifacts.save_label_map(
            job.out_dir / f"{image_id}{artifacts.PNG_SUFFIX}", job.label_map(image_id), palette=job.source.palette
        )
    return len(ids)


def write_in_pool(job: PseudoMaskJob, ids: Sequence[str], run: Any, num_workers: int, desc: str) -> Counter[str]:
    """Write the label maps of this rank's pending ``ids`` in a worker pool (:func:`core.inference.run_over_chunks`)
    and log the time per image; returns the counts ``written``, ``skipped`` and ``background_only`` (zeros written
    without a CAM file). ``run``: the :class:`core.runtime.StageRun`."""
    pool = inference.run_over_chunks(
        functools.partial(write_pseudo_masks, job), ids, job.out_dir, artifacts.PNG_SUFFIX, dist=run.dist,
        num_workers=num_workers, desc=desc, log=logger, source_dir=job.cam_dir,
    )  # fmt: skip
    filled = len([i for i in pool.todo if i in job.background_only and job.cam_file(i) is None])
    per_image = pool.seconds * pool.workers / pool.written if pool.written else 0.0
    logger.info(
        "%s: wrote %d in %.1f s (%.3f s per image per worker, %d workers), %d background-only zeros, to %s",
        desc, pool.written, pool.seconds, per_image, pool.workers, filled, job.out_dir,
    )  # fmt: skip
    return Counter({"written": pool.written, "skipped": pool.skipped, "background_only": filled})


def summarise_folder(run: Any, folder: Path, ids: Sequence[str], num_workers: int, what: str) -> LabelStats | None:
    """After every rank has written: :func:`label_stats` of ``ids`` on rank 0 (logged, added to ``run.counts``);
    None on the other ranks."""
    distributed.barrier()
    if not run.is_main:
        return None
    stats = label_stats(folder, ids, num_workers)
    logger.info("%s in %s: %s", what, folder, stats.describe())
    run.counts.update(stats.as_dict())
    return stats


# --------------------------------------------------------------------------------------------------------------------
# What a folder of label maps holds
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelStats:
    """Pixel and image counts of a set of label maps (0 = background, 1..C = classes, 255 = uncertain).

    Attributes:
        images: label maps read.
        images_with_class: maps with at least one pixel of a class 1..C.
        pixels: all pixels.
        background: pixels labelled 0.
        foreground: pixels labelled 1..C.
    """

    images: int = 0
    images_with_class: int = 0
    pixels: int = 0
    background: int = 0
    foreground: int = 0

    def __add__(self, other: LabelStats) -> LabelStats:
        return LabelStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return self.images, self.images_with_class, self.pixels, self.background, self.foreground

    @property
    def foreground_fraction(self) -> float:
        """Class pixels / all pixels (0 for no pixels)."""
        return self.foreground / self.pixels if self.pixels else 0.0

    @property
    def labelled_fraction(self) -> float:
        """Pixels that are not uncertain (255) / all pixels."""
        return (self.background + self.foreground) / self.pixels if self.pixels else 0.0

    def describe(self) -> str:
        """``"1464 maps: 31.2% class pixels, 60.1% background, 8.7% uncertain; 1460 maps have a class"``."""
        if not self.pixels:
            return f"{self.images} maps, no pixels"
        uncertain = 1.0 - self.labelled_fraction
        return (
            f"{self.images} maps: {100 * self.foreground_fraction:.1f}% class pixels, "
            f"{100 * self.background / self.pixels:.1f}% background, {100 * uncertain:.1f}% uncertain; "
            f"{self.images_with_class} maps have a class"
        )

    def as_dict(self) -> dict[str, float]:
        """The counts and fractions, for manifests and result JSONs."""
        return {
            "images": self.images,
            "images_with_class": self.images_with_class,
            "foreground_fraction": round(self.foreground_fraction, 6),
            "labelled_fraction": round(self.labelled_fraction, 6),
        }


def _stats_of(folder: Path, ids: Sequence[str]) -> LabelStats:
    total = LabelStats()
    for image_id in ids:
        labels = artifacts.load_label_map(folder / f"{image_id}{artifacts.PNG_SUFFIX}")
        counts = np.bincount(labels.reshape(-1), minlength=256)
        foreground = int(counts[1:IGNORE_INDEX].sum())
        total += LabelStats(1, int(foreground > 0), int(labels.size), int(counts[0]), foreground)
    return total


def label_stats(folder: str | Path, ids: Sequence[str], num_workers: int = 1) -> LabelStats:
    """Count the pixels of ``<folder>/<id>.png`` over ``ids`` (in ``num_workers`` processes)."""
    chunks = chunked(list(ids), max(1, num_workers) * 4) if ids else []
    parts = parallel_map(functools.partial(_stats_of, Path(folder)), chunks, num_workers, desc="label statistics")
    return sum(parts, LabelStats())


def require_classes(stats: LabelStats, folder: str | Path, min_foreground: float, remedy: str) -> None:
    """Stop when a folder of label maps is almost all background (USERS §1.15: "my pseudo labels are all black").

    Args:
        stats: :func:`label_stats` of the folder.
        folder: the folder, for the message.
        min_foreground: the smallest acceptable fraction of class pixels (0 disables the check).
        remedy: what to try, e.g. ``"lower --threshold"``.

    Raises:
        WSSSError: fewer than ``min_foreground`` of the pixels carry a class.
    """
    if min_foreground <= 0 or not stats.images or stats.foreground_fraction >= min_foreground:
        return
    raise WSSSError(
        f"{folder} is almost all background ({stats.describe()}; at least {100 * min_foreground:g}% class pixels "
        f"expected): {remedy}, or pass --min_foreground 0 to accept these masks"
    )


# --------------------------------------------------------------------------------------------------------------------
# Pseudo labels from random-walk folders (scripts/rw/make_pseudo_labels.py and its scripts/segmentation twin)
# --------------------------------------------------------------------------------------------------------------------

DOMAIN_FIELD = "{domain}"
RW_PRODUCER = "scripts/rw/inference.py"
# Flags that only name the input folders (their identities are the manifest's inputs) or gate the finished folder.
_NAMING_FLAGS = frozenset({"domain", "domains", "experiment_name", "rw_dirs", "sal_dir", "min_foreground"})


def add_rw_pseudo_label_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``make_pseudo_labels.py`` (reference names and defaults; runner values in the help)."""
    cli.add_dataset_args(parser, domain="train")
    group = parser.add_argument_group("random-walk folders")
    cli.add_arg(
        group,
        "--domains",
        type=cli.str_list,
        action="append",
        default=None,
        help="several domains into one output folder, e.g. train_aug,val (comma-separated or repeated; "
        "overrides --domain)",
    )
    cli.add_arg(
        group,
        "--experiment_name",
        type=str,
        default=None,
        help=f"RW folder {PREDICTIONS_DIR}/<name> (from {RW_PRODUCER}); {DOMAIN_FIELD} in it stands for each domain",
    )
    cli.add_arg(
        group,
        "--rw_dirs",
        type=cli.str_list,
        default=None,
        help="RW folders, one per domain in order (comma-separated)",
    )
    cli.add_arg(
        group,
        "--sal_dir",
        type=str,
        default=None,
        help=f"background = 1 - <sal_dir>/<id>.png instead of --threshold ({DOMAIN_FIELD} allowed)",
    )
    cli.add_bool_arg(group, "--allow_pickle", False, "read legacy pickled .npy RW files (trusted files only)")
    group = parser.add_argument_group("decoding")
    cli.add_arg(
        group, "--threshold", type=cli.unit_float, default=0.25, help="background score (default 0.25; runner 0.3)"
    )
    cli.add_arg(group, "--crf_t", type=int, default=10, help="label-CRF iterations (default 10; runner 1; 0 = off)")
    cli.add_arg(group, "--crf_gt_prob", type=float, default=0.7, help="label-CRF confidence (default 0.7; runner 0.9)")
    cli.add_arg(
        group,
        "--min_foreground",
        type=cli.unit_float,
        default=0.01,
        help="stop when fewer pixels than this carry a class (default 0.01; 0 = no check)",
    )
    cli.add_pool_output_args(parser, "output folder (default experiments/predictions/<RW folder name>@crf=<crf_t>)")


def rw_domains(args: argparse.Namespace) -> list[str]:
    """``--domains`` (flattened, in order, without repeats), else ``[--domain]``."""
    if not args.domains:
        return [args.domain]
    domains = [d for group in args.domains for d in group]
    return list(dict.fromkeys(domains))


def with_domain(text: str, domain: str) -> str:
    """``text`` with ``{domain}`` replaced by the domain's folder name."""
    return text.replace(DOMAIN_FIELD, paths.domain_name(domain))


def rw_folders(args: argparse.Namespace, domains: Sequence[str]) -> list[Path]:
    """One existing RW folder per domain: ``--rw_dirs``, or ``--experiment_name`` (with ``{domain}`` for several)."""
    if args.rw_dirs:
        if len(args.rw_dirs) != len(domains):
            raise WSSSError(
                f"--rw_dirs names {len(args.rw_dirs)} folders for {len(domains)} domains ({', '.join(domains)}); "
                "give one per domain, in the same order"
            )
        folders = [Path(f) for f in args.rw_dirs]
    elif args.experiment_name:
        if len(domains) > 1 and DOMAIN_FIELD not in args.experiment_name:
            raise WSSSError(
                f"--experiment_name {args.experiment_name} names one folder for {len(domains)} domains; put "
                f"{DOMAIN_FIELD} where the domain goes (e.g. rw/an@{DOMAIN_FIELD}@beta=10@exp_times=8@rw) or pass "
                "--rw_dirs"
            )
        folders = [PREDICTIONS_DIR / with_domain(args.experiment_name, d) for d in domains]
    else:
        raise WSSSError("no RW folder given; pass --experiment_name NAME or --rw_dirs DIR[,DIR...]")
    for folder, domain in zip(folders, domains, strict=True):
        if not folder.is_dir():
            raise WSSSError(f"RW folder {folder} of --domain {domain} does not exist; run {RW_PRODUCER} first")
    return folders


def rw_output_dir(args: argparse.Namespace, folders: Sequence[Path], domains: Sequence[str]) -> Path:
    """``--output``, else ``<RW folder>@crf=<t>`` (the reference's name); for several domains the RW folders' common
    name without its ``@<domain>`` part, e.g. ``an@train_aug@rw`` + ``an@val@rw`` -> ``an@rw@crf=1``."""
    if args.output:
        return Path(args.output)
    if len(folders) == 1:
        return paths.derived_dir(folders[0], f"crf={args.crf_t}")
    names = set()
    for folder, domain in zip(folders, domains, strict=True):
        parts = folder.name.split("@")
        if paths.domain_name(domain) in parts[1:]:
            parts.remove(paths.domain_name(domain))
        names.add(folder.with_name("@".join(parts)))
    if len(names) != 1:
        raise WSSSError(
            f"the RW folders {', '.join(str(f) for f in folders)} differ beyond their @<domain> part, so they name no "
            "common output folder; pass --output DIR"
        )
    return paths.derived_dir(names.pop(), f"crf={args.crf_t}")


def _check_rw_flags(args: argparse.Namespace) -> None:
    if args.crf_t < 0:
        raise WSSSError(f"--crf_t must be 0 (off) or a number of iterations, got {args.crf_t}")
    if args.crf_t > 0 and not 0 < args.crf_gt_prob < 1:
        raise WSSSError(f"--crf_gt_prob must lie strictly between 0 and 1 for the label CRF, got {args.crf_gt_prob}")


def _rw_jobs(args: argparse.Namespace, domains: Sequence[str], folders: Sequence[Path], out: Path) -> list[Any]:
    """One :class:`PseudoMaskJob` per domain, its files checked; ids already in an earlier domain are dropped."""
    jobs, seen = [], set()
    for domain, folder in zip(domains, folders, strict=True):
        source = source_from_args(args, domain)
        sal_dir = Path(with_domain(args.sal_dir, domain)) if args.sal_dir else None
        if sal_dir is not None and not sal_dir.is_dir():
            raise WSSSError(f"saliency folder {sal_dir} of --domain {domain} does not exist; check --sal_dir")
        job = PseudoMaskJob(
            source=source, cam_dir=folder, out_dir=out, threshold=args.threshold, sal_dir=sal_dir,
            crf_t=args.crf_t, crf_gt_prob=args.crf_gt_prob, allow_pickle=args.allow_pickle,
            background_only=known_background_only(source), producer=RW_PRODUCER,
        )  # fmt: skip
        ids = [i for i in source.ids if i not in seen]
        if len(ids) < len(source.ids):
            logger.warning(
                "%d ids of %s are in an earlier domain too; written once", len(source.ids) - len(ids), domain
            )
        job.check_files(ids, domain)
        seen.update(ids)
        jobs.append((domain, job, ids))
    return jobs


def make_rw_pseudo_labels(args: argparse.Namespace, script: str | Path) -> dict[str, Any]:
    """The body of ``make_pseudo_labels.py``: pseudo labels of every domain's RW folder into one output folder.

    Per id: ``argmax([threshold (or 1 - saliency); rw])`` -> optional label CRF -> keys, as palette PNGs;
    background-only ids (known from their image-level label) get zeros without an RW file. Resumable, sharded under
    torchrun, recorded in ``manifest.json``; the finished folder must hold classes (``--min_foreground``).

    Args:
        args: flags of :func:`add_rw_pseudo_label_args`.
        script: the script recorded in the manifest (both entry points record ``scripts/rw/make_pseudo_labels.py``).
    """
    _check_rw_flags(args)
    domains = rw_domains(args)
    folders = rw_folders(args, domains)
    out = rw_output_dir(args, folders, domains)
    check_writable(out, "--output", folder=True)
    jobs = _rw_jobs(args, domains, folders, out)
    inputs: dict[str, Any] = {
        f"rw@{paths.domain_name(d)}": manifest.folder_fingerprint(f) for d, f in zip(domains, folders, strict=True)
    }
    for domain, job, _ in jobs:
        if job.sal_dir is not None:
            inputs[f"saliency@{paths.domain_name(domain)}"] = manifest.folder_fingerprint(job.sal_dir)
    context = {"dataset": args.dataset, "data_dir": args.data_dir, "domains": list(domains)}
    outputs = out.glob(f"*{artifacts.PNG_SUFFIX}")
    with runtime.stage_run(args, "rw", script, out, inputs, context, ignore=_NAMING_FLAGS, outputs=outputs) as run:
        counts: Counter[str] = Counter()
        for domain, job, ids in jobs:
            counts += write_in_pool(job, ids, run, args.num_workers, f"pseudo labels of {domain}")
        run.counts = {key: counts[key] for key in ("written", "skipped", "background_only")}
        stats = summarise_folder(run, out, [i for _, _, ids in jobs for i in ids], args.num_workers, "pseudo labels")
        if stats is not None:
            remedy = (
                f"the RW scores rarely beat --threshold {args.threshold:g}; score the RW folders with "
                "scripts/evaluate.py --mode npy to find a better one"
            )
            require_classes(stats, out, args.min_foreground, remedy)
        return {**run.counts, "out_dir": str(out), "domains": list(domains)}
