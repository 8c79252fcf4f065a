"""A toy training run for the engine's tests: fixed 8x8 images with two labels, a tiny network, a BCE step.

Imported by the test modules (pytest puts ``tests/`` on ``sys.path``); not a test module itself.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from core import engine


class ToyImages(Dataset):
    """n fixed 3x8x8 images with 2 multi-hot labels; ``noise`` adds per-item randomness from torch and numpy."""

    def __init__(self, n: int = 16, noise: bool = False) -> None:
        g = torch.Generator().manual_seed(123)
        self.images = torch.randn(n, 3, 8, 8, generator=g)
        self.labels = (torch.rand(n, 2, generator=g) > 0.5).float()
        self.noise = noise

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        if self.noise:  # stands in for random augmentation: draws from the global torch and numpy streams
            image = image + 0.1 * torch.randn_like(image) + float(np.random.uniform(-0.1, 0.1))
        return {"id": str(index), "image": image, "label": self.labels[index]}


def toy_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(dropout), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def parse(tag: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    engine.add_training_args(parser)
    return parser.parse_args(["--tag", tag, "--num_workers", "0", "--device", "cpu", "--print_ratio", "0.5", *extra])


def bce_step(ctx: engine.TrainContext, batch: dict, step: int) -> dict:
    with ctx.autocast():
        logits = ctx.models["cg"](ctx.to_device(batch["image"]))
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), ctx.to_device(batch["label"]))
    ctx.update("cg", loss)
    return {"loss": loss.item()}
