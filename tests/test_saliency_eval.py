"""Saliency evaluation (MAE, F-beta, fg/bg IoU, the oracle, saliency as background) and the C²AM CRF step
(scripts/ccam/inference_crf.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import cli
from core.artifacts import cam_path, save_cam, save_label_map, save_saliency, strided_size
from core.datasets import VOC_CLASSES, build_source
from core.errors import WSSSError
from core.evaluation import evaluate_predictions, oracle_labels
from core.labels import IGNORE_INDEX
from core.metrics import SaliencyScores
from scripts import evaluate
from scripts.ccam import inference_crf
from tools import summarize_results


def salient(gt: np.ndarray) -> np.ndarray:
    """float32 1 on the GT classes, 0 on background and ignore."""
    return ((gt > 0) & (gt != IGNORE_INDEX)).astype(np.float32)


def save_one_plane(folder: Path, image_id: str, saliency: np.ndarray) -> None:
    """A C²AM-style CAM file: keys [1], one foreground plane."""
    h, w = strided_size(*saliency.shape)
    save_cam(cam_path(folder, image_id), [1], saliency[None, ::4, ::4][:, :h, :w], saliency[None])


@pytest.fixture(scope="module")
def voc(synthetic_voc):
    return build_source("voc12", synthetic_voc, "train")


@pytest.fixture(scope="module")
def perfect_saliency(voc, tmp_path_factory):
    """The GT foreground as saliency PNGs and as one-plane CAM files."""
    root = tmp_path_factory.mktemp("perfect_saliency")
    for image_id in voc.ids:
        saliency = salient(voc.read_mask(image_id))
        save_saliency(root / "png" / f"{image_id}.png", saliency)
        save_one_plane(root / "cams", image_id, saliency)
    return root


# --------------------------------------------------------------------------------------------------------------------
# MAE and F-beta by hand
# --------------------------------------------------------------------------------------------------------------------


def test_mae_and_fbeta_on_hand_made_maps():
    # 4 scored pixels (one more is ignored): GT salient = first two.
    gt = np.array([[1, 1, 0, 0, IGNORE_INDEX]], dtype=np.uint8)
    saliency = np.array([[1.0, 0.6, 0.6, 0.0, 1.0]], dtype=np.float32)
    scores = SaliencyScores()
    scores.add(saliency, gt)
    result = scores.scores()
    assert result["mae"] == pytest.approx((0 + 0.4 + 0.6 + 0) / 4)
    # Levels: 255, 153, 153, 0. At k in 1..153: P 3, TP 2 -> p 2/3, r 1; at k in 154..255: p 1, r 1/2.
    f_low = 1.3 * (2 / 3) * 1 / (0.3 * (2 / 3) + 1)  # 0.7222
    f_high = 1.3 * 1 * 0.5 / (0.3 * 1 + 0.5)  # 0.8125
    assert result["max_fbeta"] == pytest.approx(max(f_low, f_high))
    assert result["fbeta_threshold"] == pytest.approx(154 / 255)
    assert (result["precision"], result["recall"]) == (pytest.approx(1.0), pytest.approx(0.5))

    # A second image averages per image; an image without salient GT counts for MAE only.
    other = SaliencyScores()
    other.add(np.array([[0.0, 1.0]], np.float32), np.array([[1, 0]], np.uint8))  # MAE 1, p 0, r 0 at k >= 1
    other.add(np.array([[0.5, 0.5]], np.float32), np.array([[0, 0]], np.uint8))  # MAE 0.5, no curve
    merged = scores.merge(other).scores()
    assert merged["images"] == 3 and merged["images_with_foreground"] == 2
    assert merged["mae"] == pytest.approx((0.25 + 1 + 0.5) / 3)
    # Mean curve at k in 154..255: p (1 + 0) / 2, r (0.5 + 0) / 2; at 1..153: p 1/3, r 1/2; at 0: p (0.5+0.5)/2, r 1
    candidates = [(0.5, 0.25), (1 / 3, 0.5), (0.5, 1.0)]
    expected = max(1.3 * p * r / (0.3 * p + r) for p, r in candidates)
    assert merged["max_fbeta"] == pytest.approx(expected)


def test_perfect_binary_map_scores_zero_mae_and_unit_fbeta():
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 3:7] = 4
    scores = SaliencyScores()
    scores.add(salient(gt), gt)
    result = scores.scores()
    assert result["mae"] == 0.0 and result["max_fbeta"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------------
# scripts/evaluate.py --mode saliency
# --------------------------------------------------------------------------------------------------------------------


def _eval_flags(data_dir, pred_dir, *extra):
    return ["--dataset", "voc12", "--data_dir", str(data_dir), "--domain", "train", "--pred_dir", str(pred_dir), *extra]


@pytest.mark.parametrize("kind", ["png", "cams"])
def test_perfect_saliency_gives_100_iou_for_pngs_and_one_plane_cams(kind, synthetic_voc, perfect_saliency, tmp_path):
    out = tmp_path / "sal.json"
    argv = _eval_flags(synthetic_voc, perfect_saliency / kind, "--mode", "saliency", "--json", str(out))
    summary = evaluate.main(evaluate.get_args_parser().parse_args(argv + ["--num_workers", "2"]))
    assert summary["miou"] == 100.0 and summary["iou"] == {"background": 100.0, "foreground": 100.0}
    assert len(summary["sweep"]) == 16 and all(s["miou"] == 100.0 for s in summary["sweep"])
    assert summary["mae"] == 0.0 and summary["max_fbeta"] == pytest.approx(1.0)
    stored = json.loads(out.read_text())
    protocol = stored["protocol"]
    assert stored["uses_saliency"] and protocol["saliency"].startswith("evaluated")
    assert protocol["eval_mode"].startswith("saliency") and protocol["sal_dir"] is None
    assert protocol["inputs"].startswith("CAM files" if kind == "cams" else "saliency PNGs")


def test_saliency_mode_reads_class_cams_as_their_max(voc, perfect_cams, tmp_path):
    # Multi-class perfect CAMs are a perfect class-agnostic map too (foreground = max over the class maps).
    perfect_cams(voc, tmp_path)
    result = evaluate_predictions(voc, tmp_path, "saliency", [0.3])
    assert result.results[0]["miou"] == 100.0 and result.saliency["mae"] == 0.0


def test_oracle_gives_100_miou_for_perfect_saliency(voc, perfect_saliency):
    result = evaluate_predictions(voc, perfect_saliency / "png", "saliency", [0.2, 0.5], eval_mode="segmentation")
    assert result.class_names == list(voc.classes)
    assert [r["miou"] for r in result.results] == [100.0, 100.0]
    assert result.protocol["eval_mode"].startswith("segmentation (oracle")


def test_oracle_labels_by_hand():
    gt = np.array([[0, 3, 3, 7], [0, 0, IGNORE_INDEX, 7]], dtype=np.uint8)
    foreground = np.array([[True, True, False, True], [False, True, True, False]])
    # False positives take the lowest class of the image (3); salient ignored pixels do not matter.
    np.testing.assert_array_equal(oracle_labels(foreground, gt), [[3, 3, 0, 7], [0, 3, 3, 0]])
    # Without any class, a false positive matches no class (255 -> the void column, a miss of the background).
    np.testing.assert_array_equal(oracle_labels(foreground[:, :2], np.zeros((2, 2), np.uint8)), [[255, 255], [0, 255]])


def test_oracle_counts_false_positives_against_a_class(voc, tmp_path):
    # Everything salient: background pixels become the image's lowest class, so background IoU is 0.
    for image_id in voc.ids:
        save_saliency(tmp_path / f"{image_id}.png", np.ones(voc.read_mask(image_id).shape, np.float32))
    result = evaluate_predictions(voc, tmp_path, "saliency", [0.5], eval_mode="segmentation")
    assert result.results[0]["iou"]["background"] == 0.0 and result.results[0]["recall"]["aeroplane"] == 100.0


class TinySource:
    """Two 2x2 images: ``a`` has no class, ``b`` has cat (1) and dog (2)."""

    name = domain = "tiny"
    ids = ["a", "b"]
    classes = ["background", "cat", "dog"]

    def read_mask(self, image_id):
        return np.zeros((2, 2), np.uint8) if image_id == "a" else np.array([[0, 1], [2, 2]], np.uint8)


def test_oracle_false_positives_in_an_image_without_class_are_misses(tmp_path):
    for image_id in TinySource.ids:
        save_saliency(tmp_path / f"{image_id}.png", np.ones((2, 2), np.float32))
    result = evaluate_predictions(TinySource(), tmp_path, "saliency", [0.5], eval_mode="segmentation")
    # a: 4 background pixels predicted salient, no class to give them -> counted in no class (background misses).
    # b: its background pixel takes cat (the lowest class), the rest is right.
    iou = result.results[0]["iou"]
    assert iou == {"background": 0.0, "cat": 50.0, "dog": 100.0} and result.results[0]["miou"] == 50.0
    assert result.results[0]["recall"]["background"] == 0.0 and result.confusion.shape == (1, 3, 4)


def test_thresholded_saliency_background_for_cams(voc, perfect_cams, tmp_path, synthetic_voc):
    cams = perfect_cams(voc, tmp_path / "cams")
    for image_id in voc.ids:  # saliency 0.6 on the objects and 0.4 elsewhere
        sal = np.where(salient(voc.read_mask(image_id)) > 0, 0.6, 0.4).astype(np.float32)
        save_saliency(tmp_path / "sal" / f"{image_id}.png", sal)
    # 1 - s: background 0.4 on objects (CAM 1 wins) and 0.6 elsewhere (CAM 0 loses): perfect.
    soft = evaluate_predictions(voc, cams, "npy", [0.3], sal_dir=tmp_path / "sal")
    assert soft.results[0]["miou"] == 100.0
    # s < 0.5 -> background 1 off the objects, 0 on them: perfect; s < 0.7 -> background 1 everywhere: all background.
    hard = evaluate_predictions(voc, cams, "npy", [0.3], sal_dir=tmp_path / "sal", sal_threshold=0.5)
    assert hard.results[0]["miou"] == 100.0
    none = evaluate_predictions(voc, cams, "npy", [0.3], sal_dir=tmp_path / "sal", sal_threshold=0.7)
    assert none.results[0]["iou"]["aeroplane"] == 0.0
    assert none.protocol["saliency"].startswith(f"background = 1 where s < 0.7, else 0 (s = PNG / 255) from {tmp_path}")
    argv = _eval_flags(synthetic_voc, cams, "--sal_dir", str(tmp_path / "sal"), "--sal_threshold", "0.5")
    summary = evaluate.main(evaluate.get_args_parser().parse_args(argv + ["--num_workers", "1"]))
    assert summary["uses_saliency"] and summary["protocol"]["sal_dir"] == str(tmp_path / "sal")
    plain = evaluate.main(evaluate.get_args_parser().parse_args(_eval_flags(synthetic_voc, cams, "--threshold", "0.3")))
    assert not plain["uses_saliency"] and plain["protocol"]["saliency"] == "not used"


def test_label_map_saliency_with_sal_mode_segmentation(voc, perfect_cams, tmp_path):
    cams = perfect_cams(voc, tmp_path / "cams")
    for image_id in voc.ids:
        save_label_map(tmp_path / "labels" / f"{image_id}.png", voc.read_mask(image_id))
    result = evaluate_predictions(voc, cams, "npy", [0.3], sal_dir=tmp_path / "labels", sal_mode="segmentation")
    assert result.results[0]["miou"] == 100.0


def _cli_error(main, parser, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.run(main, parser, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_saliency_pngs_are_one_line_errors(voc, synthetic_voc, perfect_saliency, tmp_path, capsys):
    folder = tmp_path / "sal"
    shutil.copytree(perfect_saliency / "png", folder)
    odd = voc.ids[4]
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / f"{odd}.png")
    argv = _eval_flags(synthetic_voc, folder, "--mode", "saliency", "--num_workers", "1")
    err = _cli_error(evaluate.main, evaluate.get_args_parser(), argv, capsys)
    assert f"{folder / odd}.png is a RGB image" in err and "single-channel" in err
    save_saliency(folder / f"{odd}.png", np.zeros((32, 48), np.float32))
    err = _cli_error(evaluate.main, evaluate.get_args_parser(), argv, capsys)
    assert f"{odd}.png" in err and "32x48" in err and "64x64" in err
    # The same checks when the PNGs are the background of CAMs.
    err = _cli_error(evaluate.main, evaluate.get_args_parser(), argv + ["--sal_dir", str(folder)], capsys)
    assert "needs --mode npy" in err  # --sal_dir gives CAMs a background
    with pytest.raises(WSSSError, match=f"{odd}.png: the saliency map is 32x48"):
        evaluate_predictions(voc, perfect_saliency / "cams", "npy", [0.3], sal_dir=folder, ids=[odd])


# --------------------------------------------------------------------------------------------------------------------
# scripts/ccam/inference_crf.py
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def ccam_setup(synthetic_voc, tmp_path, monkeypatch):
    """A custom dataset of 5 VOC ids, the third one background-only by its labels, and one-plane CAM files of the
    other four: 0.8 on the GT objects, 0.25 elsewhere."""
    monkeypatch.chdir(tmp_path)
    voc = build_source("voc12", synthetic_voc, "train")
    ids = voc.ids[:5]
    root = tmp_path / "custom"
    for folder in ("images", "masks", "lists"):
        (root / folder).mkdir(parents=True)
    for image_id in ids:
        shutil.copy(synthetic_voc / "JPEGImages" / f"{image_id}.jpg", root / "images")
        shutil.copy(synthetic_voc / "SegmentationClass" / f"{image_id}.png", root / "masks")
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    (root / "lists" / "five.txt").write_text("\n".join(ids) + "\n")
    rows = [f"{i},{'' if n == 2 else VOC_CLASSES[int(voc.label(i).argmax()) + 1]}" for n, i in enumerate(ids)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    cams = Path("experiments/predictions/ccamh@five@scale=1.0")
    maps = {}
    for n, image_id in enumerate(ids):
        maps[image_id] = np.where(salient(voc.read_mask(image_id)) > 0, 0.8, 0.25).astype(np.float32)
        if n != 2:
            save_one_plane(cams, image_id, maps[image_id])
    argv = ["--dataset", "custom", "--data_dir", str(root), "--domain", "five", "--experiment_name", cams.name]
    return ids, cams, maps, argv + ["--num_workers", "1"]


def run_crf(argv):
    return inference_crf.main(inference_crf.get_args_parser().parse_args(argv))


def test_crf_step_writes_0_255_masks_zero_maps_and_resumes(ccam_setup, caplog):
    ids, cams, maps, argv = ccam_setup
    summary = run_crf(argv + ["--threshold", "0.2", "--crf_t", "0"])
    out = Path(summary["out_dir"])
    assert out == cams.with_name(f"{cams.name}@t=0.2@crf=0")
    assert (summary["written"], summary["background_only"]) == (5, 1)
    # Threshold 0.2 < 0.25: everything is foreground except the background-only image's all-zero mask.
    for n, image_id in enumerate(ids):
        mask = np.asarray(Image.open(out / f"{image_id}.png"))
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        assert (mask == 0).all() if n == 2 else (mask == 255).all()
    summary = run_crf(argv + ["--threshold", "0.3", "--crf_t", "0"])
    mask = np.asarray(Image.open(Path(summary["out_dir"]) / f"{ids[0]}.png"))
    np.testing.assert_array_equal(mask, np.where(maps[ids[0]] > 0.3, 255, 0))
    manifest = json.loads((Path(summary["out_dir"]) / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"]["cams"]["path"] == str(cams)
    assert manifest["counts"]["background_only"] == 1

    (out / f"{ids[1]}.png").unlink()  # resume: only the missing mask is written
    summary = run_crf(argv + ["--threshold", "0.2", "--crf_t", "0"])
    assert (summary["written"], summary["skipped"]) == (1, 4)


def test_crf_step_with_crf_and_sigmoid(ccam_setup):
    pytest.importorskip("pydensecrf.densecrf")
    ids, cams, maps, argv = ccam_setup
    summary = run_crf(argv + ["--threshold", "0.3", "--crf_t", "3"])
    out = Path(summary["out_dir"])
    assert out.name.endswith("@t=0.3@crf=3")
    masks = [np.asarray(Image.open(out / f"{i}.png")) for i in ids]
    assert all(set(np.unique(m)) <= {0, 255} for m in masks) and not masks[2].any()
    # The 2-label CRF on the thresholded map, written out for one image.
    from core.crf import crf_inference_labels

    image = np.asarray(Image.open(Path(argv[3]) / "images" / f"{ids[0]}.jpg").convert("RGB"))
    expected = crf_inference_labels(image, (maps[ids[0]] > 0.3).astype(np.int64), 2, t=3, gt_prob=0.7)
    np.testing.assert_array_equal(masks[0], np.where(expected == 1, 255, 0))
    sigmoid = run_crf(argv + ["--activation", "sigmoid", "--crf_t", "0"])
    assert Path(sigmoid["out_dir"]).name.endswith("@sigmoid@crf=0")
    mask = np.asarray(Image.open(Path(sigmoid["out_dir"]) / f"{ids[0]}.png"))
    np.testing.assert_array_equal(mask, np.where(maps[ids[0]] > 0.5, 255, 0))


def test_crf_step_refuses_changed_threshold_and_bad_cam_folders(ccam_setup, capsys):
    ids, cams, maps, argv = ccam_setup
    fixed = argv + ["--crf_t", "0", "--output", "sal"]
    run_crf(fixed + ["--threshold", "0.3"])
    err = _cli_error(inference_crf.main, inference_crf.get_args_parser(), fixed + ["--threshold", "0.4"], capsys)
    assert "--threshold 0.3 -> 0.4" in err and "--overwrite true" in err
    assert len(list(Path("sal").glob("*.png"))) == 5  # nothing damaged

    (cams / f"{ids[3]}.npz").unlink()
    err = _cli_error(inference_crf.main, inference_crf.get_args_parser(), argv + ["--crf_t", "0"], capsys)
    assert f"1 of 4 CAM files missing in {cams} (first: {ids[3]})" in err and "scripts/ccam/inference.py" in err
    assert not cams.with_name(f"{cams.name}@t=0.3@crf=0").exists()
    err = _cli_error(
        inference_crf.main, inference_crf.get_args_parser(), argv + ["--experiment_name", "nowhere"], capsys
    )
    assert "CAM folder experiments/predictions/nowhere does not exist" in err
    save_cam(cam_path(cams, ids[3]), [1, 2], np.zeros((2, 16, 16)), np.zeros((2, 64, 64)))
    err = _cli_error(inference_crf.main, inference_crf.get_args_parser(), argv + ["--crf_t", "0"], capsys)
    assert f"{ids[3]}.npz holds 2 class maps" in err
    save_one_plane(cams, ids[3], np.zeros((32, 32), np.float32))
    err = _cli_error(inference_crf.main, inference_crf.get_args_parser(), argv + ["--crf_t", "0"], capsys)
    assert f"{ids[3]}.npz: hr_cam is 32x32 but image {ids[3]} is 64x64" in err


def test_saliency_mode_with_crf_and_the_oracle_with_crf(voc, perfect_saliency):
    pytest.importorskip("pydensecrf.densecrf")
    ids = voc.ids[:4]
    plain = evaluate_predictions(voc, perfect_saliency / "cams", "saliency", [0.3], crf_t=2, ids=ids)
    assert plain.results[0]["miou"] > 90 and plain.protocol["crf"].startswith("label CRF t=2")
    assert plain.saliency["mae"] == 0.0  # MAE and F-beta score the maps before the CRF
    oracle = evaluate_predictions(
        voc, perfect_saliency / "cams", "saliency", [0.3], crf_t=2, ids=ids, eval_mode="segmentation"
    )
    assert oracle.results[0]["miou"] > 90


def test_summary_table_says_whether_saliency_was_used(voc, perfect_cams, perfect_saliency, tmp_path, synthetic_voc):

    cams = perfect_cams(voc, tmp_path / "cams")
    runs = {
        "plain": _eval_flags(synthetic_voc, cams, "--threshold", "0.3"),
        "with_sal": _eval_flags(synthetic_voc, cams, "--sal_dir", str(perfect_saliency / "png")),
        "sal": _eval_flags(synthetic_voc, perfect_saliency / "png", "--mode", "saliency"),
    }
    for name, argv in runs.items():
        evaluate.main(evaluate.get_args_parser().parse_args(argv + ["--json", str(tmp_path / f"{name}.json")]))
    rows = [summarize_results.read_result(tmp_path / f"{name}.json") for name in runs]
    assert [row["saliency"] for row in rows] == ["-", "bg", "evaluated"]
    assert [row["MAE"] for row in rows] == ["-", "-", "0.0000"] and rows[2]["max F"] == "1.0000"
    assert "saliency" in summarize_results.format_table(rows).splitlines()[0]


def test_crf_output_is_evaluated_and_a_cam_folder_without_background_only_files_says_what_to_do(ccam_setup, capsys):
    ids, cams, maps, argv = ccam_setup
    out = Path(run_crf(argv + ["--threshold", "0.3", "--crf_t", "0"])["out_dir"])
    data = argv[:6]  # --dataset custom --data_dir ROOT --domain five
    summary = evaluate.main(
        evaluate.get_args_parser().parse_args(data + ["--mode", "saliency", "--pred_dir", str(out)])
    )
    assert summary["protocol"]["num_images"] == 5 and summary["iou"]["foreground"] > 50
    err = _cli_error(
        evaluate.main, evaluate.get_args_parser(), data + ["--mode", "saliency", "--pred_dir", str(cams)], capsys
    )
    assert f"1 of 5 ids have no prediction in {cams}" in err and "scripts/ccam/inference_crf.py" in err
