"""Time the toolkit's stages on generated data; each benchmark is a subcommand.

    evaluate   N random VOC-sized CAM files + GT PNGs: time (a) only reading every CAM file and GT PNG, and
               (b) the full threshold sweep of core.evaluation, with the same worker count. The sweep should cost
               at most 1.5x the reading (it is one pass over the files).
    train      images/s of one training step of each CAM method (vanilla, puzzle, occse, poc, pnoc, mixup, fmix,
               manifold, subcategory = SC-CAM) on a random batch, through the training scripts' step code
               (core.cam.methods, core.cam.subcategory); warm-up steps excluded. Beside it the limit measured on the
               spot: one forward + backward of the same network and batch, nothing else (timed alternately with the
               steps, medians), and the step's share of it (pct_of_limit).
    inference  images/s of core.cam.cams.multiscale_cams_batch (multi-scale + flip CAMs of --batch_size random square
               images per call, as scripts/cam/inference.py --batch_size), of whole CAM files (the same plus
               save_cam), and the limit: the forward passes of the same scales and flips of the same images on
               prepared batches, nothing else (timed alternately, medians).
    ppc        PPC's overhead per training step: the vanilla and SEAM steps without --ppc, and with it at each
               second-view side of --views (SEAM's own view, x0.3, gives way to PPC's; the published recipe's
               128 px view of a 448 px crop is the same ratio), and PPC's loss alone (forward + backward on
               stand-in embeddings and CAMs of both views); overhead_pct = extra time over the step's own baseline
               (the loss alone: its time as a share of the vanilla step). Timed in turn, medians.
    saliency   images/s of the saliency stages, each beside its limit (stages.<name>.limit, pct_of_limit):
               ccam_train (C²AM-H step; limit: forward + backward of the C²AM network), ccam_inference (one image,
               --scales + flip, relu, averaged; limit: the bare forward passes), poolnet_train (PoolNet step, Adam,
               --head_scale; limit: forward + backward), poolnet_test (a batch; limit: the bare forward), crf (saliency
               masks of generated --size images in one process: read, threshold, 2-label CRF of --crf_t iterations,
               write; limit: the same CRFs on arrays in memory; images/s per worker).
    rw         seconds per image and peak memory of the random walk (core.rw.walk: sparse, float32) at --sizes
               (default half VOC, VOC 375x500, COCO 480x640) with random seeds and boundaries, beside the dense
               reference route (N x N, squared exp_times times) where N <= --dense_max_n; for larger sizes the
               dense route's memory (the N x N matrices) and its time scaled by N^3 from the largest one measured.
    seg        DeepLabV3+ images/s: train (core.segmentation.training's step: CE, momentum SGD of the x1/x10 groups;
               limit: forward + backward of the same network and batch) and inference (multi-scale + flip
               probabilities of one image, core.segmentation.predict; limit: the bare forward passes).
    pipeline   a projection of the whole pipeline's wall-clock hours on this device (one GPU, or the CPU) for the
               runners' recipe of --dataset voc12|coco14 (PIPELINE_RECIPES, the defaults of runners/config/*.sh):
               for every stage in the runners' order, the images of the domains it processes (DOMAIN_IMAGES) x its
               epochs or passes / the images/s measured here by the benchmarks above at the stage's architecture,
               crop, batch and scales, summed. Stages: ordinary classifier and P-NOC training, CAM inference,
               C²AM-H training and inference, saliency-mask CRF, PoolNet training and test, affinity labels,
               AffinityNet training, random walk (edge map + sparse walk), pseudo masks, DeepLabV3+ training and
               inference (+ softmax CRF). Marked "projection": true with what it leaves out (data loading,
               evaluation, checkpoints, start-up); a rate measured once serves all of a stage's domains. The CRF
               stages count --cpu_workers processes. --architecture / --size / --batch_size replace every stage's,
               --recipe KEY=VALUE any runner variable, --stages picks a subset.

Reads:  nothing (data are generated in a temporary folder or in memory)
Writes: one JSON object on stdout, e.g. {"read_s": 4.1, "sweep_s": 5.3, "ratio": 1.29, ...}
The number format and memory layout follow core.precision.compute_format, as in the scripts (--mixed_precision;
--channels_last true|false overrides the layout).
Example:
    python tools/benchmark.py evaluate --n 1000 --height 375 --width 500 --classes 3 --workers 8 --thresholds 16
    python tools/benchmark.py train --architecture resnet50 --size 320 --batch_size 8 --steps 5 --device cuda \
        --mixed_precision --channels_last
    python tools/benchmark.py inference --architecture resnet50 --size 320 --scales 0.5,1.0,1.5,2.0 --images 8
    python tools/benchmark.py ppc --architecture resnet18 --size 128 --views 128,32 --device cpu --threads 2
    python tools/benchmark.py saliency --architecture resnet18 --size 96 --batch_size 8 --head_scale 0.25 --device cpu
    python tools/benchmark.py rw --sizes 188x250,375x500,480x640 --classes 2 --device cpu --threads 2
    python tools/benchmark.py seg --architecture resnet50 --size 320 --batch_size 4 --device cpu
    python tools/benchmark.py pipeline --dataset voc12 --architecture resnet50 --size 320 --batch_size 4 --device cpu
    python tools/benchmark.py pipeline --dataset voc12 --device cuda --channels_last   # the recipe itself, AMP on
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from core import cli
from core.artifacts import cam_path, load_cam, save_cam, save_label_map, strided_size
from core.cam import methods, ppc, seam, subcategory
from core.cam.cams import multiscale_cams, multiscale_cams_batch, resize_bicubic
from core.cam.occse import LabelSplitter
from core.cam.ppc import PPCClassifier
from core.cam.seam import SeamClassifier
from core.ccam import training as ccam_training
from core.ccam.network import CCAM
from core.ccam.saliency_masks import SaliencyMaskJob, write_saliency_masks
from core.crf import crf_inference_labels, crf_inference_probs
from core.datasets import VOC_CLASSES, build_source
from core.distributed import DEVICES, resolve_device
from core.engine import TrainContext, add_training_args
from core.errors import WSSSError
from core.evaluation import evaluate_predictions, threshold_range
from core.labels import IGNORE_INDEX, compact_labels, pseudo_mask
from core.models import BACKBONES, Classifier, SubcategoryClassifier
from core.multiscale import flip_pairs_batch
from core.optim import build_optimizer, build_param_groups
from core.parallel import chunked, default_num_workers, parallel_map
from core.precision import ComputeFormat, compute_format, log_compute_format
from core.runtime import detached_run
from core.rw import losses as rw_losses
from core.rw import training as rw_training
from core.rw import walk as rw_walk
from core.rw.labels import affinity_labels
from core.rw.network import EDGE_STRIDE, AffinityNet
from core.segmentation import training as seg_training
from core.segmentation.predict import multiscale_probs
from poolnet import test as poolnet_test
from poolnet import train as poolnet_train
from poolnet.model import PoolNet

logger = logging.getLogger(__name__)

BENCH_DOMAIN = "bench"


# --------------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------------


def add_evaluate_args(parser: argparse.ArgumentParser) -> None:
    cli.add_arg(parser, "--n", type=int, default=1000, help="number of generated images (default 1000)")
    cli.add_arg(parser, "--height", type=int, default=375, help="image height (default 375, VOC-like)")
    cli.add_arg(parser, "--width", type=int, default=500, help="image width (default 500)")
    cli.add_arg(parser, "--classes", type=int, default=3, help="CAM planes (present classes) per image (default 3)")
    cli.add_arg(parser, "--workers", type=int, default=default_num_workers(), help="processes (default min(8, CPUs))")
    cli.add_arg(parser, "--thresholds", type=int, default=16, help="thresholds of the sweep, step 0.05 from 0.05")
    cli.add_arg(parser, "--repeat", type=int, default=2, help="time each phase this many times, keep the fastest")
    cli.add_arg(parser, "--seed", type=int, default=0, help="random seed of the generated data")


def _random_gt(rng: np.random.Generator, keys: np.ndarray, height: int, width: int) -> np.ndarray:
    """A VOC-like mask: background, one rectangle per class with a 255 border band (compresses like real GT)."""
    gt = np.zeros((height, width), dtype=np.uint8)
    for key in keys:
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        bottom, right = top + rng.integers(height // 8, height // 2), left + rng.integers(width // 8, width // 2)
        gt[top:bottom, left:right] = 255
        gt[top + 3 : bottom - 3, left + 3 : right - 3] = key
    return gt


def _random_cams(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Smooth random maps in [0, 1]: float32 [n, H, W] (coarse noise upsampled, max-normalised like real CAMs)."""
    coarse = rng.random((n, height // 16 + 2, width // 16 + 2), dtype=np.float32)
    rows = np.linspace(0, coarse.shape[1] - 1, height).astype(np.int64)
    cols = np.linspace(0, coarse.shape[2] - 1, width).astype(np.int64)
    cams = coarse[:, rows][:, :, cols] * rng.random((n, height, width), dtype=np.float32) ** 0.1
    return cams / cams.max(axis=(1, 2), keepdims=True)


def _smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: smooth random colours (a CRF's cost depends on the image; noise would inflate it)."""
    return (255 * _random_cams(rng, 3, size, size)).astype(np.uint8).transpose(1, 2, 0)


def custom_layout(root: Path, n: int) -> list[str]:
    """A ``custom`` dataset skeleton under ``root`` (folders, classes.txt, the bench id list); returns its ids."""
    ids = [f"img_{i:06d}" for i in range(n)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    (root / "lists" / f"{BENCH_DOMAIN}.txt").write_text("\n".join(ids) + "\n")
    return ids


def generate_evaluation_data(root: Path, n: int, height: int, width: int, classes: int, seed: int) -> Path:
    """Write a ``custom`` dataset (masks, classes.txt, id list) and CAM files under ``root``; returns the CAM dir."""
    rng = np.random.default_rng(seed)
    ids = custom_layout(root, n)
    cam_dir = root / "cams"
    strided = strided_size(height, width)
    for image_id in ids:
        keys = np.sort(rng.choice(np.arange(1, len(VOC_CLASSES)), size=classes, replace=False))
        hr_cam = _random_cams(rng, classes, height, width)
        save_cam(cam_path(cam_dir, image_id), keys, hr_cam[:, ::4, ::4][:, : strided[0], : strided[1]], hr_cam)
        save_label_map(root / "masks" / f"{image_id}.png", _random_gt(rng, keys, height, width))
    return cam_dir


def _read_files(source: Any, items: list[tuple[str, Path]]) -> int:
    """Read what the sweep reads (keys + hr_cam, GT mask) and nothing else; returns the number of pixels read."""
    pixels = 0
    for image_id, path in items:
        pixels += load_cam(path, with_cam=False).hr_cam.size + source.read_mask(image_id).size
    return pixels


def _best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    thresholds = threshold_range(0.05, 0.05 * args.thresholds, 0.05)
    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        cam_dir = generate_evaluation_data(root, args.n, args.height, args.width, args.classes, args.seed)
        generate_s = time.perf_counter() - start
        source = build_source("custom", root, BENCH_DOMAIN)
        items = [(i, cam_path(cam_dir, i)) for i in source.ids]
        chunks = chunked(items, max(1, args.workers) * 8)  # the chunking core.evaluation uses
        read = functools.partial(_read_files, source)
        _read_files(source, items[: min(len(items), 20)])  # warm imports and caches outside the timings
        read_s, _ = _best_time(lambda: parallel_map(read, chunks, args.workers, progress=False), args.repeat)
        sweep_s, result = _best_time(
            lambda: evaluate_predictions(source, cam_dir, "npy", thresholds, num_workers=args.workers, progress=False),
            args.repeat,
        )
    return {
        "benchmark": "evaluate",
        "n": args.n,
        "height": args.height,
        "width": args.width,
        "classes": args.classes,
        "workers": args.workers,
        "thresholds": len(thresholds),
        "generate_s": round(generate_s, 3),
        "read_s": round(read_s, 3),
        "sweep_s": round(sweep_s, 3),
        "ratio": round(sweep_s / read_s, 3),
        "read_ms_per_image": round(1000 * read_s / args.n, 3),
        "sweep_ms_per_image": round(1000 * sweep_s / args.n, 3),
        "best_miou": round(result.results[result.best]["miou"], 3),
    }


# --------------------------------------------------------------------------------------------------------------------
# train and inference (random tensors, random weights)
# --------------------------------------------------------------------------------------------------------------------

# vanilla, puzzle, occse, poc, pnoc, the mixing methods (mixup, fmix, manifold) and SC-CAM's sub-category step
TRAIN_METHODS = (*methods.METHOD_PARTS, "subcategory")
SUBCLASSES_PER_CLASS = 10  # SC-CAM's k-means K (core.cam.subcategory.DEFAULT_N_CLUSTERS)
BENCH_CLASSES = 20  # VOC's foreground classes


def add_model_args(parser: argparse.ArgumentParser, size: int) -> None:
    """Flags shared by ``train`` and ``inference``: network, input size, device and speed switches."""
    cli.add_arg(parser, "--architecture", type=str, default="resnet18", choices=list(BACKBONES), help="backbone")
    cli.add_arg(parser, "--size", type=int, default=size, help=f"square input side in pixels (default {size})")
    cli.add_arg(parser, "--device", type=str, default="auto", choices=DEVICES, help="auto = cuda when available")
    cli.add_bool_arg(
        parser, "--mixed_precision", False, "autocast as the scripts do (core.precision: bf16 where native, else ...)"
    )
    cli.add_arg(
        parser,
        "--channels_last",
        type=cli.str2bool,
        nargs="?",
        const=True,
        default=None,
        metavar="true|false",
        help="channels-last memory format (default: core.precision's rule for the device and dtype)",
    )
    cli.add_arg(parser, "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    cli.add_arg(parser, "--seed", type=int, default=0, help="random seed of weights and data")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, size=128)
    cli.add_arg(parser, "--batch_size", type=int, default=8, help="images per step (default 8)")
    cli.add_arg(parser, "--steps", type=int, default=5, help="timed steps per method (default 5)")
    cli.add_arg(parser, "--warmup", type=int, default=2, help="untimed steps first (default 2)")
    cli.add_arg(
        parser,
        "--methods",
        type=cli.str_list,
        default=list(TRAIN_METHODS),
        help=f"comma-separated subset of {','.join(TRAIN_METHODS)}",
    )


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, size=320)
    cli.add_arg(parser, "--scales", type=cli.float_list, default=[0.5, 1.0, 1.5, 2.0], help="comma-separated scales")
    cli.add_arg(parser, "--images", type=int, default=8, help="timed calls (default 8), of --batch_size images each")
    cli.add_arg(parser, "--warmup", type=int, default=1, help="untimed calls first (default 1)")
    cli.add_arg(
        parser,
        "--batch_size",
        type=cli.positive_int,
        default=1,
        help="images per forward pass, as scripts/cam/inference.py --batch_size (default 1)",
    )
    cli.add_arg(parser, "--classes", type=int, default=2, help="GT classes kept per image (default 2)")


def _setup_torch(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return resolve_device(args.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, called in turn ``repeat`` times after ``warmup`` untimed rounds.

    Taking turns exposes a measurement and its limit to the same load of a shared machine.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeat)):
        for name, fn in fns.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def _compute(args: argparse.Namespace, device: torch.device) -> ComputeFormat:
    fmt = compute_format(bool(args.mixed_precision), device, args.channels_last)
    log_compute_format(fmt, f"benchmark {args.benchmark}")
    return fmt


def _inference_model(args: argparse.Namespace, device: torch.device, fmt: ComputeFormat) -> nn.Module:
    model = Classifier(args.architecture, BENCH_CLASSES, backbone_weights="none").to(device).eval()
    return model.to(memory_format=torch.channels_last) if fmt.channels_last else model


def method_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The training scripts' flags at their defaults (one epoch, no smoothing), with this benchmark's AMP switch."""
    parser = argparse.ArgumentParser(add_help=False)
    add_training_args(parser)
    methods.add_puzzle_args(parser)
    methods.add_oc_args(parser)
    methods.add_pnoc_args(parser)
    subcategory.add_subcategory_args(parser)
    ppc.add_ppc_args(parser)
    seam.add_seam_args(parser)
    flags = parser.parse_args(["--subcategories", "random"])  # the table is generated (random_sub_labels)
    flags.label_smoothing = 0.0
    flags.mixed_precision = bool(args.mixed_precision)
    flags.max_epoch = 1
    flags.batch_size = args.batch_size
    return flags


def bench_context(args: argparse.Namespace, flags: argparse.Namespace, device: torch.device) -> TrainContext:
    """A :class:`TrainContext` for one process that writes nothing (no run folder, metrics or W&B)."""
    run = detached_run(flags, device, args.batch_size)
    return TrainContext(run, steps_per_epoch=args.warmup + args.steps, channels_last=args.channels_last)


def build_train_step(
    method: str, args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], None], dict[str, nn.Module]]:
    """One training step of ``method`` on a fixed random batch, through the scripts' own step code.

    The step is :func:`core.cam.methods.build_step_fn`'s (the function ``core.engine.fit`` calls per batch): forward,
    losses, backward and SGD step of the CAM generator ``cg`` and, for P-NOC, the ordinary classifier's ``oc`` step;
    OC-CSE and P-OC use a frozen ``oc``. ``subcategory`` is SC-CAM's step
    (:func:`core.cam.subcategory.build_subcategory_step`: parent + sub-category loss of a
    :class:`~core.models.SubcategoryClassifier`, no teacher) on a random id -> sub-label table.

    Returns:
        The step (no arguments) and its networks: ``cg`` and, for the OC-CSE family, ``oc``.
    """
    flags = method_flags(args)
    ctx = bench_context(args, flags, device)
    batch = _random_batch(args)
    batch["label"][:, 0] = 1.0  # every image has a class to erase
    if method == "subcategory":
        return _subcategory_step(args, flags, ctx, batch)
    cg = Classifier(args.architecture, BENCH_CLASSES, backbone_weights="none")
    ctx.add("cg", cg, torch.optim.SGD(cg.parameters(), lr=1e-4))
    splitter = None
    if "oc" in methods.METHOD_PARTS[method]:
        oc = Classifier(args.architecture, BENCH_CLASSES, backbone_weights="none", mode="fix")
        trained = "adversary" in methods.METHOD_PARTS[method]
        if not trained:
            oc.requires_grad_(False)
        ctx.add("oc", oc, torch.optim.SGD(oc.parameters(), lr=1e-4) if trained else None)
        splitter = LabelSplitter(BENCH_CLASSES)
    step_fn = methods.build_step_fn(method, flags, splitter)
    return engine_step(step_fn, ctx, batch), {name: ctx.module(name) for name in ctx.members}


def engine_step(step_fn: Callable[..., Any], ctx: TrainContext, batch: dict[str, Any]) -> Callable[[], None]:
    """``step_fn(ctx, batch, index)`` as ``core.engine.fit`` calls it, as a call without arguments (index counted)."""
    counter = iter(range(1 << 62))

    def step() -> None:
        index = next(counter)
        step_fn(ctx, batch, index)
        ctx.step = index + 1

    return step


def random_sub_labels(labels: torch.Tensor, ids: list[str], seed: int) -> dict[str, np.ndarray]:
    """A random id -> sub-label table: one of the :data:`SUBCLASSES_PER_CLASS` sub-classes of each present class."""
    rng = np.random.default_rng(seed)
    table = {}
    for image_id, label in zip(ids, labels.numpy(), strict=True):
        sub = np.zeros(BENCH_CLASSES * SUBCLASSES_PER_CLASS, dtype=np.float32)
        for c in np.flatnonzero(label):
            sub[c * SUBCLASSES_PER_CLASS + rng.integers(SUBCLASSES_PER_CLASS)] = 1.0
        table[image_id] = sub
    return table


def _subcategory_step(
    args: argparse.Namespace, flags: argparse.Namespace, ctx: TrainContext, batch: dict[str, Any]
) -> tuple[Callable[[], None], dict[str, nn.Module]]:
    """SC-CAM's step (:func:`core.cam.subcategory.build_subcategory_step`, no teacher) on a random sub-label table."""
    batch["id"] = [f"img_{i:06d}" for i in range(args.batch_size)]
    table = random_sub_labels(batch["label"], batch["id"], args.seed)
    cg = SubcategoryClassifier(
        args.architecture, BENCH_CLASSES, num_subclasses=BENCH_CLASSES * SUBCLASSES_PER_CLASS, backbone_weights="none"
    )
    ctx.add("cg", cg, torch.optim.SGD(cg.parameters(), lr=1e-4))
    step_fn = subcategory.build_subcategory_step(flags, table, None)
    return engine_step(step_fn, ctx, batch), {"cg": ctx.module("cg")}


def _random_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    return {
        "image": torch.randn(args.batch_size, 3, args.size, args.size, generator=generator),
        "label": (torch.rand(args.batch_size, BENCH_CLASSES, generator=generator) < 0.1).float(),
    }


def build_limit_step(args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """The limit of a training step: one forward + backward of the CAM generator on the same batch, nothing else.

    Same network, batch, number format and memory format as :func:`build_train_step`; no loss terms beyond a sum,
    no optimizer step.
    """
    ctx = bench_context(args, method_flags(args), device)
    model = Classifier(args.architecture, BENCH_CLASSES, backbone_weights="none")
    return forward_backward(ctx, model, _random_batch(args)["image"])


def forward_backward(ctx: TrainContext, model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """A training limit: one forward of ``model`` (train mode, the context's formats) on ``images`` and the backward
    of the sum of its outputs, nothing else (no loss terms, no optimizer step)."""
    model = ctx.prepare(model).train()
    images = ctx.to_device(images)

    def run() -> None:
        with ctx.autocast():
            outputs = model(images)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        sum(output.float().sum() for output in outputs).backward()
        model.zero_grad(set_to_none=True)

    return run


def _rates(images: int, seconds: float, limit_s: float) -> dict[str, float]:
    return {
        "images_per_s": round(images / seconds, 3),
        "step_ms": round(1000 * seconds, 1),
        "limit_ms": round(1000 * limit_s, 1),  # the limit timed in turn with this method's steps
        "pct_of_limit": round(100 * limit_s / seconds, 1),
    }


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    unknown = sorted(set(args.methods) - set(TRAIN_METHODS))
    if unknown:
        raise WSSSError(f"unknown --methods {','.join(unknown)}; choose from {','.join(TRAIN_METHODS)}")
    if args.size % (2 * 16) and set(args.methods) & {"puzzle", "poc", "pnoc"}:
        raise WSSSError(f"--size {args.size}: Puzzle tiling needs a multiple of 32 (2 tiles x output stride 16)")
    device = _setup_torch(args)
    fmt = _compute(args, device)
    limit = build_limit_step(args, device)
    methods, limit_times = {}, []
    for method in args.methods:
        step, _ = build_train_step(method, args, device)
        seconds = _interleaved({"step": step, "limit": limit}, args.steps, args.warmup, device)
        limit_times.append(seconds["limit"])
        methods[method] = _rates(args.batch_size, seconds["step"], seconds["limit"])
        logger.info("%s: %.1f ms per step of %d images", method, 1000 * seconds["step"], args.batch_size)
    limit_s = float(np.median(limit_times))
    return {
        "benchmark": "train",
        "architecture": args.architecture,
        "size": args.size,
        "batch_size": args.batch_size,
        "device": str(device),
        "mixed_precision": bool(args.mixed_precision),
        "amp_dtype": str(fmt.amp_dtype or torch.float32).replace("torch.", ""),
        "channels_last": fmt.channels_last,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "step_code": "core.cam.methods.build_step_fn (subcategory: core.cam.subcategory.build_subcategory_step)",
        "limit": {
            "what": "forward + backward of the CAM generator on the same batch",
            "images_per_s": round(args.batch_size / limit_s, 3),
            "step_ms": round(1000 * limit_s, 1),
        },
        "methods": methods,
    }


def _scale_batches(
    images: list[np.ndarray], scales: list[float], fmt: ComputeFormat, device: torch.device
) -> list[torch.Tensor]:
    """The batch of every scale (each image followed by its mirror), as multiscale_cams_batch feeds them (prepared
    outside the timing)."""
    return [
        flip_pairs_batch([resize_bicubic(image, scale) for image in images], device, fmt.channels_last)
        for scale in scales
    ]


def cam_inference_bench(
    args: argparse.Namespace, device: torch.device, fmt: ComputeFormat, folder: Path, batch: int = 1
) -> dict[str, Callable[[], Any]]:
    """CAM inference of ``batch`` random ``--size`` square images with ``--classes`` GT classes each, in one call:
    ``cams`` (multi-scale + flip, :func:`core.cam.cams.multiscale_cams_batch`), ``file`` (the same plus
    :func:`save_cam` of each into ``folder``) and ``limit`` (the forward passes of the same scales and flips on prepared
    batches, nothing else)."""
    model = _inference_model(args, device, fmt)
    rng = np.random.default_rng(args.seed)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(batch)]
    keys = [np.sort(rng.choice(np.arange(1, BENCH_CLASSES + 1), args.classes, replace=False)) for _ in range(batch)]
    batches = _scale_batches(images, args.scales, fmt, device)

    def cams() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return multiscale_cams_batch(
            model,
            images,
            args.scales,
            device=device,
            keys=keys,
            amp_dtype=fmt.amp_dtype,
            channels_last=fmt.channels_last,
        )

    def files() -> None:
        for index, result in enumerate(cams()):
            save_cam(folder / f"cam{index}.npz", *result)

    def forwards() -> None:
        with torch.inference_mode(), fmt.autocast():
            for scale_batch in batches:
                model(scale_batch, with_cam=True)

    return {"limit": forwards, "cams": cams, "file": files}


def run_inference(args: argparse.Namespace) -> dict[str, Any]:
    if not 1 <= args.classes <= BENCH_CLASSES:
        raise WSSSError(f"--classes must lie in 1..{BENCH_CLASSES}, got {args.classes}")
    device = _setup_torch(args)
    fmt = _compute(args, device)
    batch = args.batch_size
    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        bench = cam_inference_bench(args, device, fmt, Path(tmp), batch)
        seconds = _interleaved(bench, args.images, args.warmup, device)
    return {
        "benchmark": "inference",
        "architecture": args.architecture,
        "size": args.size,
        "scales": list(args.scales),
        "images": args.images * batch,
        "batch_size": batch,
        "classes": args.classes,
        "device": str(device),
        "mixed_precision": bool(args.mixed_precision),
        "amp_dtype": str(fmt.amp_dtype or torch.float32).replace("torch.", ""),
        "channels_last": fmt.channels_last,
        "threads": torch.get_num_threads(),
        "images_per_s": round(batch / seconds["cams"], 3),
        "ms_per_image": round(1000 * seconds["cams"] / batch, 1),
        "file_images_per_s": round(batch / seconds["file"], 3),
        "file_ms_per_image": round(1000 * seconds["file"] / batch, 1),
        "limit": {
            "what": "forward passes of the scales and flips of the same images, batch_size images per pass",
            "images_per_s": round(batch / seconds["limit"], 3),
            "ms_per_image": round(1000 * seconds["limit"] / batch, 1),
        },
        "pct_of_limit": round(100 * seconds["limit"] / seconds["cams"], 1),
        "file_pct_of_limit": round(100 * seconds["limit"] / seconds["file"], 1),
    }


# --------------------------------------------------------------------------------------------------------------------
# ppc: the overhead of PPC's pixel-to-prototype contrast on the vanilla and SEAM steps
# --------------------------------------------------------------------------------------------------------------------


def add_ppc_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, size=128)
    cli.add_arg(parser, "--batch_size", type=int, default=8, help="images per step (default 8)")
    cli.add_arg(parser, "--steps", type=int, default=7, help="timed steps per variant (default 7)")
    cli.add_arg(parser, "--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    cli.add_arg(
        parser, "--views", type=cli.str_list, default=["128", "32"], help="PPC second-view sides to time (default "
        "128,32: the flag's default, and the recipe's 512 : 128 ratio at a 128 px crop)"
    )  # fmt: skip


def ppc_step(
    args: argparse.Namespace, device: torch.device, method: str, view: int | None
) -> tuple[Callable[[], None], nn.Module]:
    """One training step of a fresh random ``vanilla`` or ``seam`` generator, with ``--ppc true --ppc_view_size view``
    unless ``view`` is None, on the fixed random batch, through the scripts' step code; and the generator."""
    flags = method_flags(args)
    flags.ppc, flags.ppc_view_size = view is not None, view or flags.ppc_view_size
    ctx = bench_context(args, flags, device)
    batch = _random_batch(args)
    batch["label"][:, 0] = 1.0
    torch.manual_seed(args.seed)
    config = ppc.PPCConfig.from_args(flags)
    if method == "seam":
        cg: nn.Module = SeamClassifier(
            args.architecture, BENCH_CLASSES, backbone_weights="none", ppc_dim=config.dim if config else None
        )
        step_fn = seam.build_seam_step(flags)
    else:
        kind = PPCClassifier if config else Classifier
        cg = kind(args.architecture, BENCH_CLASSES, backbone_weights="none")
        step_fn = methods.build_step_fn("vanilla", flags)
    ctx.add("cg", cg, torch.optim.SGD(cg.parameters(), lr=1e-4))
    ctx.train_mode()
    return engine_step(step_fn, ctx, batch), ctx.module("cg")


def ppc_loss_only(args: argparse.Namespace, device: torch.device, view: int) -> Callable[[], None]:
    """PPC's loss forward + backward alone on stand-in embeddings and CAMs of both views (stride 16, 128-d): what PPC
    adds to a method that already runs a second view (SEAM, EPS)."""
    g = torch.Generator().manual_seed(args.seed)
    side1, side2 = -(-args.size // 16), -(-view // 16)

    def tensor(channels: int, side: int, grad: bool = False) -> torch.Tensor:
        values = torch.rand(args.batch_size, channels, side, side, generator=g).to(device)
        return values.requires_grad_(grad)

    emb1, emb2 = tensor(128, side1, True), tensor(128, side2, True)
    cams1, cams2 = tensor(BENCH_CLASSES + 1, side1), tensor(BENCH_CLASSES + 1, side2)
    labels = (torch.rand(args.batch_size, BENCH_CLASSES, generator=g) < 0.15).float().to(device)

    def run() -> None:
        loss, _ = ppc.ppc_loss(emb1, emb2, cams1, cams2, labels, bg_score=0.2, topk_fraction=1 / 8)
        loss.backward()

    return run


def run_ppc(args: argparse.Namespace) -> dict[str, Any]:
    views = [int(view) for view in args.views]
    if any(view < 16 for view in views):
        raise WSSSError(f"--views {','.join(args.views)}: every view needs at least 16 px (one cell at stride 16)")
    device = _setup_torch(args)
    fmt = _compute(args, device)
    fns = {}
    for method in ("vanilla", "seam"):
        fns[method] = ppc_step(args, device, method, None)[0]
        fns |= {f"{method}+ppc@{view}": ppc_step(args, device, method, view)[0] for view in views}
    fns |= {f"ppc_loss@{view}": ppc_loss_only(args, device, view) for view in views}
    seconds = _interleaved(fns, args.steps, args.warmup, device)

    def overhead(name: str) -> float:  # full steps: over their own baseline; the loss alone: share of vanilla's step
        base = seconds[name.split("+")[0]] if "+" in name else seconds["vanilla"]
        return round(100 * (seconds[name] - base if "+" in name else seconds[name]) / base, 1)

    return {
        "benchmark": "ppc",
        "architecture": args.architecture,
        "size": args.size,
        "batch_size": args.batch_size,
        "device": str(device),
        "mixed_precision": bool(args.mixed_precision),
        "amp_dtype": str(fmt.amp_dtype or torch.float32).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "step_code": "core.cam.methods.build_step_fn('vanilla'), core.cam.seam.build_seam_step",
        "step_ms": {name: round(1000 * value, 1) for name, value in seconds.items()},
        "images_per_s": {
            name: round(args.batch_size / value, 3) for name, value in seconds.items() if "loss" not in name
        },
        "overhead_pct": {name: overhead(name) for name in seconds if name not in ("vanilla", "seam")},
    }


# --------------------------------------------------------------------------------------------------------------------
# saliency: C²AM-H, PoolNet and the CRF of the saliency masks (random weights, generated data)
# --------------------------------------------------------------------------------------------------------------------

SALIENCY_STAGES = ("ccam_train", "ccam_inference", "poolnet_train", "poolnet_test", "crf")


def add_saliency_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, size=128)
    cli.add_arg(
        parser, "--batch_size", type=cli.positive_int, default=8, help="images per training step and PoolNet test batch"
    )
    cli.add_arg(parser, "--steps", type=int, default=5, help="timed calls per stage (default 5)")
    cli.add_arg(parser, "--warmup", type=int, default=1, help="untimed calls first (default 1)")
    cli.add_arg(parser, "--scales", type=cli.float_list, default=[0.5, 1.0, 1.5, 2.0], help="C²AM inference scales")
    cli.add_arg(
        parser, "--head_scale", type=float, default=1.0, help="PoolNet head widths (1 = the reference's; 0.25 CPU)"
    )
    cli.add_arg(parser, "--crf_images", type=cli.positive_int, default=8, help="images per CRF call (default 8)")
    cli.add_arg(parser, "--crf_t", type=int, default=10, help="CRF iterations (inference_crf.py's default 10)")
    cli.add_arg(
        parser,
        "--stages",
        type=cli.str_list,
        default=list(SALIENCY_STAGES),
        help=f"comma-separated subset of {','.join(SALIENCY_STAGES)}",
    )


def _stage_rates(images: int, seconds: float, limit_s: float, what: str) -> dict[str, Any]:
    return {
        "images_per_s": round(images / seconds, 3),
        "ms_per_image": round(1000 * seconds / images, 2),
        "limit": {
            "what": what,
            "images_per_s": round(images / limit_s, 3),
            "ms_per_image": round(1000 * limit_s / images, 2),
        },
        "pct_of_limit": round(100 * limit_s / seconds, 1),
    }


def ccam_train_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    """C²AM-H's training step (:func:`core.ccam.training.make_step_fn` with hints: contrastive + hint losses, SGD
    step of the paper's parameter groups) on random images and hints; limit: forward + backward of a C²AM network."""
    flags = ccam_training.get_args_parser("benchmark", "", hints=True).parse_args([])
    flags.architecture, flags.backbone_weights = args.architecture, "none"
    flags.batch_size, flags.max_epoch, flags.mixed_precision = args.batch_size, 1, bool(args.mixed_precision)
    ctx = bench_context(args, flags, device)
    ccam_training.add_network(ctx, flags)
    generator = torch.Generator().manual_seed(args.seed)
    batch = {
        "image": torch.randn(args.batch_size, 3, args.size, args.size, generator=generator),
        "hint": torch.rand(args.batch_size, 1, args.size, args.size, generator=generator),
    }
    step = engine_step(ccam_training.make_step_fn(flags, hints=True), ctx, batch)
    return {"stage": step, "limit": forward_backward(ctx, ccam_training.network_from_flags(flags), batch["image"])}


def ccam_inference_bench(args: argparse.Namespace, device: torch.device, fmt: ComputeFormat) -> dict:
    """C²AM inference of one image (:func:`core.multiscale.multiscale_cams` with relu and average, as
    scripts/ccam/inference.py); limit: the forward passes of the same scales and flips on prepared batches."""
    model = CCAM(args.architecture, backbone_weights="none").to(device).eval()
    model = model.to(memory_format=torch.channels_last) if fmt.channels_last else model
    image = np.random.default_rng(args.seed).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    batches = _scale_batches([image], args.scales, fmt, device)

    def maps() -> None:
        multiscale_cams(
            model,
            image,
            args.scales,
            device=device,
            keys=np.array([1]),
            amp_dtype=fmt.amp_dtype,
            channels_last=fmt.channels_last,
            activation="relu",
            average=True,
        )

    def forwards() -> None:
        with torch.inference_mode(), fmt.autocast():
            for batch in batches:
                model(batch, with_cam=True)

    return {"stage": maps, "limit": forwards}


def _poolnet_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """A batch as poolnet.data.pad_collate gives it: RGB 0..255 images, 0/1 saliency labels, all pixels valid."""
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, 1, args.size, args.size)
    return {
        "image": 255 * torch.rand(args.batch_size, 3, args.size, args.size, generator=generator),
        "label": (torch.rand(shape, generator=generator) > 0.5).float(),
        "valid": torch.ones(shape, dtype=torch.bool),
    }


def poolnet_train_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    """PoolNet's training step (poolnet.train.make_step_fn: BCE over valid pixels, Adam step of its parameter groups,
    every step an optimizer step: --accumulate_steps 1); limit: forward + backward of a PoolNet."""
    flags = poolnet_train.get_args_parser().parse_args([])
    flags.batch_size, flags.max_epoch, flags.accumulate_steps = args.batch_size, 1, 1
    flags.mixed_precision = bool(args.mixed_precision)
    ctx = bench_context(args, flags, device)
    model = PoolNet(args.architecture, backbone_weights="none", head_scale=args.head_scale)
    groups = build_param_groups(model.param_groups(), flags.lr, flags.wd, flags.lr_alpha_scratch, flags.lr_alpha_bias)
    ctx.add("poolnet", model, build_optimizer(groups, flags.optimizer))
    batch = _poolnet_batch(args)
    step = engine_step(poolnet_train.make_step_fn(args.batch_size), ctx, batch)
    limit = forward_backward(ctx, PoolNet(args.architecture, head_scale=args.head_scale), batch["image"])
    return {"stage": step, "limit": limit}


def poolnet_test_bench(args: argparse.Namespace, device: torch.device, fmt: ComputeFormat) -> dict:
    """PoolNet test of a batch (poolnet.test.predict_batch: forward, sigmoid, maps to the CPU); limit: the bare
    forward. The test script's upscaling of small images (--small_side) is not applied: pass the upscaled --size."""
    model = PoolNet(args.architecture, head_scale=args.head_scale).to(device).eval()
    model = model.to(memory_format=torch.channels_last) if fmt.channels_last else model
    images = _poolnet_batch(args)["image"].to(device)
    images = images.contiguous(memory_format=torch.channels_last) if fmt.channels_last else images
    sizes = [(args.size, args.size)] * args.batch_size

    def forward() -> None:
        with torch.inference_mode(), fmt.autocast():
            model(images)

    return {"stage": lambda: poolnet_test.predict_batch(model, images, sizes, fmt.autocast), "limit": forward}


def generate_saliency_data(root: Path, n: int, size: int, seed: int) -> tuple[Any, Path]:
    """A ``custom`` dataset of ``n`` smooth random RGB images and their one-plane C²AM CAM files (keys [1]) under
    ``root``; returns the source and the CAM folder."""
    rng = np.random.default_rng(seed)
    ids = custom_layout(root, n)
    cam_dir = root / "cams"
    strided = strided_size(size, size)
    for image_id in ids:
        image = _smooth_image(rng, size)
        Image.fromarray(image).save(root / "images" / f"{image_id}.png")
        hr_cam = _random_cams(rng, 1, size, size)
        save_cam(cam_path(cam_dir, image_id), np.array([1]), hr_cam[:, ::4, ::4][:, : strided[0], : strided[1]], hr_cam)
    return build_source("custom", root, BENCH_DOMAIN), cam_dir


def crf_bench(args: argparse.Namespace, root: Path) -> dict[str, Callable[[], None]]:
    """The saliency masks of ``--crf_images`` generated images in one process (core.ccam.saliency_masks'
    write_saliency_masks: read the CAM file and the image, threshold 0.3, 2-label CRF, write the PNG); limit: the
    same CRFs on arrays already in memory."""
    source, cam_dir = generate_saliency_data(root, args.crf_images, args.size, args.seed)
    job = SaliencyMaskJob(source, cam_dir, root / "masks_out", crf_t=args.crf_t)
    ids = list(source.ids)
    inputs = [(source.read_image(i), compact_labels(job.foreground_map(i)[None], job.threshold)) for i in ids]

    def crfs() -> None:
        for image, labels in inputs:
            crf_inference_labels(image, labels, 2, t=args.crf_t, gt_prob=job.crf_gt_prob)

    return {"stage": lambda: write_saliency_masks(job, ids), "limit": crfs}


SALIENCY_LIMITS = {
    "ccam_train": "forward + backward of the C²AM network on the same batch",
    "ccam_inference": "forward passes of the scales and flips of the same image",
    "poolnet_train": "forward + backward of PoolNet on the same batch",
    "poolnet_test": "forward of PoolNet on the same batch",
    "crf": "the 2-label CRFs of the same images and maps in memory",
}


def run_saliency(args: argparse.Namespace) -> dict[str, Any]:
    unknown = sorted(set(args.stages) - set(SALIENCY_STAGES))
    if unknown:
        raise WSSSError(f"unknown --stages {','.join(unknown)}; choose from {','.join(SALIENCY_STAGES)}")
    if args.crf_t < 1 and "crf" in args.stages:
        raise WSSSError(f"--crf_t {args.crf_t}: the CRF benchmark needs at least 1 iteration")
    device = _setup_torch(args)
    fmt = _compute(args, device)
    stages: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        builders = {
            "ccam_train": lambda: ccam_train_bench(args, device),
            "ccam_inference": lambda: ccam_inference_bench(args, device, fmt),
            "poolnet_train": lambda: poolnet_train_bench(args, device),
            "poolnet_test": lambda: poolnet_test_bench(args, device, fmt),
            "crf": lambda: crf_bench(args, Path(tmp)),
        }
        images = {"ccam_inference": 1, "crf": args.crf_images}
        for stage in args.stages:
            seconds = _interleaved(builders[stage](), args.steps, args.warmup, device)
            count = images.get(stage, args.batch_size)
            stages[stage] = _stage_rates(count, seconds["stage"], seconds["limit"], SALIENCY_LIMITS[stage])
            logger.info("%s: %.3f images/s", stage, stages[stage]["images_per_s"])
    return {
        "benchmark": "saliency",
        "architecture": args.architecture,
        "size": args.size,
        "batch_size": args.batch_size,
        "scales": list(args.scales),
        "head_scale": args.head_scale,
        "crf_t": args.crf_t,
        "crf_images": args.crf_images,
        "device": str(device),
        "mixed_precision": bool(args.mixed_precision),
        "amp_dtype": str(fmt.amp_dtype or torch.float32).replace("torch.", ""),
        "channels_last": fmt.channels_last,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "stages": stages,
    }


# --------------------------------------------------------------------------------------------------------------------
# rw (the random walk of core.rw.walk on random seeds and boundaries)
# --------------------------------------------------------------------------------------------------------------------

RW_SIZES = ("188x250", "375x500", "480x640")  # half VOC (the dense route fits), VOC, COCO


def image_sizes(value: str) -> list[tuple[int, int]]:
    """``"375x500,480x640"`` -> ``[(375, 500), (480, 640)]`` (height x width)."""
    try:
        sizes = [tuple(int(side) for side in item.split("x")) for item in cli.str_list(value)]
    except ValueError:
        sizes = []
    if not sizes or any(len(size) != 2 or min(size) < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected HxW sizes such as 375x500,480x640, got {value!r}")
    return sizes  # type: ignore[return-value]


def add_rw_args(parser: argparse.ArgumentParser) -> None:
    sizes = ",".join(RW_SIZES)
    cli.add_arg(parser, "--sizes", type=image_sizes, default=image_sizes(sizes), help=f"image sizes (default {sizes})")
    cli.add_arg(parser, "--classes", type=cli.positive_int, default=2, help="CAM planes per image (default 2)")
    cli.add_arg(parser, "--beta", type=float, default=10.0, help="affinity exponent (default 10)")
    cli.add_arg(parser, "--exp_times", type=int, default=8, help="2^exp_times steps (default 8)")
    cli.add_arg(parser, "--images", type=cli.positive_int, default=3, help="timed walks per size (median)")
    cli.add_arg(
        parser,
        "--dense_max_n",
        type=int,
        default=3000,
        help="run the dense reference route only up to this many stride-4 pixels (default 3000; it is O(N^3))",
    )
    cli.add_arg(parser, "--device", type=str, default="auto", choices=DEVICES, help="auto = cuda when available")
    cli.add_arg(parser, "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    cli.add_arg(parser, "--seed", type=int, default=0, help="random seed of the maps")


def _peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Growth of the peak memory while ``fn`` runs: CUDA allocations, or the process's peak RSS (Linux only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    except OSError:
        return None

    def peak_kb() -> int:
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:"))

    base = peak_kb()
    fn()
    return (peak_kb() - base) / 1024


def rw_size_bench(args: argparse.Namespace, size: tuple[int, int], device: torch.device) -> dict[str, Any]:
    height, width = strided_size(*size)
    generator = torch.Generator().manual_seed(args.seed)
    cams = torch.rand(args.classes, height, width, generator=generator).to(device)
    edge = (torch.rand(height, width, generator=generator) ** 3).to(device)
    sparse = functools.partial(rw_walk.random_walk, cams, edge, args.beta, args.exp_times)
    fns = {"sparse": sparse, "operator": functools.partial(rw_walk.walk_operator, edge, args.beta)}
    n = height * width
    result: dict[str, Any] = {"size": f"{size[0]}x{size[1]}", "stride4": f"{height}x{width}", "n": n}
    peak = {"sparse": _peak_memory_mb(sparse, device)}
    if n <= args.dense_max_n:
        fns["dense"] = functools.partial(rw_walk.random_walk_dense, cams, edge, args.beta, args.exp_times)
        peak["dense"] = _peak_memory_mb(fns["dense"], torch.device("cpu"))
        result["max_abs_diff"] = float((sparse().cpu() - fns["dense"]()).abs().max())
    seconds = _interleaved(fns, args.images, 0, device)
    for name in ("sparse", "dense"):
        if name in seconds:
            result[name] = {"seconds": round(seconds[name], 4), "peak_mb": peak[name] and round(peak[name], 1)}
    result["sparse"]["operator_s"] = round(seconds["operator"], 4)
    if "dense" not in seconds:  # the reference's matrices: eye(N_pad), the cropped A, A^beta / colsum, T @ T
        padded = (height + rw_walk.RADIUS) * (width + 2 * rw_walk.RADIUS)
        result["dense"] = {
            "skipped": f"N {n} > --dense_max_n {args.dense_max_n}",
            "gb_needed": round(4 * (padded**2 + 3 * n**2) / 2**30, 3),
        }
    return result


def run_rw(args: argparse.Namespace) -> dict[str, Any]:
    rw_walk.check_walk_params(args.beta, args.exp_times)
    device = _setup_torch(args)
    load_before = os.getloadavg()
    rw_walk.random_walk(torch.rand(1, 8, 8, device=device), torch.rand(8, 8, device=device))  # warm-up
    sizes = [rw_size_bench(args, size, device) for size in args.sizes]
    dense = [s for s in sizes if "seconds" in s["dense"]]
    for entry in sizes:  # dense time of the larger sizes from the largest one measured, by the O(N^3) of T @ T
        if dense and "skipped" in entry["dense"]:
            ref = max(dense, key=lambda s: s["n"])
            entry["dense"]["seconds_estimate"] = float(f"{ref['dense']['seconds'] * (entry['n'] / ref['n']) ** 3:.3g}")
    return {
        "benchmark": "rw",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "classes": args.classes,
        "beta": args.beta,
        "exp_times": args.exp_times,
        "load_avg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "sizes": sizes,
    }


# --------------------------------------------------------------------------------------------------------------------
# seg: DeepLabV3+ training step and multi-scale inference (random weights, random data)
# --------------------------------------------------------------------------------------------------------------------

SEG_STAGES = ("train", "inference")
SEG_CLASSES = 21  # VOC's classes with the background


def add_seg_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, size=320)
    parser.set_defaults(architecture="resnet50")
    cli.add_bool_arg(parser, "--use_gn", True, "GroupNorm head (the runner's) instead of BatchNorm")
    cli.add_bool_arg(parser, "--dilated", False, "output stride 8 instead of 16")
    cli.add_arg(parser, "--batch_size", type=int, default=4, help="training images per step (default 4)")
    cli.add_arg(parser, "--scales", type=cli.float_list, default=[0.5, 1.0, 1.5, 2.0], help="inference scales")
    cli.add_arg(parser, "--steps", type=int, default=3, help="timed steps or images per stage (default 3)")
    cli.add_arg(parser, "--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    cli.add_arg(
        parser, "--stages", type=cli.str_list, default=list(SEG_STAGES), help=f"subset of {','.join(SEG_STAGES)}"
    )


def _seg_flags(args: argparse.Namespace) -> argparse.Namespace:
    flags = seg_training.get_args_parser("benchmark", "").parse_args(["--optimizer", "momentum"])
    flags.architecture, flags.backbone_weights, flags.use_gn = args.architecture, "none", args.use_gn
    flags.dilated, flags.batch_size, flags.max_epoch = args.dilated, args.batch_size, 1
    flags.mixed_precision = bool(args.mixed_precision)
    return flags


def seg_train_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    """DeepLabV3+'s training step (:func:`core.segmentation.training.make_step_fn`) on random images and masks."""
    flags = _seg_flags(args)
    ctx = bench_context(args, flags, device)
    seg_training.add_network(ctx, flags, SEG_CLASSES)
    generator = torch.Generator().manual_seed(args.seed)
    batch = {
        "image": torch.randn(args.batch_size, 3, args.size, args.size, generator=generator),
        "mask": torch.randint(0, SEG_CLASSES, (args.batch_size, args.size, args.size), generator=generator),
    }
    step = engine_step(seg_training.make_step_fn(flags), ctx, batch)
    return {
        "stage": step,
        "limit": forward_backward(ctx, seg_training.network_from_flags(flags, SEG_CLASSES), batch["image"]),
    }


def seg_inference_bench(args: argparse.Namespace, device: torch.device, fmt: ComputeFormat) -> dict:
    """Multi-scale + flip probabilities of one image (as scripts/segmentation/inference.py, without CRF and PNG)."""
    model = seg_training.network_from_flags(_seg_flags(args), SEG_CLASSES).to(device).eval()
    model = model.to(memory_format=torch.channels_last) if fmt.channels_last else model
    image = np.random.default_rng(args.seed).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    batches = _scale_batches([image], args.scales, fmt, device)

    def probs() -> None:
        multiscale_probs(
            model, image, args.scales, device=device, amp_dtype=fmt.amp_dtype, channels_last=fmt.channels_last
        ).cpu()

    def forwards() -> None:
        with torch.inference_mode(), fmt.autocast():
            for batch in batches:
                model(batch)

    return {"stage": probs, "limit": forwards}


def run_seg(args: argparse.Namespace) -> dict[str, Any]:
    unknown = sorted(set(args.stages) - set(SEG_STAGES))
    if unknown:
        raise WSSSError(f"unknown --stages {','.join(unknown)}; choose from {','.join(SEG_STAGES)}")
    device = _setup_torch(args)
    fmt = _compute(args, device)
    limits = {
        "train": "forward + backward of DeepLabV3+ on the same batch",
        "inference": "forward passes of the scales and flips of the same image",
    }
    stages: dict[str, Any] = {}
    for stage in args.stages:
        fns = seg_train_bench(args, device) if stage == "train" else seg_inference_bench(args, device, fmt)
        seconds = _interleaved(fns, args.steps, args.warmup, device)
        count = args.batch_size if stage == "train" else 1
        stages[stage] = _stage_rates(count, seconds["stage"], seconds["limit"], limits[stage])
        logger.info("seg %s: %.3f images/s", stage, stages[stage]["images_per_s"])
    return {
        "benchmark": "seg",
        "architecture": args.architecture,
        "size": args.size,
        "batch_size": args.batch_size,
        "scales": list(args.scales),
        "use_gn": bool(args.use_gn),
        "dilated": bool(args.dilated),
        "device": str(device),
        "mixed_precision": bool(args.mixed_precision),
        "amp_dtype": str(fmt.amp_dtype or torch.float32).replace("torch.", ""),
        "channels_last": fmt.channels_last,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "stages": stages,
    }


# --------------------------------------------------------------------------------------------------------------------
# pipeline: a projection of the whole pipeline's hours from the rates of the benchmarks above
# --------------------------------------------------------------------------------------------------------------------

# Images per domain. VOC: the id lists (SPEC §1.2; tools/prepare_voc12.py checks train, val and train_aug).
# COCO 2014: the images with at least one object, the ones the classification stages train on (SPEC §1.2's lists
# hold 82,783 / 40,504 ids; tools/prepare_coco14.py keeps the background-only ones listed, the datasets skip them).
DOMAIN_IMAGES: dict[str, dict[str, int]] = {
    "voc12": {"train_aug": 10582, "train": 1464, "val": 1449, "test": 1456},
    "coco14": {"train2014": 82081, "val2014": 40137},
}
# Inference stages see whole images: a typical one (VOC 375x500, COCO 480x640) as a square of the same area.
IMAGE_SIDE = {"voc12": 432, "coco14": 560}
SEG_CLASSES_OF = {"voc12": 21, "coco14": 81}  # the softmax CRF of DeepLabV3+'s inference runs over every class

# The runners' recipes: the defaults of runners/config/{dataset,cam,saliency,rw,segmentation}.sh, under the shell
# variables' names (tests/test_benchmark.py sources those files and compares: change both together). P-NOC trains
# for EPOCHS (1-priors.sh's EPOCHS_PNOC default).
_VOC_RECIPE: dict[str, Any] = {
    # dataset.sh, cam.sh
    "DOMAIN_TRAIN": "train_aug", "DOMAIN_VALID": "train", "ARCH": "resnest269", "IMAGE_SIZE": 512, "EPOCHS": 15,
    "BATCH_OC": 32, "BATCH_PNOC": 16, "MIXED_PRECISION": "true", "SCALES": "0.5,1.0,1.5,2.0", "BATCH_INFER": 1,
    # saliency.sh
    "SAL_DOMAIN": "train_aug", "ARCH_SAL": "resnest269", "IMAGE_SIZE_SAL": 448, "EPOCHS_SAL": 10, "BATCH_SAL": 64,
    "CRF_T": 10, "CRF_GT": 0.7, "ARCH_PN": "resnet50", "EPOCHS_PN": 9, "BATCH_PN": 1, "HEAD_SCALE_PN": 1,
    # rw.sh
    "AFF_DOMAIN": "train_aug", "AFF_FG": 0.4, "AFF_BG": 0.1, "AFF_CRF_T": 10, "AFF_CRF_GT": 0.7,
    "AFF_SALIENCY": "true", "ARCH_AFF": "resnest269", "EPOCHS_AFF": 3, "BATCH_AFF": 32, "IMAGE_SIZE_AFF": 512,
    "RW_DOMAINS": "train_aug val", "RW_BETA": 10, "RW_EXP": 8, "PSEUDO_DOMAINS": "train_aug,val", "PSEUDO_T": 0.3,
    "PSEUDO_CRF_T": 1, "PSEUDO_CRF_GT": 0.9,
    # segmentation.sh
    "ARCH_SEG": "resnest269", "USE_GN": "true", "EPOCHS_SEG": 15, "BATCH_SEG": 32, "IMAGE_SIZE_SEG": 512,
    "DOMAIN_TRAIN_SEG": "train_aug", "SEG_DOMAINS": "train val test", "SEG_SCALES": "0.5,1.0,1.5,2.0", "SEG_CRF_T": 10,
}  # fmt: skip
PIPELINE_RECIPES: dict[str, dict[str, Any]] = {
    "voc12": _VOC_RECIPE,
    "coco14": _VOC_RECIPE | {
        "DOMAIN_TRAIN": "train2014", "DOMAIN_VALID": "train2014", "IMAGE_SIZE": 640, "SAL_DOMAIN": "train2014",
        "AFF_DOMAIN": "train2014", "RW_DOMAINS": "train2014", "PSEUDO_DOMAINS": "train2014", "IMAGE_SIZE_SEG": 640,
        "DOMAIN_TRAIN_SEG": "train2014", "SEG_DOMAINS": "val2014",
    },
}  # fmt: skip
# What --architecture, --size and --batch_size replace in every stage.
RECIPE_ARCHITECTURES = ("ARCH", "ARCH_SAL", "ARCH_PN", "ARCH_AFF", "ARCH_SEG")
RECIPE_SIZES = ("IMAGE_SIZE", "IMAGE_SIZE_SAL", "IMAGE_SIZE_AFF", "IMAGE_SIZE_SEG")
RECIPE_BATCHES = ("BATCH_OC", "BATCH_PNOC", "BATCH_SAL", "BATCH_PN", "BATCH_AFF", "BATCH_SEG")
PIPELINE_NOT_COUNTED = (
    "data loading (decoding, augmentation, the loaders' workers)",
    "validation and evaluation (threshold sweeps, mIoU)",
    "checkpoints and logs; reading and writing the stages' files (only CAM inference writes its CAM file and the "
    "saliency-mask CRF reads and writes its files)",
    "process start-up, model building and weight loading",
)
# Stages whose work runs in a pool of CPU processes (WORKERS_INFER): the rate of one process x --cpu_workers.
POOL_STAGES = ("saliency_crf", "affinity_labels", "pseudo_masks")


def _domains(value: str) -> list[str]:
    return value.replace(",", " ").split()


def pipeline_plan(recipe: dict[str, Any], image_side: int, seg_classes: int) -> dict[str, dict[str, Any]]:
    """Every stage of the runners in their order: the runner, what it runs, the domains it processes (``tag@domain``
    where a stage runs for several networks), the passes over them, and the settings its benchmark measures."""
    r = recipe
    sal_domains = list(dict.fromkeys([r["SAL_DOMAIN"], r["DOMAIN_VALID"]]))  # 2-saliency.sh's domains
    cam_domains = [f"oc@{r['DOMAIN_VALID']}", f"pnoc@{r['DOMAIN_VALID']}", f"pnoc@{r['SAL_DOMAIN']}"]
    cam_domains += [f"pnoc@{d}" for d in _domains(r["RW_DOMAINS"])]  # a folder already made is skipped (resume)
    infer = {"size": image_side, "batch_size": 1}

    def stage(runner: str, what: str, domains: list[str], passes: int, **settings: Any) -> dict[str, Any]:
        domains = list(dict.fromkeys(domains))
        return {"runner": runner, "what": what, "domains": domains, "passes": passes, "settings": settings}

    return {
        "oc_train": stage(
            "1-priors.sh", "ordinary classifier, vanilla step", [r["DOMAIN_TRAIN"]], r["EPOCHS"],
            architecture=r["ARCH"], size=r["IMAGE_SIZE"], batch_size=r["BATCH_OC"],
        ),
        "pnoc_train": stage(
            "1-priors.sh", "P-NOC step (CAM generator + ordinary classifier)", [r["DOMAIN_TRAIN"]], r["EPOCHS"],
            architecture=r["ARCH"], size=r["IMAGE_SIZE"], batch_size=r["BATCH_PNOC"],
        ),
        "cam_inference": stage(
            "1-priors.sh, 2-saliency.sh, 3-rw.sh", "multi-scale + flip CAMs and their file", cam_domains, 1,
            architecture=r["ARCH"], scales=r["SCALES"], **infer | {"batch_size": r["BATCH_INFER"]},
        ),
        "ccamh_train": stage(
            "2-saliency.sh", "C²AM-H step", [r["SAL_DOMAIN"]], r["EPOCHS_SAL"],
            architecture=r["ARCH_SAL"], size=r["IMAGE_SIZE_SAL"], batch_size=r["BATCH_SAL"],
        ),
        "ccamh_inference": stage(
            "2-saliency.sh", "C²AM-H multi-scale + flip maps", sal_domains, 1,
            architecture=r["ARCH_SAL"], scales=r["SCALES"], **infer,
        ),
        "saliency_crf": stage(
            "2-saliency.sh", "saliency masks: read, threshold, 2-label CRF, write", sal_domains, 1,
            crf_t=r["CRF_T"], **infer,
        ),
        "poolnet_train": stage(
            "2-saliency.sh", "PoolNet step on whole images", [r["SAL_DOMAIN"]], r["EPOCHS_PN"],
            architecture=r["ARCH_PN"], size=image_side, batch_size=r["BATCH_PN"], head_scale=r["HEAD_SCALE_PN"],
        ),
        "poolnet_test": stage(
            "2-saliency.sh", "PoolNet test (poolnet/test.py's batch)", sal_domains, 1,
            architecture=r["ARCH_PN"], size=image_side, head_scale=r["HEAD_SCALE_PN"],
            batch_size=poolnet_test.get_args_parser().get_default("batch_size"),
        ),
        "affinity_labels": stage(
            "3-rw.sh", "affinity labels from CAMs and saliency, label CRFs (in memory)", [r["AFF_DOMAIN"]], 1,
            crf_t=r["AFF_CRF_T"], crf_gt_prob=r["AFF_CRF_GT"], fg=r["AFF_FG"], bg=r["AFF_BG"],
            saliency=r["AFF_SALIENCY"] == "true", **infer,
        ),
        "affinity_train": stage(
            "3-rw.sh", "AffinityNet step (frozen backbone, edge branch, affinity loss)", [r["AFF_DOMAIN"]],
            r["EPOCHS_AFF"], architecture=r["ARCH_AFF"], size=r["IMAGE_SIZE_AFF"], batch_size=r["BATCH_AFF"],
        ),
        "random_walk": stage(
            "3-rw.sh", "edge map (image + mirror) and the sparse walk", _domains(r["RW_DOMAINS"]), 1,
            architecture=r["ARCH_AFF"], pad_size=r["IMAGE_SIZE_AFF"], beta=r["RW_BETA"], exp_times=r["RW_EXP"],
            **infer,
        ),
        "pseudo_masks": stage(
            "3-rw.sh", "pseudo masks: threshold, label CRF (in memory)", _domains(r["PSEUDO_DOMAINS"]), 1,
            threshold=r["PSEUDO_T"], crf_t=r["PSEUDO_CRF_T"], crf_gt_prob=r["PSEUDO_CRF_GT"], **infer,
        ),
        "seg_train": stage(
            "4-segmentation.sh", "DeepLabV3+ step", [r["DOMAIN_TRAIN_SEG"]], r["EPOCHS_SEG"],
            architecture=r["ARCH_SEG"], size=r["IMAGE_SIZE_SEG"], batch_size=r["BATCH_SEG"],
            use_gn=r["USE_GN"] == "true",
        ),
        "seg_inference": stage(
            "4-segmentation.sh", "DeepLabV3+ multi-scale + flip probabilities, then the softmax CRF",
            _domains(r["SEG_DOMAINS"]), 1, architecture=r["ARCH_SEG"], scales=r["SEG_SCALES"],
            use_gn=r["USE_GN"] == "true", crf_t=r["SEG_CRF_T"], classes=seg_classes, **infer,
        ),
    }  # fmt: skip


PIPELINE_STAGES = tuple(pipeline_plan(PIPELINE_RECIPES["voc12"], 1, 1))


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def project_hours(
    plan: dict[str, dict[str, Any]], rates: dict[str, float], counts: dict[str, int]
) -> tuple[dict[str, dict[str, Any]], float]:
    """Hours of each stage of ``plan`` that has a rate: images (of its domains, ``counts`` by the part after the last
    ``@``) x passes / images per second / 3600; returns the stages' breakdowns and their sum."""
    stages, total = {}, 0.0
    for name, stage in plan.items():
        if name not in rates:
            continue
        domains = {domain: counts[domain.rsplit("@", 1)[-1]] for domain in stage["domains"]}
        images = sum(domains.values())
        hours = images * stage["passes"] / rates[name] / 3600
        stages[name] = {
            "runner": stage["runner"],
            "what": stage["what"],
            "domains": domains,
            "images": images,
            "passes": stage["passes"],
            "images_per_s": rates[name],
            "hours": _significant(hours),
        }
        total += hours
    return stages, _significant(total)


def affinity_train_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    """AffinityNet's training step (:func:`core.rw.training.make_step_fn`: the frozen backbone's forward, the edge
    branch's forward and backward, the three-term affinity loss, the SGD step of the edge branch) on random images
    and stride-4 affinity labels (0, two classes, 255); limit: forward + backward of the same AffinityNet."""
    flags = rw_training.get_args_parser("benchmark", "").parse_args([])
    flags.architecture, flags.backbone_weights = args.architecture, "none"
    flags.batch_size, flags.max_epoch, flags.mixed_precision = args.batch_size, 1, bool(args.mixed_precision)
    ctx = bench_context(args, flags, device)
    rw_training.add_network(ctx, flags)
    generator = torch.Generator().manual_seed(args.seed)
    grid = -(-args.size // EDGE_STRIDE)
    values = torch.tensor([0, 1, 2, IGNORE_INDEX])
    batch = {
        "image": torch.randn(args.batch_size, 3, args.size, args.size, generator=generator),
        "labels": values[torch.randint(0, len(values), (args.batch_size, grid, grid), generator=generator)],
    }
    step = engine_step(rw_training.make_step_fn(), ctx, batch)
    return {"stage": step, "limit": forward_backward(ctx, AffinityNet(args.architecture), batch["image"])}


def random_walk_bench(args: argparse.Namespace, device: torch.device, fmt: ComputeFormat) -> Callable[[], None]:
    """One image of scripts/rw/inference.py: the boundary map of the image and its mirror (padded to --pad_size,
    AffinityNet.edge_map) and the sparse random walk (core.rw.walk) of two random stride-4 CAM planes."""
    model = AffinityNet(args.architecture).to(device).eval()
    model = model.to(memory_format=torch.channels_last) if fmt.channels_last else model
    generator = torch.Generator().manual_seed(args.seed)
    image = torch.randn(3, args.size, args.size, generator=generator).to(device)
    cams = torch.rand(2, *strided_size(args.size, args.size), generator=generator).to(device)

    def walk() -> None:
        with fmt.autocast():
            edge = model.edge_map(image, pad_size=args.pad_size)
        rw_walk.random_walk(cams, edge, args.beta, args.exp_times).cpu()

    return walk


def label_crf_bench(args: argparse.Namespace, stage: str) -> Callable[[], None]:
    """The label map of one image in memory: affinity labels (core.rw.labels.affinity_labels: CAMs, saliency and
    label CRFs) or a pseudo mask (core.labels.pseudo_mask: threshold and label CRF), on a smooth random image with two
    CAM planes; reading and writing the files is not timed."""
    rng = np.random.default_rng(args.seed)
    image = _smooth_image(rng, args.size)
    hr_cam, keys = _random_cams(rng, 2, args.size, args.size), np.array([1, 2])
    if stage == "affinity_labels":
        saliency = _random_cams(rng, 1, args.size, args.size)[0] if args.saliency else None
        return lambda: affinity_labels(
            hr_cam,
            keys,
            args.fg,
            args.bg,
            saliency=saliency,
            image=image,
            crf_t=args.crf_t,
            crf_gt_prob=args.crf_gt_prob,
        )
    return lambda: pseudo_mask(
        hr_cam, keys, args.threshold, image=image, crf_t=args.crf_t, crf_gt_prob=args.crf_gt_prob
    )


def seg_crf_bench(args: argparse.Namespace) -> Callable[[], None]:
    """The DeepLab-v2 softmax CRF (core.crf.crf_inference_probs, --crf_t iterations) of one image's probabilities
    over ``--classes`` classes, as scripts/segmentation/inference.py runs it after the forward passes."""
    rng = np.random.default_rng(args.seed)
    image = _smooth_image(rng, args.size)
    scores = _random_cams(rng, args.classes, args.size, args.size)
    probs = scores / scores.sum(axis=0, keepdims=True)
    return lambda: crf_inference_probs(image, probs, t=args.crf_t)


def _stage_fn(
    name: str, args: argparse.Namespace, device: torch.device, fmt: ComputeFormat, folder: Path
) -> tuple[Callable[[], Any], int]:
    """The timed call of one pipeline stage at its settings (``args``) and the images it processes."""
    if name in ("oc_train", "pnoc_train"):
        method = "vanilla" if name == "oc_train" else "pnoc"
        if method == "pnoc" and args.size % (2 * 16):
            raise WSSSError(f"P-NOC at --size {args.size}: Puzzle tiling needs a multiple of 32; pass another --size")
        return build_train_step(method, args, device)[0], args.batch_size
    if name == "affinity_train" and args.size < rw_training.smallest_crop():
        raise WSSSError(
            f"AffinityNet at --size {args.size}: pairs of radius {rw_losses.TRAIN_RADIUS} need a crop of at least "
            f"{rw_training.smallest_crop()} px; pass --recipe IMAGE_SIZE_AFF={rw_training.smallest_crop()} or more"
        )
    builders: dict[str, Callable[[], tuple[Callable[[], Any], int]]] = {
        "cam_inference": lambda: (
            cam_inference_bench(args, device, fmt, folder, args.batch_size)["file"],
            args.batch_size,
        ),
        "ccamh_train": lambda: (ccam_train_bench(args, device)["stage"], args.batch_size),
        "ccamh_inference": lambda: (ccam_inference_bench(args, device, fmt)["stage"], 1),
        "saliency_crf": lambda: (crf_bench(args, folder)["stage"], args.crf_images),
        "poolnet_train": lambda: (poolnet_train_bench(args, device)["stage"], args.batch_size),
        "poolnet_test": lambda: (poolnet_test_bench(args, device, fmt)["stage"], args.batch_size),
        "affinity_labels": lambda: (label_crf_bench(args, name), 1),
        "affinity_train": lambda: (affinity_train_bench(args, device)["stage"], args.batch_size),
        "random_walk": lambda: (random_walk_bench(args, device, fmt), 1),
        "pseudo_masks": lambda: (label_crf_bench(args, name), 1),
        "seg_train": lambda: (seg_train_bench(args, device)["stage"], args.batch_size),
    }
    return builders[name]()


def measure_stage(
    name: str, args: argparse.Namespace, device: torch.device, fmt: ComputeFormat, folder: Path
) -> dict[str, Any]:
    """Images per second of one pipeline stage at its settings (``args``): the median call of its benchmark.
    Pool stages: one process's rate x ``--cpu_workers``. DeepLabV3+ inference: the forward passes, then the CRF."""

    def rate(fn: Callable[[], Any], images: int) -> float:
        return images / _interleaved({"stage": fn}, args.steps, args.warmup, device)["stage"]

    if name == "seg_inference":
        probs_rate = rate(seg_inference_bench(args, device, fmt)["stage"], 1)
        crf_rate = rate(seg_crf_bench(args), 1) if args.crf_t > 0 else float("inf")
        return {
            "images_per_s": 1 / (1 / probs_rate + 1 / crf_rate),
            "probs_ms_per_image": round(1000 / probs_rate, 1),
            "crf_ms_per_image": round(1000 / crf_rate, 1),
        }
    images_per_s = rate(*_stage_fn(name, args, device, fmt, folder))
    if name in POOL_STAGES:
        return {"images_per_s": images_per_s * args.cpu_workers, "per_process_images_per_s": round(images_per_s, 3)}
    return {"images_per_s": images_per_s}


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    cli.add_arg(parser, "--dataset", type=str, default="voc12", choices=list(PIPELINE_RECIPES), help="runner recipe")
    cli.add_arg(parser, "--architecture", type=str, default=None, choices=list(BACKBONES), help="every stage's network")
    cli.add_arg(parser, "--size", type=cli.positive_int, default=None, help="every stage's crop and image side (px)")
    cli.add_arg(parser, "--batch_size", type=cli.positive_int, default=None, help="every training stage's batch")
    cli.add_arg(
        parser,
        "--image_side",
        type=cli.positive_int,
        default=None,
        help="side of the square image the inference stages see (default: --size, else VOC 432 / COCO 560, the "
        "area of a 375x500 / 480x640 image)",
    )
    cli.add_arg(
        parser,
        "--recipe",
        type=cli.str_list,
        default=[],
        help="runner variables to change after the options above, e.g. BATCH_SAL=16,ARCH_PN=resnet18,EPOCHS=5",
    )
    cli.add_arg(
        parser,
        "--stages",
        type=cli.str_list,
        default=list(PIPELINE_STAGES),
        help=f"subset of {','.join(PIPELINE_STAGES)}",
    )
    cli.add_arg(parser, "--steps", type=cli.positive_int, default=3, help="timed calls per stage (default 3)")
    cli.add_arg(parser, "--warmup", type=int, default=1, help="untimed calls first (default 1)")
    cli.add_arg(
        parser,
        "--cpu_workers",
        type=cli.positive_int,
        default=default_num_workers(),
        help="processes of the CRF stages (the runners' WORKERS_INFER, 8, capped by the CPUs here)",
    )
    cli.add_arg(parser, "--device", type=str, default="auto", choices=DEVICES, help="auto = cuda when available")
    cli.add_arg(
        parser,
        "--mixed_precision",
        type=cli.str2bool,
        nargs="?",
        const=True,
        default=None,
        metavar="true|false",
        help="autocast as the scripts do (default: the recipe's MIXED_PRECISION on CUDA, false on the CPU)",
    )
    cli.add_arg(
        parser,
        "--channels_last",
        type=cli.str2bool,
        nargs="?",
        const=True,
        default=None,
        metavar="true|false",
        help="channels-last memory format (default: core.precision's rule for the device and dtype)",
    )
    cli.add_arg(parser, "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    cli.add_arg(parser, "--seed", type=int, default=0, help="random seed of weights and data")


def pipeline_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset's recipe with --architecture, --size, --batch_size, then --recipe KEY=VALUE applied."""
    recipe = dict(PIPELINE_RECIPES[args.dataset])
    for keys, value in ((RECIPE_ARCHITECTURES, args.architecture), (RECIPE_SIZES, args.size)):
        recipe |= dict.fromkeys(keys, value) if value is not None else {}
    recipe |= dict.fromkeys(RECIPE_BATCHES, args.batch_size) if args.batch_size is not None else {}
    for item in args.recipe:
        key, _, value = item.partition("=")
        if key not in recipe or not value:
            raise WSSSError(f"--recipe {item}: expected KEY=VALUE with KEY one of {','.join(recipe)}")
        old = recipe[key]
        recipe[key] = type(old)(value) if isinstance(old, (int, float)) and not isinstance(old, bool) else value
    return recipe


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    unknown = sorted(set(args.stages) - set(PIPELINE_STAGES))
    if unknown:
        raise WSSSError(f"unknown --stages {','.join(unknown)}; choose from {','.join(PIPELINE_STAGES)}")
    recipe = pipeline_recipe(args)
    image_side = args.image_side or args.size or IMAGE_SIDE[args.dataset]
    plan = pipeline_plan(recipe, image_side, SEG_CLASSES_OF[args.dataset])
    device = _setup_torch(args)
    if args.mixed_precision is None:
        args.mixed_precision = device.type == "cuda" and recipe["MIXED_PRECISION"] == "true"
    fmt = _compute(args, device)
    rates, details = {}, {}
    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        for name in (stage for stage in plan if stage in args.stages):  # the runners' order
            settings = plan[name]["settings"]
            stage_args = argparse.Namespace(
                **{**vars(args), "classes": 2, "crf_images": 1, "dilated": False, **settings}
            )
            stage_args.scales = cli.float_list(settings.get("scales", "1.0"))
            folder = Path(tmp) / name
            folder.mkdir()
            try:
                details[name] = measure_stage(name, stage_args, device, fmt, folder)
            except torch.cuda.OutOfMemoryError as error:
                raise WSSSError(
                    f"stage {name} ran out of GPU memory at {settings}; lower its batch or size (--batch_size, "
                    "--size or --recipe KEY=VALUE) or leave it out of --stages"
                ) from error
            finally:
                gc.collect()  # the stage's networks and batches, before the next one measures
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rates[name] = _significant(details[name].pop("images_per_s"))
            details[name] = settings | details[name]
            logger.info("%s: %.3f images/s", name, rates[name])
    stages, total = project_hours(plan, rates, DOMAIN_IMAGES[args.dataset])
    for name, stage in stages.items():
        stage |= details[name]
        if len(stage["domains"]) > 1:
            stage["note"] = "one rate, measured once, applied to every domain"
    return {
        "benchmark": "pipeline",
        "projection": True,
        "dataset": args.dataset,
        "what": "hours of each runner stage on this device: images x passes / the images/s measured here",
        "not_counted": list(PIPELINE_NOT_COUNTED),
        "device": str(device),
        "mixed_precision": bool(args.mixed_precision),
        "amp_dtype": str(fmt.amp_dtype or torch.float32).replace("torch.", ""),
        "channels_last": fmt.channels_last,
        "threads": torch.get_num_threads(),
        "cpu_workers": args.cpu_workers,
        "steps": args.steps,
        "warmup": args.warmup,
        "recipe_changes": {k: v for k, v in recipe.items() if PIPELINE_RECIPES[args.dataset][k] != v},
        "stages": stages,
        "stages_left_out": [name for name in plan if name not in stages],
        "total_hours": total,
    }


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------

# name -> (flag builder, runner).
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]] = {
    "evaluate": (add_evaluate_args, run_evaluate),
    "train": (add_train_args, run_train),
    "inference": (add_inference_args, run_inference),
    "ppc": (add_ppc_args, run_ppc),
    "saliency": (add_saliency_args, run_saliency),
    "rw": (add_rw_args, run_rw),
    "seg": (add_seg_args, run_seg),
    "pipeline": (add_pipeline_args, run_pipeline),
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("benchmark", description=__doc__.split("\n")[0], add_help=add_help)
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (add_args, _) in SUBCOMMANDS.items():
        add_args(subparsers.add_parser(name, help=f"{name} benchmark"))
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = SUBCOMMANDS[args.benchmark][1](args)
    print(json.dumps(result), file=sys.stdout, flush=True)  # the tool's output is this one JSON line
    return result


if __name__ == "__main__":
    cli.run(main, get_args_parser())
