"""Shared fixtures: one small synthetic VOC tree per test session, a VOC source over it, perfect CAM files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from core.artifacts import cam_path, save_cam, strided_size
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


def write_perfect_cams(source: DataSource, out_dir: Path, ids=None) -> Path:
    """One plane per GT class, 1 on the class and 0 elsewhere: a perfect prediction at any threshold in [0, 1)."""
    for image_id in ids or source.ids:
        gt = source.read_mask(image_id)
        keys = np.array([c for c in np.unique(gt) if 0 < c < 255], dtype=np.int64)
        hr_cam = np.stack([(gt == k).astype(np.float32) for k in keys]) if keys.size else np.zeros((0, *gt.shape))
        h, w = strided_size(*gt.shape)
        save_cam(cam_path(out_dir, image_id), keys, hr_cam[:, ::4, ::4][:, :h, :w], hr_cam)
    return out_dir


@pytest.fixture(scope="session")
def perfect_cams() -> Callable[..., Path]:
    """:func:`write_perfect_cams`: ``perfect_cams(source, out_dir, ids=None)`` writes perfect CAM files."""
    return write_perfect_cams


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own empty folder, so stages that write under ``./experiments`` never touch the repo's."""
    monkeypatch.chdir(tmp_path)


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
