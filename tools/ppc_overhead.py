"""PPC's overhead per training step over the vanilla CAM step, through the scripts' own step code.

Times, in turn on the same random batch (so a shared machine's load hits all of them alike), the median step of:

* ``vanilla``: :func:`core.cam.methods.build_step_fn` of ``vanilla`` (forward, MLSM, backward, SGD step);
* ``vanilla+ppc@V``: the same step with ``--ppc true --ppc_view_size V`` for each ``--views`` V (projection head,
  second view through the network, PPC's loss);
* ``ppc_loss``: :func:`core.cam.ppc.ppc_loss` forward + backward alone, on the embeddings and CAMs of both views, i.e.
  what PPC adds to a method that already runs the second view (SEAM, the EPS branch).

Prints one JSON object: milliseconds per step and the overhead in percent of the vanilla step.
Example (the issue's setting: CPU, 128 px, resnet18, batch 8):
    python tools/ppc_overhead.py --size 128 --views 128,32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from core import cli
from core.cam import methods, ppc
from core.cam.ppc import PPCClassifier
from core.engine import TrainContext, add_training_args
from core.models import BACKBONES, Classifier
from core.runtime import detached_run

CLASSES = 20


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ppc_overhead", description=__doc__.splitlines()[0])
    cli.add_arg(parser, "--architecture", type=str, default="resnet18", choices=list(BACKBONES), help="backbone")
    cli.add_arg(parser, "--size", type=int, default=128, help="square training crop (default 128)")
    cli.add_arg(parser, "--batch_size", type=int, default=8, help="images per step (default 8)")
    cli.add_arg(parser, "--views", type=cli.str_list, default=["128", "32"], help="second-view sides to time")
    cli.add_arg(parser, "--steps", type=int, default=7, help="timed steps per variant (default 7)")
    cli.add_arg(parser, "--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    cli.add_arg(parser, "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    cli.add_arg(parser, "--seed", type=int, default=0, help="random seed of weights and data")
    return parser


def step_flags(args: argparse.Namespace, view: int | None) -> argparse.Namespace:
    """The CAM scripts' flags at their defaults, with PPC on at second view ``view`` (None: off)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_training_args(parser)
    ppc.add_ppc_args(parser)
    argv = ["--batch_size", str(args.batch_size), "--max_epoch", "1"]
    if view is not None:
        argv += ["--ppc", "true", "--ppc_view_size", str(view)]
    flags = parser.parse_args(argv)
    flags.label_smoothing = 0.0
    return flags


def build_step(args: argparse.Namespace, batch: dict[str, torch.Tensor], view: int | None) -> Callable[[], None]:
    """One ``vanilla`` step (with PPC at ``view``) of a fresh random generator on ``batch``, as ``fit`` calls it."""
    flags = step_flags(args, view)
    ctx = TrainContext(detached_run(flags, torch.device("cpu"), args.batch_size), steps_per_epoch=1 << 20)
    torch.manual_seed(args.seed)
    if view is None:
        cg = Classifier(args.architecture, CLASSES, backbone_weights="none")
    else:
        cg = PPCClassifier(args.architecture, CLASSES, backbone_weights="none")
    ctx.add("cg", cg, torch.optim.SGD(cg.parameters(), lr=1e-4))
    ctx.train_mode()
    step_fn = methods.build_step_fn("vanilla", flags)
    counter = iter(range(1 << 62))
    return lambda: step_fn(ctx, batch, next(counter))


def build_loss_only(args: argparse.Namespace, view: int) -> Callable[[], None]:
    """PPC's loss forward + backward on stand-in outputs of both views (stride 16, 128-d embeddings)."""
    g = torch.Generator().manual_seed(args.seed)
    side1, side2 = -(-args.size // 16), -(-view // 16)
    emb1 = torch.rand(args.batch_size, 128, side1, side1, generator=g).requires_grad_(True)
    emb2 = torch.rand(args.batch_size, 128, side2, side2, generator=g).requires_grad_(True)
    cams1 = torch.randn(args.batch_size, CLASSES + 1, side1, side1, generator=g)
    cams2 = torch.randn(args.batch_size, CLASSES + 1, side2, side2, generator=g)
    labels = (torch.rand(args.batch_size, CLASSES, generator=g) < 0.15).float()

    def run() -> None:
        loss, _ = ppc.ppc_loss(emb1, emb2, cams1, cams2, labels, bg_score=0.2, topk_fraction=1 / 8)
        loss.backward()

    return run


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeat)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    batch = {
        "image": torch.randn(args.batch_size, 3, args.size, args.size, generator=g),
        "label": (torch.rand(args.batch_size, CLASSES, generator=g) < 0.15).float(),
    }
    batch["label"][:, 0] = 1.0
    views = [int(v) for v in args.views]
    fns = {"vanilla": build_step(args, batch, None)}
    fns |= {f"vanilla+ppc@{v}": build_step(args, batch, v) for v in views}
    fns |= {f"ppc_loss@{v}": build_loss_only(args, v) for v in views}
    seconds = interleaved(fns, args.steps, args.warmup)
    base = seconds["vanilla"]
    return {
        "architecture": args.architecture,
        "size": args.size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "step_ms": {name: round(1000 * s, 1) for name, s in seconds.items()},
        # full steps: extra time over the vanilla step; loss alone: its time as a share of the vanilla step
        "overhead_pct": {
            name: round(100 * (s - base if name.startswith("vanilla+") else s) / base, 1)
            for name, s in seconds.items()
            if name != "vanilla"
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(get_args_parser().parse_args()), indent=1))
