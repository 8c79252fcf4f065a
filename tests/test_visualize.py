"""tools/visualize.py: the grid PNG of images, ground truth, CAM overlays and pseudo masks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from core import cli
from core.artifacts import cam_path, save_cam, save_label_map
from core.datasets import build_source, voc_palette
from core.errors import WSSSError
from core.labels import cams_to_label_map
from tools import visualize

CELL = 64  # the synthetic images are 64 x 64, so a 64 px cell shows them pixel for pixel


@pytest.fixture()
def cams_dir(tmp_path, monkeypatch, synthetic_voc):
    """CAM files for the first 3 train ids (a bright square per GT class) under tmp_path/cams."""
    monkeypatch.chdir(tmp_path)
    source = build_source("voc12", synthetic_voc, "train")
    for index, image_id in enumerate(source.ids[:3]):
        keys = np.flatnonzero(source.label(image_id)) + 1
        hr_cam = np.zeros((len(keys), 64, 64), np.float32)
        for plane in range(len(keys)):
            hr_cam[plane, 8 * plane : 8 * plane + 30, 10 + index : 40 + index] = 0.9
        save_cam(cam_path(tmp_path / "cams", image_id), keys, hr_cam[:, ::4, ::4], hr_cam)
    return tmp_path / "cams"


def draw(*argv: str) -> dict:
    return visualize.main(visualize.get_args_parser().parse_args(list(argv)))


def read_rgb(path: str | Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_grid_layout_and_cells(cams_dir, synthetic_voc):
    summary = draw("--data_dir", str(synthetic_voc), "--num", "3", "--cam_dir", str(cams_dir), "--cell_size", str(CELL))
    out = Path(summary["out"])
    assert out == Path("experiments/images/cams@train.png") and out.is_file()
    grid = read_rgb(out)
    header = visualize.HEADER_HEIGHT
    assert grid.shape == (header + 3 * CELL, 4 * CELL, 3)
    assert summary["size"] == [header + 3 * CELL, 4 * CELL] and summary["columns"] == 4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left

    source = build_source("voc12", synthetic_voc, "train")
    palette = voc_palette()
    for row, image_id in enumerate(source.ids[:3]):
        top = header + row * CELL
        cells = [grid[top : top + CELL, c * CELL : (c + 1) * CELL] for c in range(4)]
        # ground truth: palette colours, 255 drawn white (PNG is lossless, the cell is unscaled)
        gt = source.read_mask(image_id)
        expected = palette[gt].copy()
        expected[gt == 255] = 255
        assert np.array_equal(cells[1], expected)
        # thresholded CAM column: the label map of the file at 0.25, coloured
        keys = np.flatnonzero(source.label(image_id)) + 1
        hr_cam = np.zeros((len(keys), 64, 64), np.float32)
        for plane in range(len(keys)):
            hr_cam[plane, 8 * plane : 8 * plane + 30, 10 + row : 40 + row] = 0.9
        assert np.array_equal(cells[3], palette[cams_to_label_map(hr_cam, keys, 0.25)])
        # overlay: the hot square (jet red) differs from the cold rest (jet blue) on the red-minus-blue axis
        hot = cells[2][12:20, 20:30].astype(int)
        cold = cells[2][50:60, 50:60].astype(int)
        assert (hot[..., 0] - hot[..., 2]).mean() > (cold[..., 0] - cold[..., 2]).mean() + 100


def test_per_class_columns_mask_dir_and_explicit_ids(cams_dir, synthetic_voc, tmp_path):
    source = build_source("voc12", synthetic_voc, "train")
    ids = source.ids[:3]
    most = max(int(source.label(i).sum()) for i in ids)
    masks = tmp_path / "masks"
    save_label_map(masks / f"{ids[2]}.png", np.full((64, 64), 255, np.uint8))
    summary = draw(
        "--data_dir",
        str(synthetic_voc),
        "--ids",
        f"{ids[2]},{ids[0]}",
        "--cam_dir",
        str(cams_dir),
        "--mask_dir",
        str(masks),
        "--per_class",
        "true",
        "--cell_size",
        str(CELL),
        "--out",
        "grid.png",
    )
    grid = read_rgb("grid.png")
    header = visualize.HEADER_HEIGHT
    assert grid.shape == (header + 2 * CELL, (4 + most) * CELL, 3) and summary["rows"] == 2
    first_mask_cell = grid[header : header + CELL, 3 * CELL : 4 * CELL]
    assert (first_mask_cell == 255).all()  # all-ignore mask of ids[2], drawn white
    second_mask_cell = grid[header + CELL :, 3 * CELL : 4 * CELL]
    assert (second_mask_cell == visualize.MISSING_GREY).mean() > 0.8  # ids[0] has no mask file: grey placeholder


def test_several_mask_folders_side_by_side_with_their_titles(cams_dir, synthetic_voc, tmp_path):
    source = build_source("voc12", synthetic_voc, "train")
    image_id = source.ids[0]
    pseudo, predicted = tmp_path / "pseudo", tmp_path / "deeplab"
    save_label_map(pseudo / f"{image_id}.png", np.full((64, 64), 255, np.uint8))
    save_label_map(predicted / f"{image_id}.png", np.zeros((64, 64), np.uint8))
    flags = ["--data_dir", str(synthetic_voc), "--ids", image_id, "--cam_dir", str(cams_dir), "--cell_size", str(CELL)]
    flags += ["--mask_dir", str(pseudo), "--mask_dir", str(predicted), "--out", "grid.png"]
    summary = draw(*flags, "--mask_title", "pseudo mask", "--mask_title", "DeepLab")
    grid = read_rgb("grid.png")
    cells = grid[visualize.HEADER_HEIGHT :]
    assert summary["columns"] == 5  # image, GT, CAM, the two label folders
    assert (cells[:, 3 * CELL : 4 * CELL] == 255).all() and (cells[:, 4 * CELL :] == 0).all()  # ignore white, bg black
    with pytest.raises(WSSSError, match="1 --mask_title for 2 --mask_dir"):
        draw(*flags, "--mask_title", "only one")


def test_helpers():
    labels = np.array([[0, 1], [255, 15]], np.uint8)
    colours = visualize.colorize_labels(labels, voc_palette())
    assert colours.tolist() == [[[0, 0, 0], [128, 0, 0]], [[255, 255, 255], [192, 128, 128]]]
    image = np.full((4, 6, 3), 100, np.uint8)
    blended = visualize.cam_overlay(image, np.zeros((4, 6), np.float32), alpha=0.5)
    assert blended[0, 0].tolist() == [50, 50, 114]  # jet(0) is (0, 0, 128) in RGB: 0.5 * 100 + 0.5 * (0, 0, 128)
    assert np.array_equal(visualize.cam_overlay(image, np.ones((4, 6), np.float32), alpha=0.0), image)
    cell = visualize.fit_cell(np.zeros((10, 20, 3), np.uint8), 40)
    assert (
        cell.shape == (40, 40, 3) and (cell[:10] == 255).all() and (cell[10:30] == 0).all() and (cell[30:] == 255).all()
    )


def test_errors_are_one_line(cams_dir, synthetic_voc, capsys):
    for argv, message in (
        (["--data_dir", str(synthetic_voc)], "nothing to draw"),
        (["--data_dir", str(synthetic_voc), "--cam_dir", "nowhere"], "--cam_dir nowhere does not exist"),
        (["--data_dir", str(synthetic_voc), "--cam_dir", str(cams_dir), "--ids", "2012_999999"], "not in the id list"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(visualize.main, visualize.get_args_parser(), argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and "\n" not in err
