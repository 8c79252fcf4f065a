"""Data sources (VOC, COCO, custom), the dataset preparation tools and the torch dataset wrappers."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

import commands
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from core.datasets import (
    ClassificationDataset,
    ImageDataset,
    SegmentationDataset,
    build_source,
    source_from_args,
    voc_palette,
)
from core.datasets.base import decode_mask_file, label_from_mask, read_id_list
from core.datasets.transforms import build_segmentation_transform, build_validation_transform
from core.errors import WSSSError

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode if mode != "P" else "L").save(path)


def write_jpg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture()
def voc_copy(synthetic_voc: Path, tmp_path: Path) -> Path:
    """A private copy of the session tree that a test may modify."""
    return Path(shutil.copytree(synthetic_voc, tmp_path / "VOC2012"))


# ---------------------------------------------------------------------------------------------- VOC
def test_voc_palette_matches_the_standard_colours():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[20].tolist() == [0, 64, 128]  # tvmonitor
    assert palette[255].tolist() == [224, 224, 192]  # void


def test_voc_reader_lists_and_classes(synthetic_voc: Path, voc_source):
    assert len(voc_source.ids) == 24 and voc_source.ids == sorted(voc_source.ids)
    assert voc_source.classes[0] == "background" and len(voc_source.classes) == 21 and voc_source.num_classes == 20
    val = build_source("voc12", synthetic_voc, "val")
    train_aug = build_source("voc12", synthetic_voc, "train_aug")
    assert len(val.ids) == 12 and len(train_aug.ids) == 36
    assert set(voc_source.ids) <= set(train_aug.ids) and not set(val.ids) & set(train_aug.ids)
    image = voc_source.read_image(voc_source.ids[0])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert voc_source.has_masks


def test_voc_labels_from_xml_match_the_objects_in_the_mask(synthetic_voc: Path, voc_source):
    labels = voc_source.labels()
    assert set(labels) == set(voc_source.ids)
    for image_id, label in labels.items():
        assert label.dtype == np.float32 and label.shape == (20,)
        sbd_mask = np.asarray(Image.open(synthetic_voc / "SegmentationClassAug" / f"{image_id}.png"))
        np.testing.assert_array_equal(label, label_from_mask(sbd_mask, 20))
        assert label.sum() >= 1 and label[5:].sum() == 0  # 5 classes in the fixture
    first = voc_source.ids[0]
    returned = voc_source.label(first)
    returned[:] = 7  # callers get copies: the cache cannot be corrupted (SPEC §13.1 item 3)
    assert voc_source.label(first).max() == 1


def test_voc_label_falls_back_to_mask_without_xml(voc_copy: Path):
    source = build_source("voc12", voc_copy, "train")
    image_id = source.ids[3]
    expected = source.label(image_id)
    (voc_copy / "Annotations" / f"{image_id}.xml").unlink()
    fresh = build_source("voc12", voc_copy, "train")
    np.testing.assert_array_equal(fresh.label(image_id), expected)
    (voc_copy / "SegmentationClass" / f"{image_id}.png").unlink()
    (voc_copy / "SegmentationClassAug" / f"{image_id}.png").unlink()
    assert build_source("voc12", voc_copy, "train").label(image_id) is None


def test_voc_gt_prefers_original_masks_with_band(synthetic_voc: Path, voc_source):
    band_pixels = 0
    for image_id in voc_source.ids:
        assert voc_source.mask_path(image_id).parent.name == "SegmentationClass"
        original = voc_source.read_mask(image_id)
        sbd = np.asarray(Image.open(synthetic_voc / "SegmentationClassAug" / f"{image_id}.png"))
        assert Image.open(voc_source.mask_path(image_id)).mode == "P"
        assert 255 not in sbd
        band = original == 255
        band_pixels += band.sum()
        np.testing.assert_array_equal(original[~band], sbd[~band])  # the band is the only difference
    assert band_pixels > 0
    aug_only = sorted(set(build_source("voc12", synthetic_voc, "train_aug").ids) - set(voc_source.ids))
    aug_source = build_source("voc12", synthetic_voc, "train_aug")
    assert aug_source.mask_path(aug_only[0]).parent.name == "SegmentationClassAug"
    assert 255 not in aug_source.read_mask(aug_only[0])


def test_voc_list_with_crlf_deeplab_style_and_duplicates(voc_copy: Path):
    lists = voc_copy / "ImageSets" / "Segmentation"
    ids = read_id_list(lists / "train.txt")[:3]
    text = f"{ids[0]}\r\n\r\n/JPEGImages/{ids[1]}.jpg /SegmentationClassAug/{ids[1]}.png\r\n{ids[2]}\r\n{ids[0]}\r\n"
    (lists / "mine.txt").write_bytes(text.encode())
    assert build_source("voc12", voc_copy, "mine").ids == ids


def test_voc_test_domain_has_no_labels_or_masks(voc_copy: Path):
    write_jpg(voc_copy / "JPEGImages" / "2013_000001.jpg", np.zeros((40, 50, 3), np.uint8))
    (voc_copy / "ImageSets" / "Segmentation" / "test.txt").write_text("2013_000001\n")
    source = build_source("voc12", voc_copy, "test")
    assert source.label("2013_000001") is None and source.mask_path("2013_000001") is None
    assert not source.has_masks
    with pytest.raises(WSSSError, match="2013_000001"):
        source.read_mask("2013_000001")
    item = ImageDataset(source)[0]
    assert item["label"] is None and item["image"].shape == (40, 50, 3)


# ------------------------------------------------------------------------------------- bad inputs
def test_missing_data_dir_and_unknown_dataset(tmp_path: Path):
    with pytest.raises(WSSSError, match=r"nowhere.*--data_dir"):
        build_source("voc12", tmp_path / "nowhere", "train")
    with pytest.raises(WSSSError, match="voc12, coco14, custom"):
        build_source("cityscapes", tmp_path, "train")
    args = argparse.Namespace(
        dataset="voc12", data_dir=None, domain="train", images_dir=None, masks_dir=None, class_names=None
    )
    with pytest.raises(WSSSError, match="WSSS_DATA_DIR"):
        source_from_args(args)


def test_source_from_args_uses_the_given_domain(synthetic_voc: Path):
    args = argparse.Namespace(
        dataset="voc12", data_dir=str(synthetic_voc), domain="train", images_dir=None, masks_dir=None, class_names=None
    )
    assert len(source_from_args(args).ids) == 24
    assert len(source_from_args(args, domain="val").ids) == 12


def test_missing_list_names_the_file_and_the_tool(synthetic_voc: Path):
    with pytest.raises(WSSSError, match=r"trainval_aug\.txt.*prepare_voc12\.py"):
        build_source("voc12", synthetic_voc, "trainval_aug")
    with pytest.raises(WSSSError, match=r"nosuch\.txt"):
        build_source("voc12", synthetic_voc, "nosuch")


def test_id_without_image_names_path_and_list(voc_copy: Path):
    lists = voc_copy / "ImageSets" / "Segmentation"
    (lists / "broken.txt").write_text("2099_000001\n")
    source = build_source("voc12", voc_copy, "broken")
    with pytest.raises(WSSSError) as info:
        source.read_image("2099_000001")
    message = str(info.value)
    assert "2099_000001.jpg" in message and "broken.txt" in message and "\n" not in message


def test_undecodable_image(voc_copy: Path):
    source = build_source("voc12", voc_copy, "train")
    bad = source.ids[0]
    (voc_copy / "JPEGImages" / f"{bad}.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(WSSSError, match=rf"cannot decode image .*{bad}\.jpg.*remove its id from .*train\.txt"):
        source.read_image(bad)


def test_mask_with_out_of_range_value(voc_copy: Path):
    source = build_source("voc12", voc_copy, "train")
    bad = source.ids[1]
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 50
    write_png(voc_copy / "SegmentationClass" / f"{bad}.png", mask)
    with pytest.raises(WSSSError, match=rf"{bad}\.png has values 50 outside 0\.\.20 and 255"):
        source.read_mask(bad)


def test_rgb_colour_masks_decode_by_exact_palette_match(tmp_path: Path):
    palette = voc_palette()
    indices = np.array([[0, 1, 2], [20, 255, 3]], np.uint8)
    write_png(tmp_path / "rgb.png", palette[indices], mode="RGB")
    np.testing.assert_array_equal(decode_mask_file(tmp_path / "rgb.png", palette, 20), indices)
    colours = palette[indices].copy()
    colours[0, 0] = (1, 2, 3)
    write_png(tmp_path / "bad.png", colours, mode="RGB")
    with pytest.raises(WSSSError, match=r"bad\.png has colours \(1, 2, 3\)"):
        decode_mask_file(tmp_path / "bad.png", palette, 20)
    write_png(tmp_path / "class21.png", palette[np.array([[21]], np.uint8)], mode="RGB")
    with pytest.raises(WSSSError, match="class21.png"):
        decode_mask_file(tmp_path / "class21.png", palette, 20)


# ---------------------------------------------------------------------------------------------- COCO
def make_coco_tree(root: Path) -> dict[str, np.ndarray]:
    """3 train images (one background-only, one with PNG missing), 1 val image; returns the PNG per id."""
    rng = np.random.default_rng(0)
    masks = {}
    for split, number, values in (
        ("train2014", 9, (1, 80)),
        ("train2014", 25, ()),
        ("train2014", 30, (5,)),
        ("val2014", 42, (17, 255)),
    ):
        image_id = f"{number:012d}"
        write_jpg(root / split / f"COCO_{split}_{image_id}.jpg", rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
        mask = np.zeros((24, 32), np.uint8)
        for k, value in enumerate(values):
            mask[k * 5 : k * 5 + 4, 3:9] = value
        if number != 30:
            write_png(root / "coco_seg_anno" / f"{image_id}.png", mask)
            masks[image_id] = mask
    return masks


def test_prepare_coco14_and_coco_reader(tmp_path: Path):
    masks = make_coco_tree(tmp_path)
    tool = load_tool("prepare_coco14")
    summary = tool.main(tool.get_args_parser().parse_args(["--data_dir", str(tmp_path), "--num_workers", "1"]))
    assert summary["train2014"] == {"ids": 2, "no_object": 1, "without_png": 1}
    assert summary["val2014"] == {"ids": 1, "no_object": 0, "without_png": 0}
    assert (tmp_path / "lists" / "train2014.txt").read_text() == "000000000009\n000000000025\n"
    with np.load(tmp_path / "lists" / "train2014_labels.npz", allow_pickle=False) as data:
        assert data["labels"].dtype == np.uint8 and data["labels"].shape == (2, 80)
        assert np.flatnonzero(data["labels"][0]).tolist() == [0, 79]

    train = build_source("coco14", tmp_path, "train")  # alias of train2014
    assert train.domain == "train2014" and train.ids == ["000000000009", "000000000025"]
    assert len(train.classes) == 81 and train.classes[1] == "person" and train.classes[80] == "toothbrush"
    assert np.flatnonzero(train.label("000000000009")).tolist() == [0, 79]
    assert train.label("000000000025").sum() == 0
    assert train.read_image("000000000009").shape == (24, 32, 3)
    np.testing.assert_array_equal(train.read_mask("000000000009"), masks["000000000009"])
    val = build_source("coco14", tmp_path, "val2014")
    assert val.image_path("000000000042").name == "COCO_val2014_000000000042.jpg"

    (tmp_path / "lists" / "val2014_labels.npz").unlink()  # labels are then computed from the PNGs
    assert np.flatnonzero(build_source("coco14", tmp_path, "val").label("000000000042")).tolist() == [16]
    dataset = ClassificationDataset(train, build_validation_transform(32))
    assert dataset.ids == ["000000000009"]


def test_prepare_coco14_command_line_with_worker_pool(tmp_path: Path):
    make_coco_tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "prepare_coco14.py"), "--data-dir", str(tmp_path), "--num_workers", "2"]
    result = commands.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 without any object" in result.stderr
    assert (tmp_path / "lists" / "val2014.txt").read_text() == "000000000042\n"
    shutil.rmtree(tmp_path / "coco_seg_anno")
    result = commands.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: folder")


def test_coco_missing_list_points_to_the_tool(tmp_path: Path):
    with pytest.raises(WSSSError, match="prepare_coco14.py"):
        build_source("coco14", tmp_path, "train2014")


# --------------------------------------------------------------------------------------------- VOC+SBD
def test_prepare_voc12_builds_train_aug_from_sbd(tmp_path: Path, caplog):
    from scipy.io import savemat

    voc, sbd = tmp_path / "VOC2012", tmp_path / "sbd"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\nb\n")
    (lists / "val.txt").write_text("c\n")
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("d\ne\nc\n")
    (sbd / "val.txt").write_text("f\r\na\r\n")
    expected = {}
    for k, image_id in enumerate("acdef"):
        seg = np.zeros((6, 7), np.uint8)
        seg[1:3, 2:5] = k + 1
        seg[5, 0] = 255 if image_id == "d" else 0
        savemat(
            sbd / "cls" / f"{image_id}.mat",
            {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1), "CategoriesPresent": np.array([k + 1])}},
        )
        expected[image_id] = seg
    original = np.full((6, 7), 3, np.uint8)
    write_png(voc / "SegmentationClass" / "a.png", original)
    kept = np.full((6, 7), 9, np.uint8)
    write_png(voc / "SegmentationClassAug" / "e.png", kept)  # an existing conversion is kept

    tool = load_tool("prepare_voc12")
    with caplog.at_level(logging.WARNING):
        summary = tool.main(
            tool.get_args_parser().parse_args(["--voc_dir", str(voc), "--sbd_dir", str(sbd), "--num_workers", "1"])
        )
    assert (lists / "train_aug.txt").read_text().split() == ["a", "b", "d", "e", "f"]
    assert (lists / "trainval_aug.txt").read_text().split() == ["a", "b", "c", "d", "e", "f"]
    assert summary["converted"] == 4 and summary["train_aug"] == 5
    assert "train_aug has 5 ids, the standard VOC/SBD setup gives 10582" in caplog.text
    for image_id in "acdf":
        png = Image.open(voc / "SegmentationClassAug" / f"{image_id}.png")
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), expected[image_id])
    np.testing.assert_array_equal(np.asarray(Image.open(voc / "SegmentationClassAug" / "e.png")), kept)
    np.testing.assert_array_equal(np.asarray(Image.open(voc / "SegmentationClass" / "a.png")), original)
    assert not list((voc / "SegmentationClassAug").glob(".*"))  # no temporary files left behind

    (sbd / "cls").rename(sbd / "gone")
    with pytest.raises(WSSSError, match="--sbd_dir"):
        tool.main(tool.get_args_parser().parse_args(["--voc_dir", str(voc), "--sbd_dir", str(sbd)]))


# ---------------------------------------------------------------------------------------------- custom
def make_custom_tree(root: Path) -> None:
    rng = np.random.default_rng(1)
    (root / "lists").mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    for image_id in ("p1", "p2", "p3", "p4"):
        write_jpg(root / "images" / f"{image_id}.jpg", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "images" / "q5.png")
    for image_id, value in (("p1", 2), ("p2", 1), ("p3", 0)):
        mask = np.zeros((20, 30), np.uint8)
        mask[5:10, 5:10] = value
        write_png(root / "masks" / f"{image_id}.png", mask)
    (root / "lists" / "train.txt").write_text("p1\np2\np3\np4\nq5\n")
    (root / "labels.csv").write_text("id,labels\np2,cat|dog\nq5,dog\n")


def test_custom_source_labels_from_csv_then_masks(tmp_path: Path):
    make_custom_tree(tmp_path)
    source = build_source("custom", tmp_path, "train")
    assert source.classes == ["background", "cat", "dog"] and source.num_classes == 2
    assert source.label("p1").tolist() == [0, 1]  # from the mask
    assert source.label("p2").tolist() == [1, 1]  # labels.csv wins over the mask
    assert source.label("p3").tolist() == [0, 0]
    assert source.label("p4") is None
    assert source.label("q5").tolist() == [0, 1] and source.image_path("q5").suffix == ".png"
    assert source.read_image("q5").shape == (20, 30, 3)
    assert source.read_mask("p1").max() == 2
    assert sorted(build_source("custom", tmp_path, "all").ids) == ["p1", "p2", "p3", "p4", "q5"]
    with pytest.raises(WSSSError, match=r"lists/val\.txt.*--domain all"):
        build_source("custom", tmp_path, "val")


def test_custom_source_overrides_and_errors(tmp_path: Path):
    make_custom_tree(tmp_path)
    (tmp_path / "names.txt").write_text("background\ncat\ndog\nbird\n")
    other_masks = tmp_path / "pseudo"
    write_png(other_masks / "p1.png", np.full((20, 30), 3, np.uint8))
    source = build_source("custom", tmp_path, "train", masks_dir=other_masks, class_names=tmp_path / "names.txt")
    assert source.num_classes == 3 and source.read_mask("p1").max() == 3 and source.mask_path("p2") is None
    with pytest.raises(WSSSError, match="--class_names only applies"):
        build_source("voc12", tmp_path, "train", class_names=tmp_path / "names.txt")
    (tmp_path / "labels.csv").write_text("p1,cat|horse\n")
    with pytest.raises(WSSSError, match=r"labels\.csv line 1 names class 'horse'"):
        build_source("custom", tmp_path, "train")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(WSSSError, match=r"classes\.txt does not exist"):
        build_source("custom", tmp_path, "train")


# ---------------------------------------------------------------------------------------- torch datasets
def test_classification_dataset_drops_background_only_and_requires_labels(tmp_path: Path, caplog):
    make_custom_tree(tmp_path)
    (tmp_path / "lists" / "labelled.txt").write_text("p1\np2\np3\nq5\n")
    source = build_source("custom", tmp_path, "labelled")
    with caplog.at_level(logging.INFO):
        dataset = ClassificationDataset(source, build_validation_transform(16))
    assert dataset.ids == ["p1", "p2", "q5"]
    assert "kept 3 of 4 images; 1 have no foreground class" in caplog.text
    item = dataset[1]
    assert item["id"] == "p2" and item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].tolist() == [1.0, 1.0]
    assert len(ClassificationDataset(source, None, skip_background_only=False)) == 4
    with pytest.raises(WSSSError, match=r"1 of 5 ids .* no image-level label \(first: p4\)"):
        ClassificationDataset(build_source("custom", tmp_path, "train"), None)


def test_corrupt_image_raises_or_is_skipped(tmp_path: Path, caplog):
    make_custom_tree(tmp_path)
    (tmp_path / "images" / "p2.jpg").write_bytes(b"\x00" * 10)
    (tmp_path / "lists" / "two.txt").write_text("p1\np2\n")
    source = build_source("custom", tmp_path, "two")
    strict = SegmentationDataset(source, build_validation_transform(16))
    with pytest.raises(WSSSError, match=r"cannot decode image .*p2\.jpg"):
        strict[1]
    lenient = SegmentationDataset(source, build_validation_transform(16), skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        item = lenient[1]
    assert item["id"] == "p1" and "p2.jpg" in caplog.text


def test_segmentation_dataset_items_and_loader(voc_source):
    dataset = SegmentationDataset(voc_source, build_segmentation_transform(48, 80, 32, seed=0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    assert batch["mask"].dtype == torch.int64 and batch["label"].shape == (4, 20)
    values = set(batch["mask"].unique().tolist())
    assert values <= set(range(6)) | {255}
    for k in range(4):  # a class visible in the cropped mask must be in the image label
        present = {v - 1 for v in batch["mask"][k].unique().tolist() if 0 < v < 255}
        assert present <= set(torch.nonzero(batch["label"][k]).flatten().tolist())
