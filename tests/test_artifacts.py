"""Stage file formats of core/artifacts.py: CAM files (current and legacy), label maps, saliency, atomic writes."""

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import commands
import numpy as np
import pytest
from PIL import Image

from core import artifacts
from core.artifacts import (
    CAM_FORMAT_VERSION,
    atomic_write,
    load_cam,
    load_label_map,
    load_saliency,
    pending_ids,
    save_cam,
    save_label_map,
    save_saliency,
    strided_size,
    write_json,
)
from core.errors import WSSSError

REPO = Path(__file__).resolve().parents[1]


def _random_cam(n=2, height=37, width=50, seed=0):
    rng = np.random.default_rng(seed)
    hr_cam = rng.random((n, height, width), dtype=np.float32)
    hr_cam[:, 0, 0] = 1.0  # exact end points of the range
    hr_cam[:, 0, 1] = 0.0
    h, w = strided_size(height, width)
    return hr_cam, rng.random((n, h, w), dtype=np.float32)


# --- CAM files ---------------------------------------------------------------------------------------------------


def test_cam_round_trip_is_exact(tmp_path):
    hr_cam, cam = _random_cam()
    path = save_cam(tmp_path / "2007_000032.npz", [15, 3], cam, hr_cam)
    loaded = load_cam(path)
    assert loaded.keys.dtype == np.int64 and loaded.keys.tolist() == [15, 3]
    assert loaded.hr_cam.dtype == np.float32 and loaded.cam.dtype == np.float32
    np.testing.assert_array_equal(loaded.hr_cam, hr_cam)  # float32 storage: bit-exact
    np.testing.assert_array_equal(loaded.cam, cam)
    assert loaded.size == (37, 50) and cam.shape[1:] == (10, 13)  # ceil(37/4), ceil(50/4)
    with np.load(path, allow_pickle=False) as data:  # a plain npz: no pickled object inside
        assert int(data["format_version"]) == CAM_FORMAT_VERSION
        assert sorted(data.files) == ["cam", "format_version", "hr_cam", "keys"]
    assert load_cam(path, with_cam=False).cam is None


def test_cam_without_foreground_round_trips(tmp_path):
    path = save_cam(tmp_path / "bg.npz", np.zeros(0, dtype=np.int64), np.zeros((0, 3, 4)), np.zeros((0, 9, 13)))
    loaded = load_cam(path)
    assert loaded.keys.shape == (0,) and loaded.hr_cam.shape == (0, 9, 13) and loaded.size == (9, 13)


def test_save_cam_validates_shapes_keys_and_range(tmp_path):
    hr_cam, cam = _random_cam(n=2, height=16, width=16)
    with pytest.raises(ValueError, match="ceil"):
        save_cam(tmp_path / "a.npz", [1, 2], cam[:, :3], hr_cam)
    with pytest.raises(ValueError, match="background"):
        save_cam(tmp_path / "a.npz", [0, 2], cam, hr_cam)
    with pytest.raises(ValueError, match="distinct"):
        save_cam(tmp_path / "a.npz", [2, 2], cam, hr_cam)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_cam(tmp_path / "a.npz", [1, 2], cam, hr_cam * 1.5)
    with pytest.raises(ValueError, match="len\\(keys\\)"):
        save_cam(tmp_path / "a.npz", [1], cam, hr_cam)
    assert not list(tmp_path.iterdir())  # nothing half-written
    # A rounding overshoot from resizing is clipped, not refused.
    hr_cam[0, 0, 0] = 1.0 + 1e-5
    assert load_cam(save_cam(tmp_path / "b.npz", [1, 2], cam, hr_cam)).hr_cam.max() == 1.0


def _legacy_files(tmp_path, hr_cam, cam):
    torch = pytest.importorskip("torch")
    irn = {"keys": np.array([2, 14]), "cam": torch.from_numpy(cam), "high_res": hr_cam}  # 0-based fg ids
    pnoc = {"keys": np.array([0, 3, 15]), "cam": torch.from_numpy(cam), "hr_cam": hr_cam}  # bg slot, no bg plane
    np.save(tmp_path / "irn.npy", irn, allow_pickle=True)
    np.save(tmp_path / "pnoc.npy", pnoc, allow_pickle=True)
    return tmp_path / "irn.npy", tmp_path / "pnoc.npy"


def test_legacy_irn_and_pnoc_layouts_load_to_the_same_cam_file(tmp_path):
    hr_cam, cam = _random_cam()
    irn_path, pnoc_path = _legacy_files(tmp_path, hr_cam, cam)
    irn, pnoc = load_cam(irn_path, allow_pickle=True), load_cam(pnoc_path, allow_pickle=True)
    for loaded in (irn, pnoc):
        assert loaded.keys.tolist() == [3, 15]
        np.testing.assert_array_equal(loaded.hr_cam, hr_cam)
        np.testing.assert_array_equal(loaded.cam, cam)
        assert loaded.cam.dtype == np.float32 and isinstance(loaded.cam, np.ndarray)


def test_legacy_background_plane_is_dropped(tmp_path):
    hr_cam, _ = _random_cam(n=3)
    np.save(tmp_path / "rw.npy", {"keys": np.array([0, 4, 9]), "rw": hr_cam}, allow_pickle=True)
    loaded = load_cam(tmp_path / "rw.npy", allow_pickle=True)
    assert loaded.keys.tolist() == [4, 9]
    np.testing.assert_array_equal(loaded.hr_cam, hr_cam[1:])


def test_pickled_npy_needs_allow_pickle(tmp_path):
    hr_cam, cam = _random_cam()
    _, pnoc_path = _legacy_files(tmp_path, hr_cam, cam)
    with pytest.raises(WSSSError, match="--allow_pickle") as info:
        load_cam(pnoc_path)
    assert "\n" not in str(info.value) and str(pnoc_path) in str(info.value)


def test_wrong_version_missing_and_corrupt_files_are_user_errors(tmp_path):
    hr_cam, cam = _random_cam()
    np.savez(tmp_path / "old.npz", format_version=np.int64(CAM_FORMAT_VERSION + 1), keys=[1, 2], cam=cam, hr_cam=hr_cam)
    with pytest.raises(WSSSError, match="format version"):
        load_cam(tmp_path / "old.npz")
    with pytest.raises(WSSSError, match="not found"):
        load_cam(tmp_path / "absent.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(WSSSError, match="broken.npz"):
        load_cam(tmp_path / "broken.npz")


# --- atomic writes ------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_on_success_and_keeps_suffix(tmp_path):
    target = tmp_path / "deep" / "folder" / "x.png"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp.name.startswith(".x.png.tmp-")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["x.png"]


def test_atomic_write_error_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]


def test_killed_writer_leaves_old_file_intact(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    code = textwrap.dedent(
        f"""
        import os, signal
        from core.artifacts import atomic_write
        with atomic_write({str(target)!r}) as tmp:
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = commands.run([sys.executable, "-c", code], env=env, timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    assert pending_ids(["a", "b"], tmp_path, ".png") == ["b"]  # the orphan temp file is not mistaken for b or a


def test_write_json_is_strict_json(tmp_path):
    document = {"miou": np.float64(61.5), "iou": {"cow": float("nan")}, "n": np.int64(3)}
    path = write_json(tmp_path / "r" / "out.json", document)
    assert json.loads(path.read_text()) == {"miou": 61.5, "iou": {"cow": None}, "n": 3}


def test_pending_ids(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"")
    assert pending_ids(["a", "b", "c"], tmp_path, ".npz") == ["b", "c"]
    assert pending_ids(["a", "b"], tmp_path / "not_yet", ".npz") == ["a", "b"]


# --- label maps and saliency --------------------------------------------------------------------------------------


def test_label_map_round_trip_with_voc_palette(tmp_path):
    labels = np.array([[0, 1, 2, 255], [20, 15, 0, 255]], dtype=np.uint8)
    path = save_label_map(tmp_path / "m.png", labels)
    with Image.open(path) as image:
        assert image.mode == "P"
        rgb = np.asarray(image.convert("RGB"))
    assert rgb[0, 1].tolist() == [128, 0, 0] and rgb[0, 2].tolist() == [0, 128, 0]
    assert rgb[0, 3].tolist() == [224, 224, 192]  # VOC void colour for 255
    loaded = load_label_map(path)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, labels)


def test_label_map_rejects_rgb_and_missing(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(WSSSError, match="single-channel"):
        load_label_map(tmp_path / "rgb.png")
    with pytest.raises(WSSSError, match="not found"):
        load_label_map(tmp_path / "none.png")


def test_saliency_round_trip(tmp_path):
    saliency = np.linspace(0, 1, 40, dtype=np.float32).reshape(5, 8)
    loaded = load_saliency(save_saliency(tmp_path / "s.png", saliency))
    assert loaded.dtype == np.float32 and loaded.min() == 0.0 and loaded.max() == 1.0
    assert np.abs(loaded - saliency).max() <= 0.5 / 255 + 1e-7  # one 8-bit rounding step
    as_uint8 = np.array([[0, 7, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(load_saliency(save_saliency(tmp_path / "u.png", as_uint8)) * 255, as_uint8)
    rgb = np.stack([np.full((2, 2), v, np.uint8) for v in (30, 60, 90)], axis=2)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(WSSSError, match=r"rgb.png is a RGB image.*single-channel") as info:
        load_saliency(tmp_path / "rgb.png")
    assert "\n" not in str(info.value)
    labels = np.array([[0, 3, 255]], dtype=np.uint8)  # the reference's --sal_mode segmentation: classes 1..254
    save_label_map(tmp_path / "labels.png", labels)
    np.testing.assert_array_equal(load_saliency(tmp_path / "labels.png", kind="segmentation"), [[0, 1, 0]])
    with pytest.raises(WSSSError, match="--sal_mode segmentation"):
        load_saliency(tmp_path / "labels.png")
    with pytest.raises(ValueError):
        save_saliency(tmp_path / "bad.png", saliency * 2)


def test_artifacts_module_has_no_palette_copy():
    assert not hasattr(artifacts, "voc_palette")  # the palette lives in core.datasets only
