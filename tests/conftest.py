"""Shared fixtures: one small synthetic VOC tree per test session, and a VOC source over it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.datasets import DataSource, build_source
from core.datasets.synthetic import make_synthetic_voc

SYNTHETIC_SETTINGS = {"train": 24, "val": 12, "aug": 12, "size": 64, "classes": 5, "seed": 0}


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VOC2012-shaped tree (read-only by convention): 24 train, 12 val, 12 extra aug ids, 64 px, 5 classes.

    ``ImageSets/Segmentation`` holds train (24), val (12), train_aug (36) and trainval (36). Copy it before
    modifying anything.
    """
    root = tmp_path_factory.mktemp("synthetic_voc") / "VOC2012"
    make_synthetic_voc(root, **SYNTHETIC_SETTINGS)
    return root


@pytest.fixture()
def voc_source(synthetic_voc: Path) -> DataSource:
    """``build_source("voc12", synthetic_voc, "train")``."""
    return build_source("voc12", synthetic_voc, "train")


@pytest.fixture(autouse=True)
def _torch_threads(request: pytest.FixtureRequest):
    """Run a test with ``@pytest.mark.torch_threads(N)`` (or a module's ``pytestmark``) on N torch threads.

    On the 2-core CI machine a second OpenMP thread spin-waits next to data-loading workers and can make training
    steps 10x slower, so the training tests ask for one or two threads; the previous count is restored after.
    """
    marker = request.node.get_closest_marker("torch_threads")
    if marker is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(marker.args[0]))
    yield
    torch.set_num_threads(previous)
