"""Label splitting statistics and soft/hard erasing of core/occse.py."""

import math

import pytest
import torch

from core.cam.occse import STRATEGIES, LabelSplitter, hard_mask_images, soft_mask_images
from core.errors import WSSSError


def _random_labels(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(batch, classes, generator=g) > 0.7).float()
    labels[:3] = 0.0  # background-only / fully mixed samples
    labels[3, :] = 0.4  # soft labels below 0.5 are not "present"
    return labels


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k", [1, 2])
def test_split_never_chooses_absent_classes(strategy, k):
    splitter = LabelSplitter(20, strategy=strategy)
    splitter.focal_factor = torch.linspace(0.1, 2.0, 20)
    g = torch.Generator().manual_seed(0)
    for draw in range(40):
        labels = _random_labels(64, 20, seed=draw)
        present = labels > 0.5
        chosen, remaining = splitter.split(labels, k=k, generator=g)
        assert chosen.shape == labels.shape and chosen.dtype == labels.dtype
        assert set(chosen.unique().tolist()) <= {0.0, 1.0}
        assert not (chosen.bool() & ~present).any()
        assert torch.equal(chosen.sum(dim=1), present.sum(dim=1).clamp(max=k).float())
        assert torch.equal(remaining, (labels - chosen).clamp(min=0))
    assert chosen[:4].sum() == 0  # rows without a class > 0.5 get an all-zero choice


def test_random_strategy_is_uniform_over_present_classes():
    labels = torch.zeros(6000, 5)
    labels[:, [0, 2, 3]] = 1.0
    chosen, _ = LabelSplitter(5).split(labels, generator=torch.Generator().manual_seed(1))
    freq = chosen.mean(dim=0)
    assert torch.allclose(freq[[0, 2, 3]], torch.full((3,), 1 / 3), atol=0.03)
    assert freq[[1, 4]].sum() == 0


def test_balanced_strategy_favours_rarely_chosen_classes():
    splitter = LabelSplitter(3, strategy="balanced")
    splitter.choices = torch.tensor([1.0, 9.0, 4.0])
    labels = torch.zeros(5000, 3)
    labels[:, :2] = 1.0
    chosen, _ = splitter.split(labels, generator=torch.Generator().manual_seed(2))
    # weights 1/1 and 1/9 -> class 0 with probability 0.9
    assert chosen[:, 0].mean().item() == pytest.approx(0.9, abs=0.02)
    assert torch.equal(splitter.choices, torch.tensor([1.0, 9.0, 4.0]) + chosen.sum(dim=0))


def test_balanced_gamma_sharpens_the_preference():
    splitter = LabelSplitter(2, strategy="balanced", balanced_gamma=2.0)
    splitter.choices = torch.tensor([1.0, 3.0])
    chosen, _ = splitter.split(torch.ones(5000, 2), generator=torch.Generator().manual_seed(3))
    assert chosen[:, 0].mean().item() == pytest.approx(0.9, abs=0.02)  # 1 vs 1/9


def test_least_chosen_picks_the_least_chosen_present_class():
    splitter = LabelSplitter(4, strategy="least_chosen")
    splitter.choices = torch.tensor([5.0, 2.0, 7.0, 1.0])
    labels = torch.tensor([[1.0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    chosen, _ = splitter.split(labels)
    assert chosen.argmax(dim=1).tolist() == [1, 0, 3, 3]
    assert splitter.choices.tolist() == [6.0, 3.0, 7.0, 3.0]


def test_least_chosen_breaks_ties_at_random():
    splitter = LabelSplitter(2, strategy="least_chosen")
    chosen, _ = splitter.split(torch.ones(4000, 2), generator=torch.Generator().manual_seed(4))
    assert chosen[:, 0].mean().item() == pytest.approx(0.5, abs=0.03)


def test_focal_strategy_samples_proportionally_to_the_focal_factor():
    splitter = LabelSplitter(3, strategy="focal")
    splitter.focal_factor = torch.tensor([1.0, 3.0, 100.0])
    labels = torch.zeros(6000, 3)
    labels[:, :2] = 1.0
    chosen, _ = splitter.split(labels, generator=torch.Generator().manual_seed(5))
    assert chosen[:, 1].mean().item() == pytest.approx(0.75, abs=0.02)
    assert chosen[:, 2].sum() == 0


def test_split_is_reproducible_with_a_generator():
    labels = _random_labels(32, 10, seed=7)
    a, _ = LabelSplitter(10).split(labels, generator=torch.Generator().manual_seed(9))
    b, _ = LabelSplitter(10).split(labels, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_update_focal_hand_values():
    splitter = LabelSplitter(3)
    logits = torch.tensor([[2.0, -1.0, 5.0]])
    remaining = torch.tensor([[0.0, 1.0, 0.0]])
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    # class 0 was erased (target 0): p_t = 1 - sigmoid(2); class 1 kept (target 1): p_t = sigmoid(-1)
    expected0 = 0.9 + 0.1 * (1 - (1 - sig(2.0))) ** 2  # 0.977580
    expected1 = 0.9 + 0.1 * (1 - sig(-1.0)) ** 2  # 0.953452
    factor = splitter.update_focal(logits, remaining, labels)
    assert factor.tolist() == pytest.approx([expected0, expected1, 1.0], abs=1e-6)
    assert factor[0].item() == pytest.approx(0.977580, abs=1e-5)


def test_update_focal_divides_by_the_samples_holding_each_class():
    splitter = LabelSplitter(2, focal_momentum=0.0, focal_gamma=1.0)
    logits = torch.zeros(4, 2)  # p_t = 0.5 everywhere -> per-sample factor 0.5
    labels = torch.tensor([[1.0, 0], [1, 0], [1, 1], [0, 0]])
    factor = splitter.update_focal(logits, torch.zeros(4, 2), labels)
    # class 0: 4 samples * 0.5 / 3 holders; class 1: 4 * 0.5 / 1
    assert factor.tolist() == pytest.approx([2.0 / 3.0, 2.0])


def test_update_focal_without_labels_uses_the_last_split():
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    logits = torch.tensor([[0.3, -2.0, 1.0], [1.5, 0.2, -0.7]])
    splitter = LabelSplitter(3)
    _, remaining = splitter.split(labels, generator=torch.Generator().manual_seed(0))
    reference = LabelSplitter(3)
    assert torch.allclose(splitter.update_focal(logits, remaining), reference.update_focal(logits, remaining, labels))


def test_state_round_trip_and_mismatch():
    splitter = LabelSplitter(6, strategy="balanced")
    g = torch.Generator().manual_seed(3)
    for seed in range(5):
        labels = _random_labels(16, 6, seed)
        _, remaining = splitter.split(labels, generator=g)
        splitter.update_focal(torch.randn(16, 6, generator=g), remaining, labels)
    state = splitter.state_dict()
    restored = LabelSplitter(6, strategy="balanced")
    restored.load_state_dict(state)
    assert torch.equal(restored.choices, splitter.choices) and torch.equal(restored.focal_factor, splitter.focal_factor)
    assert splitter.choices.sum() > 6  # the counters moved, so the round trip is not trivial
    labels = _random_labels(16, 6, seed=99)
    a, _ = splitter.split(labels, generator=torch.Generator().manual_seed(1))
    b, _ = restored.split(labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(WSSSError, match="same dataset"):
        LabelSplitter(20).load_state_dict(state)


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="least_chosen"):
        LabelSplitter(3, strategy="greedy")


def _mask_inputs():
    images = torch.rand(3, 3, 16, 16) + 0.5
    maps = torch.zeros(3, 2, 4, 4)
    maps[0, 1, :, 2:] = 1.0  # sample 0, chosen class 1: right half active
    maps[0, 0] = 50.0  # not chosen: must be ignored
    maps[1, 0, 1:3, 1:3] = 4.0  # sample 1, chosen class 0: the batch maximum
    maps[1, 0, 0, 0] = -3.0  # negative values are cut by ReLU
    maps[2] = 7.0  # sample 2 has no chosen class
    chosen = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    return images, maps, chosen


def test_soft_mask_global_normalisation():
    images, maps, chosen = _mask_inputs()
    maps.requires_grad_(True)
    out = soft_mask_images(images, maps, chosen, global_norm=True)
    # bilinear x4 upsampling keeps columns 0..5 exactly zero for a map that is zero in source columns 0..1
    assert torch.equal(out[0, :, :, :6], images[0, :, :, :6])
    # sample 0's own peak (1.0) is only a quarter of the batch max (4.0)
    assert torch.allclose(out[0, :, :, 14:], images[0, :, :, 14:] * (1 - 1 / (4 + 1e-5)), atol=1e-6)
    assert out[1, :, 7, 7].abs().max() < 1e-5  # the batch-max pixel is erased
    assert torch.equal(out[2], images[2])  # no chosen class: unchanged
    out.sum().backward()
    assert maps.grad[1, 0].abs().sum() > 0 and maps.grad[0, 1].abs().sum() > 0
    assert maps.grad[0, 0].abs().sum() == 0 and maps.grad[2].abs().sum() == 0


def test_soft_mask_per_sample_normalisation():
    images, maps, chosen = _mask_inputs()
    out = soft_mask_images(images, maps, chosen, global_norm=False)
    assert out[0, :, :, 14:].abs().max() < 1e-4  # sample 0 now normalised by its own peak
    assert torch.equal(out[0, :, :, :6], images[0, :, :, :6])
    assert torch.equal(out[2], images[2])


def test_hard_mask_zeroes_exactly_the_pixels_above_the_threshold():
    images = torch.rand(2, 3, 4, 4) + 0.5
    maps = torch.zeros(2, 2, 4, 4, requires_grad=False)
    values0 = torch.tensor([[0.0, 0.1, 0.2, 0.3], [1.0, 0.21, 0.05, 0.0], [0, 0, 0, 0], [0, 0, 0, 0.19]])
    values1 = torch.tensor([[10.0, 1.0, 3.0, 0.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2.0]])
    maps[0, 0] = values0
    maps[1, 1] = values1
    maps[1, 0] = 100.0  # other class of sample 1: ignored
    maps.requires_grad_(True)
    chosen = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = hard_mask_images(images, maps, chosen, threshold=0.2)  # same size: interpolation is the identity
    keep0 = values0 <= 0.2  # 0.2 itself is kept (<=), 0.21 is erased
    keep1 = values1 / 10.0 <= 0.2  # normalised per sample by its own max 10: 3.0 -> 0.3 erased, 2.0 -> 0.2 kept
    assert torch.equal(out[0], images[0] * keep0)
    assert torch.equal(out[1], images[1] * keep1)
    assert keep0.sum() == 13 and keep1.sum() == 14
    assert not out.requires_grad


def test_hard_mask_leaves_samples_without_choice_unmasked():
    images = torch.rand(1, 3, 8, 8)
    out = hard_mask_images(images, torch.randn(1, 4, 2, 2), torch.zeros(1, 4))
    assert torch.equal(out, images)
