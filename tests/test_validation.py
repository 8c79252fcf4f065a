"""End-of-epoch CAM-classifier validation on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from core.cam import validation


def test_classification_scores_are_macro_over_defined_classes():
    probs = torch.tensor([[0.9, 0.2, 0.1], [0.6, 0.7, 0.0], [0.1, 0.4, 0.3]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    counts = validation.classification_counts(probs, labels)
    # class 0: TP row 0, FP row 1, FN row 2; class 1: TP row 1; class 2: nothing at all (left out).
    assert counts.tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0]]
    scores = validation.classification_scores(counts.numpy())
    assert scores == pytest.approx({"precision": 75.0, "recall": 75.0, "f1": 75.0})


def test_normalized_cams_relu_and_per_class_max():
    cams = torch.tensor([[[[-1.0, 2.0], [4.0, 0.0]], [[-3.0, -1.0], [-2.0, -5.0]]]])
    out = validation.normalized_cams(cams, (2, 2))
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.0]]), rtol=0, atol=1e-5)
    assert torch.equal(out[0, 1], torch.zeros(2, 2))  # a map without positive evidence stays empty
    assert validation.normalized_cams(cams, (4, 6)).shape == (1, 2, 4, 6)


class FixedCams(nn.Module):
    """Returns the same logits and 2x2 CAMs for every image (C = 2 classes)."""

    def forward(self, x: torch.Tensor, with_cam: bool = False):
        cams = torch.tensor([[[0.0, 0.2], [0.6, 1.0]], [[9.0, 0.0], [0.0, 0.0]]]).expand(x.shape[0], 2, 2, 2)
        logits = torch.tensor([3.0, -3.0]).expand(x.shape[0], 2)
        return (logits, cams) if with_cam else logits


def test_cam_sweep_picks_the_hand_computed_best_threshold():
    # GT: class 1 fills the bottom row. Class 2 is not in the label, so its strong map must be left out.
    batch = {
        "image": torch.zeros(1, 3, 2, 2),
        "label": torch.tensor([[1.0, 0.0]]),
        "mask": torch.tensor([[[0, 0], [1, 1]]]),
    }
    results = validation.validate_classifier(
        FixedCams(), [batch, batch], torch.device("cpu"), ["a", "b"], [0.1, 0.5, 0.7], max_steps=1
    )
    # t=0.1 takes the 0.2 pixel as foreground, t=0.7 loses the 0.6 one; t=0.5 is exact: bg and "a" IoU 100,
    # "b" absent from GT and prediction (NaN, left out of the mean).
    assert results["threshold"] == 0.5 and results["miou"] == pytest.approx(100.0)
    assert results["precision"] == pytest.approx(100.0) and results["recall"] == pytest.approx(100.0)
    assert math.isnan(results["iou"]["b"]) and np.isclose(results["iou"]["a"], 100.0)
