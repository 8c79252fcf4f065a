"""Dense CRF refinement of core/crf.py on a synthetic image with sharp edges."""

import sys

import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf")

from core.crf import crf_inference_labels, crf_inference_probs, crf_refine_label_map, describe_crf  # noqa: E402
from core.errors import WSSSError  # noqa: E402

SIZE = 64


def _scene(seed=0):
    """A bright square on a dark background (sharp edges, mild noise) and its true mask."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((SIZE, SIZE), dtype=np.int64)
    truth[16:48, 20:52] = 1
    image = np.where(truth[..., None] == 1, 200, 40) + rng.normal(0, 6, (SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8), truth


def _iou(pred, truth, cls=1):
    inter = np.logical_and(pred == cls, truth == cls).sum()
    return inter / np.logical_or(pred == cls, truth == cls).sum()


def _blurred_probs(truth):
    """A soft, spatially blurred 2-class probability map whose 0.5 level overshoots the square by ~6 px."""
    grid = np.arange(SIZE)
    inside_rows = np.clip(np.minimum(grid - 10, 53 - grid) / 6.0, 0, 1)  # ramps over 6 px around a grown square
    inside_cols = np.clip(np.minimum(grid - 14, 57 - grid) / 6.0, 0, 1)
    fg = np.outer(inside_rows, inside_cols).astype(np.float32) * 0.9 + 0.05
    return np.stack([1 - fg, fg])


def test_label_crf_repairs_a_noisy_mask():
    image, truth = _scene()
    rng = np.random.default_rng(1)
    noisy = np.where(rng.random(truth.shape) < 0.2, 1 - truth, truth)  # 20 % of the pixels flipped
    refined = crf_inference_labels(image, noisy, n_labels=2, t=10, gt_prob=0.7)
    assert refined.shape == truth.shape and set(np.unique(refined)) <= {0, 1}
    before, after = _iou(noisy, truth), _iou(refined, truth)
    assert before < 0.6 and after > 0.95  # about 0.49 -> 1.0


def test_probability_crf_snaps_a_blurred_map_to_the_edges():
    image, truth = _scene()
    probs = _blurred_probs(truth)
    marginals = crf_inference_probs(image, probs, t=10)
    assert marginals.shape == probs.shape and marginals.dtype == np.float32
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-4)
    before, after = _iou(probs.argmax(0), truth), _iou(marginals.argmax(0), truth)
    assert before < 0.85 and after > 0.95  # about 0.79 -> 1.0


def test_read_only_images_are_accepted():
    # np.asarray(PIL image) is read-only; pydensecrf's memoryview refuses such buffers unless the image is copied.
    image, truth = _scene()
    image.flags.writeable = False
    refined = crf_inference_labels(image, truth, n_labels=2, t=2, gt_prob=0.7)
    assert _iou(refined, truth) > 0.95


def test_refine_label_map_keeps_the_class_ids():
    image, truth = _scene()
    rng = np.random.default_rng(2)
    ids = np.where(truth == 1, 15, 0).astype(np.uint8)
    ids[rng.random(ids.shape) < 0.1] = 255
    refined = crf_refine_label_map(image, ids, t=5)
    assert refined.dtype == np.uint8 and set(np.unique(refined)) <= {0, 15, 255}
    assert _iou(refined, np.where(truth == 1, 15, 0), cls=15) > _iou(ids, np.where(truth == 1, 15, 0), cls=15)
    single = crf_refine_label_map(image, np.zeros_like(ids), t=2)  # one id: n_labels is padded to 2, ids kept
    assert set(np.unique(single)) == {0}


def test_parameters_are_checked():
    image, truth = _scene()
    with pytest.raises(ValueError, match="gt_prob"):
        crf_inference_labels(image, truth, 2, gt_prob=1.0)
    with pytest.raises(ValueError, match="0..1"):
        crf_inference_labels(image, truth + 1, 2)
    with pytest.raises(ValueError, match="RGB"):
        crf_inference_labels(image[:10], truth, 2)
    assert describe_crf(0, 0.7, False) == "off"
    assert describe_crf(10, 0.7, False).startswith("label CRF t=10 gt_prob=0.7")
    assert describe_crf(10, 1.0, True).startswith("DeepLab-v2 softmax CRF t=10")


def test_missing_pydensecrf_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # makes the import fail
    image, truth = _scene()
    with pytest.raises(WSSSError, match="pip install pydensecrf2") as info:
        crf_inference_labels(image, truth, 2)
    assert "\n" not in str(info.value)
