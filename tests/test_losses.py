"""Numbers for core/losses.py: label smoothing, multilabel soft margin, Puzzle reconstruction loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.losses import multilabel_soft_margin, reconstruction_loss, smooth_labels


def test_smooth_labels_binary_convention():
    y = torch.tensor([[1.0, 0.0, 0.5]])
    assert torch.allclose(smooth_labels(y, 0.1), torch.tensor([[0.95, 0.05, 0.5]]))
    assert smooth_labels(y, 0.0) is y
    with pytest.raises(ValueError):
        smooth_labels(y, 1.5)


def test_mlsm_matches_torch_without_smoothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g) * 3
    targets = (torch.rand(5, 7, generator=g) > 0.6).float()
    ours = multilabel_soft_margin(logits, targets)
    assert torch.allclose(ours, F.multilabel_soft_margin_loss(logits, targets), atol=1e-6)


def test_mlsm_class_weight_matches_torch_weight():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=g)
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]])
    weight = torch.tensor([0.5, 2.0, 1.0])
    ours = multilabel_soft_margin(logits, targets, class_weight=weight)
    theirs = F.multilabel_soft_margin_loss(logits, targets, weight=weight)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, multilabel_soft_margin(logits, targets), atol=1e-3)


def test_mlsm_hand_value_with_smoothing():
    # targets [1, 0] smoothed by 0.1 -> [0.95, 0.05]; logits [0, 2]
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0]])
    log_sig = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
    class0 = math.log(2.0)  # sigmoid(0) = 0.5 whatever the target
    class1 = -(0.05 * log_sig(2.0) + 0.95 * log_sig(-2.0))
    expected = (class0 + class1) / 2  # = 1.36004 (0.693147 + 2.026928) / 2
    value = multilabel_soft_margin(logits, targets, label_smoothing=0.1)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    assert value.item() == pytest.approx(1.3600375, abs=1e-5)


def _one_sample_maps():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # [1, 2, 2, 2]
    merged = torch.tensor([[[[0.0, 2.0], [3.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]]]])
    return maps, merged


@pytest.mark.parametrize(
    ("kind", "option", "labels", "expected"),
    [
        ("l1", "masked", [1.0, 0.0], 4 / 8),  # |1|+|3| on class 0, class 1 masked, mean over all 8 entries
        ("l2", "masked", [1.0, 0.0], 10 / 8),  # 1 + 9
        ("l1", "masked", [0.5, 0.0], 0.5 * 4 / 8),  # soft labels weigh the entries
        ("l1", "selection", [1.0, 0.0], 4 / 4),  # mean over the present class's 4 entries only
        ("l1", "none", [1.0, 0.0], (4 + 20) / 8),  # no class mask
        ("L1_Loss", "masking", [1.0, 0.0], 4 / 8),  # reference spellings
    ],
)
def test_reconstruction_loss_hand_values(kind, option, labels, expected):
    maps, merged = _one_sample_maps()
    value = reconstruction_loss(maps, merged, torch.tensor([labels]), kind=kind, option=option)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_reconstruction_loss_zero_for_identical_maps_and_absent_classes():
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(3, 4, 5, 5, generator=g)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert reconstruction_loss(maps, maps.clone(), labels).item() == 0.0
    perturbed = maps.clone()
    perturbed[0, 1] += 10.0  # absent class of sample 0
    perturbed[1, 0] -= 3.0  # absent class of sample 1
    assert reconstruction_loss(maps, perturbed, labels).item() == 0.0
    assert reconstruction_loss(maps, perturbed, labels, option="selection").item() == 0.0
    assert reconstruction_loss(maps, perturbed, labels, option="none").item() > 0.0


def test_reconstruction_selection_sample_without_labels_contributes_zero():
    maps, merged = _one_sample_maps()
    maps2 = torch.cat([maps, maps])
    merged2 = torch.cat([merged, merged])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    value = reconstruction_loss(maps2, merged2, labels, option="selection")
    assert value.item() == pytest.approx((1.0 + 0.0) / 2)


def test_reconstruction_loss_rejects_mismatched_shapes_and_names():
    maps = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="divisible"):
        reconstruction_loss(maps, torch.zeros(1, 2, 4, 6), torch.ones(1, 2))
    with pytest.raises(ValueError):
        reconstruction_loss(maps, maps, torch.ones(1, 2), kind="huber")
    with pytest.raises(ValueError):
        reconstruction_loss(maps, maps, torch.ones(1, 2), option="everything")
