"""Confusion matrices, scores and the one-pass threshold sweep of core/metrics.py."""

import pickle

import numpy as np
import pytest

from core.metrics import ThresholdSweep, best_index, confusion_matrix, scores_from_confusion

NAMES = ["background", "cat", "dog", "cow"]


def _reference_prediction(cams, keys, background):
    """The reference decoding: pad a float32 background plane, argmax (ties -> first plane), map through keys."""
    cams = np.asarray(cams, dtype=np.float32)
    plane = np.broadcast_to(np.asarray(background, dtype=np.float32), cams.shape[1:])[None]
    stacked = np.concatenate([plane, cams], axis=0)
    return np.concatenate([[0], keys])[stacked.argmax(axis=0)]


def test_confusion_matrix_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    expected = np.array(
        [
            [1, 1, 0, 0],  # GT 0: one right, one predicted 1
            [1, 2, 0, 0],  # GT 1: two right, one predicted 0
            [1, 0, 1, 0],  # GT 2: one right, one predicted 0; the 255 pixel is not counted
            [0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(confusion_matrix(gt, pred, 4), expected)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(gt, np.full_like(pred, 255), 4)
    with pytest.raises(ValueError, match=r"\[7\]"):
        confusion_matrix(np.array([7, 0], np.uint8), np.array([0, 0]), 4)


def test_void_column_counts_a_predicted_255_as_a_miss():
    gt = np.array([1, 1, 0, 255], dtype=np.uint8)
    pred = np.array([255, 1, 255, 255])
    conf = confusion_matrix(gt, pred, 2, void_column=True)
    np.testing.assert_array_equal(conf, [[0, 0, 1], [0, 1, 1]])
    scores = scores_from_confusion(conf, ["background", "cat"])
    # cat: T=2, P=1, TP=1 -> IoU 1/2; background: T=1, P=0, TP=0 -> IoU 0.
    assert scores["iou"] == {"background": 0.0, "cat": 50.0}
    assert scores["recall"]["cat"] == 50.0 and scores["precision"]["cat"] == 100.0


def test_scores_by_hand_leave_out_empty_classes():
    conf = np.array(
        [
            [6, 2, 0, 0],  # background: T=8
            [1, 3, 0, 0],  # cat: T=4
            [0, 0, 0, 0],  # dog: absent from GT ...
            [0, 0, 2, 0],  # cow: T=2, all predicted dog
        ]
    )  # ... but predicted twice; the fourth class (cow) is never predicted
    scores = scores_from_confusion(conf, NAMES)
    # background: TP 6, T 8, P 7 -> 6/9; cat: TP 3, T 4, P 5 -> 3/6; dog: TP 0, union 2 -> 0; cow: union 2 -> 0.
    assert scores["iou"]["background"] == pytest.approx(100 * 6 / 9)
    assert scores["iou"]["cat"] == pytest.approx(50.0)
    assert scores["iou"]["dog"] == 0.0 and scores["iou"]["cow"] == 0.0
    assert scores["miou"] == pytest.approx(100 * (6 / 9 + 0.5) / 4)
    assert scores["miou_fg"] == pytest.approx(100 * 0.5 / 3)
    # fp_c = (P - TP) / union, fn_c = (T - TP) / union over fg classes: cat 2/6, 1/6; dog 2/2, 0; cow 0, 2/2.
    assert scores["fp"] == pytest.approx(100 * (2 / 6 + 1 + 0) / 3)
    assert scores["fn"] == pytest.approx(100 * (1 / 6 + 0 + 1) / 3)
    assert np.isnan(scores["precision"]["cow"]) and np.isnan(scores["recall"]["dog"])
    assert scores["left_out"] == [] and scores["pixels"] == 14

    absent = np.zeros((4, 4), dtype=np.int64)
    absent[0, 0], absent[1, 1] = 5, 5
    scores = scores_from_confusion(absent, NAMES)
    assert scores["miou"] == 100.0  # dog and cow have an empty union: left out, not counted as 0
    assert scores["left_out"] == ["dog", "cow"] and np.isnan(scores["iou"]["dog"])


def _random_case(rng, n, height=23, width=31, num_classes=21, quantize=True):
    keys = np.sort(rng.choice(np.arange(1, num_classes), size=n, replace=False))
    cams = rng.random((n, height, width), dtype=np.float32)
    if quantize:  # many exact ties between planes and with the thresholds (multiples of 0.05 in float32)
        cams = (np.round(cams * 20) / 20).astype(np.float32)
    gt = rng.integers(0, num_classes, size=(height, width)).astype(np.uint8)
    gt[rng.random((height, width)) < 0.1] = 255
    return cams, keys, gt


@pytest.mark.parametrize("num_planes", [0, 1, 2, 5, 16])
def test_one_pass_sweep_equals_per_threshold_evaluation(num_planes):
    rng = np.random.default_rng(num_planes)
    # Unsorted, repeated, float-step noise; 16 of them so that 16 planes need 16-bit codes (16 * 17 bins > 255).
    thresholds = [0.3, 0.05, 0.5, 0.3, 0.8, 1.0, 0.0, 0.15000000000000002, 0.1, 0.2, 0.25, 0.35, 0.4, 0.45, 0.6, 0.7]
    sweep = ThresholdSweep(21, thresholds)
    cases = [_random_case(rng, num_planes, quantize=i % 2 == 0) for i in range(4)]
    for cams, keys, gt in cases:
        sweep.add(cams, keys, gt)
    for index, threshold in enumerate(thresholds):
        expected = sum(confusion_matrix(gt, _reference_prediction(c, k, threshold), 21) for c, k, gt in cases)
        np.testing.assert_array_equal(sweep.confusion[index], expected, err_msg=f"threshold {threshold}")


def test_merge_equals_one_sweep_and_survives_pickling():
    rng = np.random.default_rng(1)
    thresholds = np.round(np.arange(16) * 0.05 + 0.05, 10)
    whole, first, second = (ThresholdSweep(21, thresholds) for _ in range(3))
    for i in range(6):
        case = _random_case(rng, 1 + i % 3)
        whole.add(*case)
        (first if i < 3 else second).add(*case)
    merged = pickle.loads(pickle.dumps(first)).merge(pickle.loads(pickle.dumps(second)))
    np.testing.assert_array_equal(merged.confusion, whole.confusion)
    with pytest.raises(ValueError):
        merged.merge(ThresholdSweep(21, [0.1]))


def test_saliency_background_is_one_prediction():
    rng = np.random.default_rng(2)
    cams, keys, gt = _random_case(rng, 3)
    bg = (np.round(rng.random(gt.shape) * 20) / 20).astype(np.float32)  # ties with the CAMs go to background
    sweep = ThresholdSweep(21, [None])
    sweep.add(cams, keys, gt, bg=bg)
    np.testing.assert_array_equal(sweep.confusion[0], confusion_matrix(gt, _reference_prediction(cams, keys, bg), 21))
    assert sweep.scores([f"c{i}" for i in range(21)])[0]["threshold"] is None
    with pytest.raises(ValueError, match="single"):
        ThresholdSweep(21, [0.1, 0.2]).add(cams, keys, gt, bg=bg)


def test_sweep_scores_pick_the_best_threshold():
    # One image: cat CAM is 0.6 on the cat and 0.3 on the background -> threshold 0.3 or above is perfect.
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    cams = np.array([[[0.3, 0.3, 0.6, 0.6]]], dtype=np.float32)
    sweep = ThresholdSweep(2, [0.1, 0.3, 0.7])
    sweep.add(cams, [1], gt)
    results = sweep.scores(["background", "cat"])
    assert [r["miou"] for r in results] == [pytest.approx(25.0), 100.0, pytest.approx(25.0)]
    assert best_index(results) == 1 and results[1]["threshold"] == 0.3


def test_sweep_rejects_bad_inputs():
    sweep = ThresholdSweep(3, [0.2])
    with pytest.raises(ValueError, match="keys"):
        sweep.add(np.zeros((1, 2, 2), np.float32), [3], np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="match"):
        sweep.add(np.zeros((1, 2, 2), np.float32), [1], np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\[5\]"):
        sweep.add(np.zeros((1, 1, 2), np.float32), [1], np.array([[5, 0]], np.uint8))
