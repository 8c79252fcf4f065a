"""Flags every training script shares (reference names and defaults)."""

from __future__ import annotations

import argparse
from typing import Any

from core import distributed
from core.cli import add_arg, add_bool_arg, optional_float, optional_int, positive_int, str2bool, unit_float_list
from core.optim import OPTIMIZERS

DEFAULT_THRESHOLDS = [round(0.10 + 0.05 * i, 2) for i in range(8)]  # 0.10, 0.15, ..., 0.45 (SPEC §4.1)


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse._ArgumentGroup:
    """Add the flags every training script shares (reference names and defaults; ``defaults`` overrides them).

    Example: ``add_training_args(parser, batch_size=16, accumulate_steps=2)`` for the P-NOC recipe.
    """
    group = parser.add_argument_group("training")
    add_arg(
        group, "--tag", type=str, default=None, help="run name; may contain '/'. Writes experiments/models/<tag>.pth"
    )
    add_arg(
        group, "--batch_size", type=int, default=32, help="GLOBAL batch size (split evenly over torchrun processes)"
    )
    add_arg(group, "--max_epoch", "--max_epochs", type=positive_int, default=15, help="number of training epochs")
    add_arg(group, "--lr", type=float, default=0.1, help="base learning rate (poly schedule, power 0.9)")
    add_arg(group, "--wd", type=float, default=1e-4, help="weight decay")
    add_arg(
        group,
        "--optimizer",
        type=str,
        default="sgd",
        choices=OPTIMIZERS,
        help="sgd = SGD without momentum (reference default); momentum = SGD 0.9 Nesterov; adamw; adam (L2 decay, "
        "PoolNet's)",
    )
    add_arg(group, "--lr_alpha_scratch", type=float, default=10.0, help="LR multiplier of scratch (head) weights")
    add_arg(group, "--lr_alpha_bias", type=float, default=2.0, help="LR multiplier of biases")
    add_arg(group, "--accumulate_steps", type=int, default=1, help="micro-batches per optimizer step")
    add_bool_arg(
        group,
        "--accumulate_mean",
        False,
        "divide the loss by --accumulate_steps (false = sum gradients, as the reference CAM scripts do)",
    )
    add_bool_arg(
        group,
        "--mixed_precision",
        False,
        "autocast: bf16 where native (recent GPUs; CPUs with bf16, channels-last), fp16 + GradScaler on older "
        "GPUs, fp32 on other CPUs (core/precision.py)",
    )
    add_arg(
        group,
        "--max_grad_norm",
        type=optional_float,
        default=None,
        help="clip the gradient norm to this value (none = off)",
    )
    add_bool_arg(
        group, "--ema", False, "keep an exponential moving average of the weights and save it as the final model"
    )
    add_arg(group, "--ema_decay", type=float, default=0.999, help="EMA decay d in θ_ema ← d·θ_ema + (1-d)·θ")
    add_arg(group, "--ema_steps", type=int, default=32, help="average into the EMA every N optimizer steps")
    add_arg(group, "--ema_warmup", type=int, default=1, help="epochs during which the EMA just copies the weights")
    add_arg(group, "--seed", type=int, default=0, help="random seed (each process uses seed + rank)")
    add_arg(group, "--num_workers", type=int, default=4, help="data-loading worker processes per training process")
    add_arg(group, "--print_ratio", type=float, default=0.25, help="log a line every this fraction of an epoch")
    add_bool_arg(group, "--resume", False, "continue from experiments/models/<tag>/last.pth if it exists")
    add_bool_arg(group, "--overwrite", False, "allow replacing the outputs of an earlier run with the same --tag")
    add_arg(group, "--device", type=str, default="auto", choices=distributed.DEVICES, help="auto = cuda when available")
    add_bool_arg(group, "--sync_bn", False, "SyncBatchNorm across processes (only with torchrun and --mode normal)")
    add_arg(
        group,
        "--wandb",
        type=str2bool,
        nargs="?",
        const=True,
        default=None,
        metavar="true|false",
        help="log to Weights & Biases (default: only when WANDB_PROJECT is set)",
    )
    add_bool_arg(group, "--deterministic", False, "use deterministic torch kernels (slower)")
    add_bool_arg(group, "--validate", False, "run validation at the end of every epoch")
    add_arg(
        group,
        "--validate_max_steps",
        type=optional_int,
        default=None,
        help="validation batches per process and epoch (none = all)",
    )
    add_arg(
        group,
        "--validate_thresholds",
        type=unit_float_list,
        default=list(DEFAULT_THRESHOLDS),
        help="comma-separated background thresholds of the CAM sweep",
    )
    parser.set_defaults(**defaults)
    return group
