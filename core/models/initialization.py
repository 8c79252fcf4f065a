"""Initialisation of randomly initialised (from-scratch) networks.

torchvision's ResNet constructors and the ``resnest`` package re-initialise every convolution with Kaiming-normal
(``fan_out``, ReLU gain: std ``sqrt(2 / (out_channels * k * k))``). The P-NOC reference builds its ResNets itself
and keeps PyTorch's default convolution initialisation (``kaiming_uniform_(a=sqrt(5))``: uniform in
``+-1 / sqrt(fan_in)``, std ``1 / sqrt(3 * fan_in)``). The scheme is a choice among :data:`SCRATCH_INITS`; on the
synthetic benchmark (ResNet-18, AdamW lr 0.001) the constructors' init localises better and far more stably
across seeds, so it is the default; at a lower lr the PyTorch init does slightly better (README, "Initialisation
from scratch").
"""

from __future__ import annotations

from typing import Any

from torch import nn

from core.cli import add_arg
from core.errors import WSSSError

#: ``torchvision``: the constructors' own init (kept as built); ``pytorch``: PyTorch's default init of every layer,
#: as the reference's hand-built ResNets.
SCRATCH_INITS = ("torchvision", "pytorch")
DEFAULT_SCRATCH_INIT = "torchvision"


def add_scratch_init_arg(group: Any) -> None:
    """``--scratch_init``, the same flag in every stage that trains a backbone."""
    add_arg(
        group,
        "--scratch_init",
        type=str,
        default=DEFAULT_SCRATCH_INIT,
        choices=SCRATCH_INITS,
        help="init of a random backbone (--backbone_weights none; loaded weights are never touched): torchvision "
        "(default) = the torchvision/ResNeSt constructors' Kaiming-normal fan_out convs, better and more stable at the "
        "synthetic recipe's lr (README); pytorch = PyTorch's default layer init, as the reference's hand-built "
        "ResNets (smaller weights: wants a lower lr with AdamW)",
    )


def check_scratch_init(scheme: str) -> str:
    """Return ``scheme`` if it is one of :data:`SCRATCH_INITS`, else raise WSSSError."""
    if scheme not in SCRATCH_INITS:
        raise WSSSError(f"unknown scratch init {scheme!r}; choose one of: {', '.join(SCRATCH_INITS)}")
    return scheme


def reset_to_pytorch_default(module: nn.Module) -> nn.Module:
    """Give every layer of a randomly initialised ``module`` PyTorch's default initialisation, in place.

    Convolutions and linear layers: weights ``kaiming_uniform_(a=sqrt(5))`` (uniform in ``+-1/sqrt(fan_in)``),
    biases uniform in ``+-1/sqrt(fan_in)``; BatchNorm/GroupNorm: weight 1, bias 0 (running statistics untouched).
    Only for random weights: call it before loading pretrained weights, never after.

    Returns:
        ``module`` itself.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
            layer.reset_parameters()
        elif isinstance(layer, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and layer.weight is not None:
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module
