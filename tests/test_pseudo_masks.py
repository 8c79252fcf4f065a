"""Pseudo masks from CAM files: core.labels.pseudo_mask and scripts/cam/make_pseudo_masks.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import cli
from core.artifacts import cam_path, load_cam, save_cam, save_saliency
from core.crf import crf_inference_labels
from core.datasets import VOC_CLASSES, build_source
from core.labels import cams_to_label_map, label_map_with_ignore, pseudo_mask
from scripts import evaluate
from scripts.cam import make_pseudo_masks

HAND_CAMS = np.array(
    [
        [[0.1, 0.5, 0.2], [0.3, 0.0, 0.9]],  # key 3
        [[0.05, 0.6, 0.2], [0.3, 0.25, 0.1]],  # key 7
    ],
    dtype=np.float32,
)
FEW_IDS = 4


def test_pseudo_mask_hand_cases():
    # (0, 2): the max equals the threshold -> background; (1, 0): a tie between planes -> the first plane.
    assert pseudo_mask(HAND_CAMS, [3, 7], 0.2).tolist() == [[0, 7, 0], [3, 7, 3]]
    banded = pseudo_mask(HAND_CAMS, [3, 7], 0.5, bg_threshold=0.2)
    assert banded.tolist() == [[0, 7, 0], [255, 255, 3]]
    assert np.array_equal(banded, label_map_with_ignore(HAND_CAMS, [3, 7], 0.5, 0.2))
    background = np.array([[0.0, 0.7, 0.1], [0.35, 0.0, 0.95]], dtype=np.float32)  # e.g. 1 - saliency
    assert pseudo_mask(HAND_CAMS, [3, 7], background).tolist() == [[3, 0, 3], [0, 7, 0]]
    assert pseudo_mask(np.zeros((0, 2, 3), np.float32), [], 0.25).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert pseudo_mask(HAND_CAMS, [3, 7], 0.2).dtype == np.uint8
    with pytest.raises(ValueError):
        pseudo_mask(HAND_CAMS, [3, 7], 0.2, bg_threshold=0.3)


def gt_like_cams(gt: np.ndarray, keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CAMs that roughly follow the GT: 0.8 on the class, noise elsewhere, float32 [n, H, W] in [0, 1]."""
    planes = [0.8 * (gt == key) + 0.35 * rng.random(gt.shape) for key in keys]
    return np.clip(np.stack(planes), 0, 1).astype(np.float32) if planes else np.zeros((0, *gt.shape), np.float32)


@pytest.fixture()
def cams_dir(tmp_path, monkeypatch, synthetic_voc):
    """experiments/predictions/hand@few/ with CAM files made from the GT of 4 synthetic train images."""
    monkeypatch.chdir(tmp_path)
    source = build_source("voc12", synthetic_voc, "train")
    ids = source.ids[:FEW_IDS]
    (tmp_path / "few.txt").write_text("\n".join(ids) + "\n")
    folder = tmp_path / "experiments" / "predictions" / "hand@few"
    rng = np.random.default_rng(0)
    for image_id in ids:
        keys = np.flatnonzero(source.label(image_id)) + 1
        hr_cam = gt_like_cams(source.read_mask(image_id), keys, rng)
        save_cam(cam_path(folder, image_id), keys, hr_cam[:, ::4, ::4], hr_cam)
    return folder


def flags(data_dir, *extra: str, domain: str | None = None) -> list[str]:
    domain = domain or str(Path("few.txt").resolve())
    return [
        "--data_dir",
        str(data_dir),
        "--domain",
        domain,
        "--experiment_name",
        "hand@few",
        "--num_workers",
        "1",
        *extra,
    ]


def make(argv: list[str]) -> dict:
    return make_pseudo_masks.main(make_pseudo_masks.get_args_parser().parse_args(argv))


def test_masks_equal_thresholded_cams_and_score_like_the_cams(cams_dir, synthetic_voc):
    summary = make(flags(synthetic_voc))
    out = Path(summary["out_dir"])
    assert out == Path("experiments/predictions/hand@few/pseudo_labels@t=0.25")
    assert (summary["written"], summary["skipped"], summary["filled"]) == (FEW_IDS, 0, 0)
    ids = Path("few.txt").read_text().split()
    for image_id in ids:
        with Image.open(out / f"{image_id}.png") as png:
            assert png.mode == "P"
            labels = np.asarray(png)
        cams = load_cam(cams_dir / f"{image_id}.npz")
        assert set(np.unique(labels)) <= set(range(21)) | {255}
        assert np.array_equal(labels, cams_to_label_map(cams.hr_cam, cams.keys, 0.25))
        assert set(np.unique(labels)) - {0} <= set(cams.keys.tolist())

    # The PNGs are scored by evaluate.py --mode png, exactly as the CAMs at the same threshold.
    common = ["--data_dir", str(synthetic_voc), "--domain", str(Path("few.txt").resolve()), "--num_workers", "1"]
    png_score = evaluate.main(evaluate.get_args_parser().parse_args(common + ["--mode", "png", "--pred_dir", str(out)]))
    npy_score = evaluate.main(
        evaluate.get_args_parser().parse_args(
            common + ["--mode", "npy", "--pred_dir", str(cams_dir), "--threshold", "0.25"]
        )
    )
    assert 30 < png_score["miou"] <= 100
    assert png_score["miou"] == pytest.approx(npy_score["miou"], abs=1e-9)

    again = make(flags(synthetic_voc))
    assert (again["written"], again["skipped"]) == (0, FEW_IDS)


def test_uncertain_band_and_crf(cams_dir, synthetic_voc):
    banded = make(flags(synthetic_voc, "--bg_threshold", "0.1", "--threshold", "0.3"))
    out = Path(banded["out_dir"])
    assert out.name == "pseudo_labels@t=0.3@bg=0.1"
    ids = Path("few.txt").read_text().split()
    found_uncertain = False
    for image_id in ids:
        cams = load_cam(cams_dir / f"{image_id}.npz")
        labels = np.asarray(Image.open(out / f"{image_id}.png"))
        assert np.array_equal(labels, label_map_with_ignore(cams.hr_cam, cams.keys, 0.3, 0.1))
        found_uncertain |= bool((labels == 255).any())
    assert found_uncertain

    crf = make(flags(synthetic_voc, "--crf_t", "2", "--num_workers", "2"))
    out = Path(crf["out_dir"])
    assert out.name == "pseudo_labels@t=0.25@crf=2"
    source = build_source("voc12", synthetic_voc, str(Path("few.txt").resolve()))
    image_id = ids[0]
    cams = load_cam(cams_dir / f"{image_id}.npz")
    compact = np.where(cams.hr_cam.max(axis=0) > 0.25, cams.hr_cam.argmax(axis=0) + 1, 0)
    refined = crf_inference_labels(source.read_image(image_id), compact, len(cams.keys) + 1, t=2, gt_prob=0.7)
    expected = np.concatenate([[0], cams.keys])[refined]
    assert np.array_equal(np.asarray(Image.open(out / f"{image_id}.png")), expected)


def test_saliency_background(cams_dir, synthetic_voc, tmp_path):
    ids = Path("few.txt").read_text().split()
    rng = np.random.default_rng(1)
    saliency = {}
    for image_id in ids:
        saliency[image_id] = rng.random((64, 64)).astype(np.float32)
        save_saliency(tmp_path / "sal" / f"{image_id}.png", saliency[image_id])
    summary = make(flags(synthetic_voc, "--sal_dir", str(tmp_path / "sal")))
    out = Path(summary["out_dir"])
    assert out.name == "pseudo_labels@sal"
    cams = load_cam(cams_dir / f"{ids[0]}.npz")
    stored = np.rint(saliency[ids[0]] * 255).astype(np.float32) / np.float32(255)  # what the 8-bit PNG holds
    best = cams.hr_cam.max(axis=0)
    expected = np.where(best > 1 - stored, np.concatenate([[0], cams.keys])[cams.hr_cam.argmax(axis=0) + 1], 0)
    labels = np.asarray(Image.open(out / f"{ids[0]}.png"))
    assert np.array_equal(labels, expected)
    assert 0 < np.mean(labels == 0) < 1


def run_cli(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(make_pseudo_masks.main, make_pseudo_masks.get_args_parser(), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_missing_cam_files_and_bad_flags_are_one_line_errors(cams_dir, synthetic_voc, capsys):
    ids = Path("few.txt").read_text().split()
    (cams_dir / f"{ids[2]}.npz").unlink()
    err = run_cli(flags(synthetic_voc), capsys)
    assert f"1 of {FEW_IDS} CAM files missing in experiments/predictions/hand@few (first: {ids[2]})" in err
    assert not Path("experiments/predictions/hand@few/pseudo_labels@t=0.25").exists()  # nothing written
    assert "must not exceed --threshold" in run_cli(flags(synthetic_voc, "--bg_threshold", "0.5"), capsys)
    assert "does not exist" in run_cli(flags(synthetic_voc, "--pred_dir", "nowhere"), capsys)


def test_background_only_images_filled_only_on_request(tmp_path, monkeypatch, synthetic_voc, capsys):
    monkeypatch.chdir(tmp_path)
    voc = build_source("voc12", synthetic_voc, "train")
    ids = voc.ids[:3]
    root = tmp_path / "custom"
    (root / "images").mkdir(parents=True)
    (root / "lists").mkdir()
    for image_id in ids:
        shutil.copy(synthetic_voc / "JPEGImages" / f"{image_id}.jpg", root / "images")
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    (root / "lists" / "three.txt").write_text("\n".join(ids) + "\n")
    (root / "labels.csv").write_text(f"{ids[0]},dog\n{ids[1]},\n{ids[2]},cat\n")
    rng = np.random.default_rng(2)
    for image_id, keys in ((ids[0], [12]), (ids[2], [8])):
        hr_cam = rng.random((1, 64, 64)).astype(np.float32)
        save_cam(cam_path(tmp_path / "cams", image_id), keys, hr_cam[:, ::4, ::4], hr_cam)
    argv = [
        "--dataset",
        "custom",
        "--data_dir",
        str(root),
        "--domain",
        "three",
        "--pred_dir",
        str(tmp_path / "cams"),
        "--num_workers",
        "1",
    ]
    err = run_cli(argv, capsys)
    assert "1 of 3 CAM files missing" in err and ids[1] in err and "--fill_missing_as_background true" in err

    summary = make(argv + ["--fill_missing_as_background", "true"])
    assert (summary["written"], summary["filled"]) == (3, 1)
    filled = np.asarray(Image.open(Path(summary["out_dir"]) / f"{ids[1]}.png"))
    assert filled.shape == (64, 64) and not filled.any()
