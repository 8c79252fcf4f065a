"""The synthetic VOC benchmark: layout, determinism, and the small-emblem / shared-body design."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.datasets import build_source
from core.datasets.base import read_id_list
from core.datasets.synthetic import (
    EMBLEM_SHAPES,
    MARKER_FILE,
    STRIPE_COLORS,
    emblem_style,
    make_synthetic_voc,
    render_scene,
)
from core.datasets.voc import VOC_CLASSES
from core.errors import WSSSError

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_splits(synthetic_voc: Path):
    lists = synthetic_voc / "ImageSets" / "Segmentation"
    train, val = read_id_list(lists / "train.txt"), read_id_list(lists / "val.txt")
    train_aug, trainval = read_id_list(lists / "train_aug.txt"), read_id_list(lists / "trainval.txt")
    assert (len(train), len(val), len(train_aug), len(trainval)) == (24, 12, 36, 36)
    assert set(train) <= set(train_aug) and not set(val) & set(train_aug)
    assert set(trainval) == set(train) | set(val)
    originals = {p.stem for p in (synthetic_voc / "SegmentationClass").glob("*.png")}
    sbd_like = {p.stem for p in (synthetic_voc / "SegmentationClassAug").glob("*.png")}
    assert originals == set(trainval) and sbd_like == set(train_aug)
    assert {p.stem for p in (synthetic_voc / "JPEGImages").glob("*.jpg")} == set(trainval) | set(train_aug)
    assert {p.stem for p in (synthetic_voc / "Annotations").glob("*.xml")} == set(trainval) | set(train_aug)
    sample = Image.open(synthetic_voc / "JPEGImages" / f"{train[0]}.jpg")
    assert sample.size == (64, 64) and sample.mode == "RGB"


def test_annotations_use_only_the_first_k_voc_names(synthetic_voc: Path):
    names = set()
    for xml in (synthetic_voc / "Annotations").glob("*.xml"):
        text = xml.read_text()
        names |= {line.strip()[6:-7] for line in text.splitlines() if line.strip().startswith("<name>")}
        assert "<bndbox><xmin>" in text
    assert names <= set(VOC_CLASSES[1:6]) and len(names) >= 4


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path):
    settings = {"train": 4, "val": 2, "aug": 2, "size": 48, "classes": 3}
    make_synthetic_voc(tmp_path / "a", seed=7, **settings)
    make_synthetic_voc(tmp_path / "b", seed=7, **settings)
    make_synthetic_voc(tmp_path / "c", seed=8, **settings)
    a, b, c = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b"), tree_bytes(tmp_path / "c")
    assert len(a) == 2 * 8 + 6 + 6 + 4 + 1  # jpg+xml per id (8), 6 + 6 png, 4 lists, marker
    assert a == b
    images_a = {k for k in a if k.startswith("JPEGImages")}
    assert images_a == {k for k in c if k.startswith("JPEGImages")}  # ids are numbered alike; content differs
    assert sum(a[k] != c[k] for k in images_a) == len(images_a)


def test_emblems_are_small_parts_of_the_objects():
    fractions, covered = [], []
    for index in range(60):
        scene = render_scene(96, 20, np.random.default_rng([3, index]))
        for n in range(1, len(scene.classes) + 1):
            obj = scene.instances == n
            fractions.append((scene.emblem & obj).sum() / obj.sum())
        covered.append((scene.instances > 0).mean())
        assert not (scene.emblem & (scene.instances == 0)).any()  # emblems lie on objects
        np.testing.assert_array_equal(scene.mask > 0, scene.instances > 0)
    fractions = np.array(fractions)
    assert 0.10 <= fractions.mean() <= 0.18, fractions.mean()
    assert np.percentile(fractions, 90) < 0.22 and fractions.min() > 0.02
    assert (fractions > 0).all()  # occlusion never hides a whole emblem, so every label is visible
    assert 0.1 < np.mean(covered) < 0.6


def test_bodies_look_the_same_for_every_class_and_emblems_differ():
    seen = set()
    for index in range(40):
        scene = render_scene(96, 10, np.random.default_rng([4, index]))
        image = scene.image.astype(np.int64)
        for n, class_index in enumerate(scene.classes, start=1):
            pixels = image[(scene.instances == n) & ~scene.emblem]
            # Every body, whatever its class, is the black/white stripe pattern: grey, and two-level.
            chroma = pixels.max(1) - pixels.min(1)
            assert np.median(chroma) <= 6
            luminance = pixels.mean(1)
            assert ((luminance > 170) | (luminance < 70)).mean() > 0.95
            assert 0.2 < (luminance > 170).mean() < 0.8
            emblem_pixels = image[scene.emblem & (scene.instances == n)]
            expected = emblem_style(class_index)[0].astype(np.int64)
            assert np.abs(np.median(emblem_pixels, 0) - expected).max() <= 14
            seen.add(class_index)
    assert len(seen) >= 8
    assert np.ptp(STRIPE_COLORS) > 150


def test_body_tint_colours_the_bodies_by_class_and_keeps_the_layout():
    for index in range(10):
        plain = render_scene(96, 10, np.random.default_rng([4, index]))
        tinted = render_scene(96, 10, np.random.default_rng([4, index]), body_tint=0.5)
        np.testing.assert_array_equal(tinted.mask, plain.mask)  # same random draws: same objects and emblems
        np.testing.assert_array_equal(tinted.emblem, plain.emblem)
        image, base = tinted.image.astype(np.float64), plain.image.astype(np.float64)
        for n, class_index in enumerate(tinted.classes, start=1):
            body = (tinted.instances == n) & ~tinted.emblem
            colour = emblem_style(class_index)[0].astype(np.float64)
            # half stripe, half class colour (up to rounding)
            assert np.abs(image[body] - (0.5 * base[body] + 0.5 * colour)).max() <= 1.0
        assert (image[tinted.instances == 0] == base[tinted.instances == 0]).all()  # background untouched
    with pytest.raises(WSSSError, match="body_tint"):
        make_synthetic_voc(Path("unused"), train=1, val=0, aug=0, size=48, classes=2, body_tint=1.5)


def test_emblem_styles_separate_every_pair_of_classes():
    styles = [emblem_style(k) for k in range(20)]
    for i in range(20):
        for j in range(i + 1, 20):
            same_colour = np.array_equal(styles[i][0], styles[j][0])
            same_shape = styles[i][1] == styles[j][1]
            assert not (same_colour and same_shape)
    assert {s for _, s in styles[:10]} == set(EMBLEM_SHAPES)
    assert len({tuple(c) for c, _ in styles[:10]}) == 10


def test_voc_reader_reads_the_tree_unchanged(synthetic_voc: Path):
    source = build_source("voc12", synthetic_voc, "train_aug")
    for image_id in source.ids[:12]:
        mask = source.read_mask(image_id)
        assert mask.shape == source.read_image(image_id).shape[:2]
        assert set(np.unique(mask)) <= set(range(6)) | {255}
        present = {v - 1 for v in np.unique(mask) if 0 < v < 255}
        assert present == set(np.flatnonzero(source.label(image_id)))


def test_refuses_foreign_or_existing_folders(tmp_path: Path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(WSSSError, match="not empty"):
        make_synthetic_voc(foreign, train=2, val=1, aug=1, size=32, classes=2, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "syn"
    make_synthetic_voc(out, train=2, val=1, aug=1, size=32, classes=2)
    with pytest.raises(WSSSError, match="--overwrite"):
        make_synthetic_voc(out, train=2, val=1, aug=1, size=32, classes=2)
    summary = make_synthetic_voc(out, train=3, val=1, aug=0, size=32, classes=2, overwrite=True)
    assert summary["num_images"] == 4 and len(list((out / "JPEGImages").iterdir())) == 4
    assert (out / MARKER_FILE).is_file()
    with pytest.raises(WSSSError, match="--classes 21"):
        make_synthetic_voc(tmp_path / "x", classes=21)


def test_command_line_tool_and_speed(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("make_synthetic_voc_tool", ROOT / "tools" / "make_synthetic_voc.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.get_args_parser().parse_args(
        [
            "--out",
            str(tmp_path / "voc"),
            "--train",
            "40",
            "--val",
            "10",
            "--aug",
            "10",
            "--size",
            "128",
            "--classes",
            "8",
        ]
    )
    start = time.perf_counter()
    summary = tool.main(args)
    elapsed = time.perf_counter() - start
    assert summary["splits"] == {"train": 40, "val": 10, "train_aug": 50, "trainval": 50}
    assert 1.2 < summary["objects_per_image"] < 2.5
    assert elapsed < 6.0  # the budget is 500 images in 20 s on one core; 60 here, with slack for a busy machine
