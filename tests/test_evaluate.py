"""scripts/evaluate.py and core/evaluation.py end to end on the synthetic VOC tree, plus the worker pool."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from core import cli
from core.artifacts import cam_path, save_cam, save_label_map, save_saliency, strided_size
from core.datasets import build_source
from core.errors import WSSSError
from core.evaluation import evaluate_predictions, labelled_pixel_scores, threshold_range
from core.parallel import WorkerError, chunked, parallel_map
from scripts import evaluate


@pytest.fixture(scope="module")
def perfect_dir(synthetic_voc, tmp_path_factory, perfect_cams):
    return perfect_cams(build_source("voc12", synthetic_voc, "train"), tmp_path_factory.mktemp("perfect"))


def _flags(data_dir, pred_dir, *extra):
    return ["--dataset", "voc12", "--data_dir", str(data_dir), "--domain", "train", "--pred_dir", str(pred_dir), *extra]


def test_threshold_range_has_no_float_step_drift():
    values = threshold_range(0.05, 0.80, 0.05)
    assert len(values) == 16 and values[0] == 0.05 and values[-1] == 0.8 and values[2] == 0.15
    assert threshold_range(0.25, 0.35, 0.05) == [0.25, 0.3, 0.35]
    with pytest.raises(WSSSError):
        threshold_range(0.5, 0.1, 0.05)


def test_perfect_cams_reach_100_miou_and_write_json(synthetic_voc, perfect_dir, tmp_path):
    out = tmp_path / "report" / "eval.json"
    flags = _flags(synthetic_voc, perfect_dir, "--num_workers", "2", "--json", str(out))
    args = evaluate.get_args_parser().parse_args(flags)
    summary = evaluate.main(args)
    assert summary["miou"] == 100.0 and summary["fp"] == 0.0 and summary["fn"] == 0.0
    assert summary["threshold"] == 0.05  # the first of the 16 ties
    assert len(summary["sweep"]) == 16 and all(s["miou"] == 100.0 for s in summary["sweep"])
    stored = json.loads(out.read_text())
    assert set(stored) >= {"miou", "iou", "threshold", "fp", "fn", "precision", "recall", "protocol"}
    assert stored["iou"]["aeroplane"] == 100.0 and stored["iou"]["tvmonitor"] is None  # absent class: null
    protocol = stored["protocol"]
    assert protocol["dataset"] == "voc12" and protocol["domain"] == "train" and protocol["num_images"] == 24
    assert protocol["crf"] == "off" and "GT" in protocol["threshold_chosen_on"]
    assert "tvmonitor" in protocol["classes_left_out"] and "aeroplane" not in protocol["classes_left_out"]


def test_threshold_choice_on_damped_cams(synthetic_voc, tmp_path):
    # CAMs at 0.42 on the object and 0.2 on a background band: only thresholds in [0.2, 0.42) are perfect.
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids:
        gt = source.read_mask(image_id)
        keys = np.array([c for c in np.unique(gt) if 0 < c < 255], dtype=np.int64)
        hr_cam = np.stack([np.where(gt == k, 0.42, np.where(gt == 0, 0.2, 0.0)) for k in keys]).astype(np.float32)
        h, w = strided_size(*gt.shape)
        save_cam(cam_path(tmp_path, image_id), keys, hr_cam[:, ::4, ::4][:, :h, :w], hr_cam)
    result = evaluate_predictions(source, tmp_path, "npy", threshold_range(0.05, 0.5, 0.05))
    mious = [r["miou"] for r in result.results]
    assert mious[3:8] == [100.0] * 5  # 0.20 (ties go to background) .. 0.40
    assert all(m < 100.0 for m in mious[:3] + mious[8:])
    assert result.results[result.best]["threshold"] == 0.2


def test_missing_predictions_fail_before_any_work(synthetic_voc, perfect_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids[3:]:
        (partial / f"{image_id}.npz").write_bytes((perfect_dir / f"{image_id}.npz").read_bytes())
    with pytest.raises(SystemExit) as info:
        cli.run(evaluate.main, evaluate.get_args_parser(), _flags(synthetic_voc, partial))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    first = ", ".join(source.ids[:3])
    expected = f"3 of 24 predictions missing in {partial} (first: {first}); run inference for domain train first"
    assert err == f"error: {expected}"


def test_cam_of_another_size_names_the_file_and_both_sizes(synthetic_voc, perfect_dir, tmp_path):
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids:
        (tmp_path / f"{image_id}.npz").write_bytes((perfect_dir / f"{image_id}.npz").read_bytes())
    odd = source.ids[5]
    save_cam(tmp_path / f"{odd}.npz", [1], np.zeros((1, 8, 12)), np.zeros((1, 32, 48)))
    with pytest.raises(WSSSError) as info:
        evaluate_predictions(source, tmp_path, "npy", [0.2], num_workers=2)
    message = str(info.value)
    assert f"{odd}.npz" in message and "32x48" in message and "64x64" in message and "\n" not in message


def test_legacy_npy_needs_allow_pickle(synthetic_voc, perfect_dir, tmp_path):
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids:
        with np.load(perfect_dir / f"{image_id}.npz") as data:
            legacy = {"keys": np.concatenate([[0], data["keys"]]), "cam": data["cam"], "hr_cam": data["hr_cam"]}
        np.save(tmp_path / f"{image_id}.npy", legacy, allow_pickle=True)
    with pytest.raises(WSSSError, match="--allow_pickle"):
        evaluate_predictions(source, tmp_path, "npy", [0.2])
    assert evaluate_predictions(source, tmp_path, "npy", [0.2], allow_pickle=True).results[0]["miou"] == 100.0


def test_png_and_saliency_modes_on_ground_truth(synthetic_voc, tmp_path):
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids:
        gt = source.read_mask(image_id)
        save_label_map(tmp_path / "png" / f"{image_id}.png", gt)
        save_saliency(tmp_path / "sal" / f"{image_id}.png", ((gt > 0) & (gt < 255)).astype(np.float32))
    png = evaluate_predictions(source, tmp_path / "png", "png")
    assert png.results[0]["miou"] == 100.0 and png.results[0]["threshold"] is None
    saliency = evaluate_predictions(source, tmp_path / "sal", "saliency", [0.3, 0.5])
    assert saliency.class_names == ["background", "foreground"]
    assert [r["miou"] for r in saliency.results] == [100.0, 100.0]


def test_saliency_background_for_cams(synthetic_voc, perfect_dir, tmp_path):
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids:
        save_saliency(tmp_path / f"{image_id}.png", np.zeros(source.read_mask(image_id).shape, np.float32))
    # Saliency 0 everywhere -> background score 1 beats every CAM (ties to background): all background.
    result = evaluate_predictions(source, perfect_dir, "npy", [0.1, 0.2], sal_dir=tmp_path)
    assert len(result.results) == 1 and result.results[0]["threshold"] is None
    assert result.results[0]["iou"]["aeroplane"] == 0.0 and result.results[0]["recall"]["background"] == 100.0


@pytest.mark.parametrize("crf_gt_prob", [0.7, 1.0])
def test_crf_is_applied_to_each_prediction_before_scoring(synthetic_voc, perfect_dir, crf_gt_prob):
    pytest.importorskip("pydensecrf.densecrf")
    from core.crf import crf_inference_labels, crf_inference_probs
    from core.metrics import confusion_matrix

    source, threshold = build_source("voc12", synthetic_voc, "train"), 0.3
    ids = source.ids[:6]
    result = evaluate_predictions(source, perfect_dir, "npy", [threshold], crf_t=3, crf_gt_prob=crf_gt_prob, ids=ids)
    expected = np.zeros((21, 21), dtype=np.int64)
    for image_id in ids:  # the same decoding written out: [threshold, cams] -> CRF -> keys
        gt, image = source.read_mask(image_id), source.read_image(image_id)
        with np.load(perfect_dir / f"{image_id}.npz") as data:
            keys, hr_cam = data["keys"], data["hr_cam"]
        planes = np.concatenate([np.full((1, *gt.shape), threshold, np.float32), hr_cam])
        if crf_gt_prob < 1:
            compact = crf_inference_labels(image, planes.argmax(0), max(len(keys) + 1, 2), t=3, gt_prob=crf_gt_prob)
        else:
            compact = crf_inference_probs(image, planes, t=3).argmax(0)
        expected += confusion_matrix(gt, np.concatenate([[0], keys])[compact], 21)
    np.testing.assert_array_equal(result.confusion[0], expected)
    assert 50.0 < result.results[0]["miou"] < 100.0  # the CRF changed the perfect maps, not beyond recognition
    assert result.protocol["crf"].startswith("label CRF t=3" if crf_gt_prob < 1 else "DeepLab-v2 softmax CRF t=3")


class TinySource:
    """One 1x6 image, classes background/cat/dog: enough to count the pred_ignore policies by hand."""

    name, domain, classes, ids = "tiny", "train", ["background", "cat", "dog"], ["only"]

    def read_mask(self, image_id):
        return np.array([[0, 0, 1, 1, 2, 255]], dtype=np.uint8)

    def mask_path(self, image_id):
        return "tiny/only.png"


@pytest.mark.parametrize(
    "policy, expected",
    [
        # GT 0 0 1 1 2 (255 ignored), prediction 0 255 1 255 2 (1).
        ("miss", {"background": 50.0, "cat": 50.0, "dog": 100.0}),  # T = 2, 2, 1; P = 1, 1, 1; TP = 1, 1, 1
        ("background", {"background": 100 * 2 / 3, "cat": 50.0, "dog": 100.0}),  # bg: T 2, P 3, TP 2
        ("exclude", {"background": 100.0, "cat": 100.0, "dog": 100.0}),  # the two 255 pixels are not scored
    ],
)
def test_pred_ignore_policies_by_hand(tmp_path, policy, expected):
    save_label_map(tmp_path / "only.png", np.array([[0, 255, 1, 255, 2, 1]], dtype=np.uint8))
    result = evaluate_predictions(TinySource(), tmp_path, "png", pred_ignore=policy)
    best = result.results[0]
    assert best["iou"] == pytest.approx(expected)
    assert best["miou"] == pytest.approx(sum(expected.values()) / 3)
    assert result.protocol["pred_ignore"] == policy
    summary = result.summary()
    if policy == "miss":  # 5 scored pixels, 3 labelled, all 3 right
        assert summary["labelled"] == pytest.approx(60.0) and summary["labelled_accuracy"] == pytest.approx(100.0)
    else:
        assert "labelled" not in summary


def test_labelled_pixel_scores_count_the_void_column_by_hand():
    # GT rows bg/cat, predictions bg/cat/255: 10 pixels, 2 unlabelled, 6 of the 8 labelled right.
    confusion = np.array([[4, 1, 1], [1, 2, 1]])
    assert labelled_pixel_scores(confusion) == pytest.approx({"labelled": 80.0, "labelled_accuracy": 75.0})
    assert np.isnan(labelled_pixel_scores(np.array([[0, 0, 3]]))["labelled_accuracy"])  # nothing labelled


def _fail_on_three(x):
    if x == 3:
        raise KeyError("three")
    if x == 5:
        raise WSSSError("bad input file five.png; replace it")
    return x * x


def test_parallel_map_keeps_order_and_reports_the_failing_item():
    assert parallel_map(_fail_on_three, [0, 1, 2, 4], num_workers=2) == [0, 1, 4, 16]
    with pytest.raises(WorkerError, match=r"square: failed on 3: KeyError") as info:
        parallel_map(_fail_on_three, range(8), num_workers=2, desc="square")
    assert "Traceback" in str(info.value)  # the worker's traceback travels with the error
    with pytest.raises(WSSSError, match=r"^bad input file five.png; replace it$"):
        parallel_map(_fail_on_three, [5, 6], num_workers=2)
    with pytest.raises(WorkerError, match="failed on 3"):
        parallel_map(_fail_on_three, [1, 3], num_workers=1)
    assert chunked(list(range(5)), 3) == [[0, 1], [2, 3], [4]] and chunked([1], 4) == [[1]]


def _die_on_two(x):
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_parallel_map_reports_a_killed_worker_instead_of_hanging():
    with pytest.raises(WorkerError, match="worker process died"):
        parallel_map(_die_on_two, range(4), num_workers=2, desc="die")


def test_corrupt_file_in_a_worker_names_the_file(synthetic_voc, perfect_dir, tmp_path):
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids:
        (tmp_path / f"{image_id}.npz").write_bytes((perfect_dir / f"{image_id}.npz").read_bytes())
    broken = tmp_path / f"{source.ids[-1]}.npz"
    broken.write_bytes(b"garbage")
    with pytest.raises(WSSSError, match=f"cannot read CAM file {broken}"):
        evaluate_predictions(source, tmp_path, "npy", [0.2], num_workers=2)
