"""Mixup-CAM, FMix-CAM and Manifold-Mixup-CAM: the mixing ops, the entropy and concentration terms, the step and
scripts/cam/train_mixup.py end to end (CPU, resnet18, random weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import test_learning
import torch

from core import checkpoint, cli, paths
from core.cam import methods, mixing
from core.cam.mixing import BatchMix, MixConfig
from core.errors import WSSSError
from core.losses import concentration_loss, sigmoid_entropy
from core.models import MIX_POINTS, Classifier, load_classifier_weights
from scripts.cam import train_mixup, train_vanilla

pytestmark = pytest.mark.torch_threads(1)

five_class_voc = test_learning.five_class_voc  # the learning test's data (module-scoped fixture)


def flags(data_dir: Path, *extra: str, batch_size: int = 24) -> list[str]:
    return [
        "--tag", "mix/r18", "--data_dir", str(data_dir), "--domain_train", "train", "--architecture", "resnet18",
        "--backbone_weights", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
        "--batch_size", str(batch_size), "--max_epoch", "1", "--num_workers", "0", "--device", "cpu", "--lr", "0.01",
        *extra,
    ]  # fmt: skip


def cli_error(main, parser, argv, capsys) -> str:
    """Run through cli.run; assert exit status 2 and return stderr's last line (the error)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, parser, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def batch(seed: int = 0, size: int = 4, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    labels = (torch.rand(size, classes, generator=generator) > 0.5).float()
    return images, labels


# -- mixing ops -----------------------------------------------------------------------------------------------------
def test_mixup_with_lambda_one_is_the_identity_and_its_loss_the_vanilla_loss():
    images, labels = batch()
    perm = torch.tensor([2, 0, 3, 1])
    assert BatchMix(1.0, perm).apply(images) is images
    hard_ones = BatchMix(1.0, perm, mask=torch.ones(1, 1, 32, 32))
    assert torch.equal(hard_ones.apply(images), images)
    assert torch.equal(BatchMix(1.0, perm).label_weights(labels), labels)

    logits, maps = torch.randn(4, 5), torch.randn(4, 5, 2, 2)
    class_loss = methods.classification_loss(label_smoothing=0.1)
    vanilla = class_loss(logits, labels)
    assert torch.equal(mixing.mixed_class_loss(logits, labels, BatchMix(1.0, perm), class_loss), vanilla)
    no_terms = MixConfig(ent_weight=0.0, con_weight=0.0)
    terms = mixing.mixed_losses(logits, maps, labels, BatchMix(1.0, perm), no_terms, class_loss)
    assert set(terms) == {"loss", "c_loss"} and torch.equal(terms["loss"], vanilla)

    # λ = 0.3: the convex blend of the pair, the labels' weights and the two losses
    mix = BatchMix(0.3, perm)
    assert torch.allclose(mix.apply(images), 0.3 * images + 0.7 * images[perm])
    assert torch.allclose(mix.label_weights(labels), 0.3 * labels + 0.7 * labels[perm])
    expected = 0.3 * class_loss(logits, labels) + 0.7 * class_loss(logits, labels[perm])
    assert torch.allclose(mixing.mixed_class_loss(logits, labels, mix, class_loss), expected)


@pytest.mark.parametrize("size", [(64, 64), (33, 50)])
def test_fmix_mask_has_ceil_lambda_hw_ones_and_is_low_frequency(size):
    height, width = size
    torch.manual_seed(0)
    for lam in (0.0, 0.01, 0.37, 0.5, 0.999, 1.0):
        mask = mixing.fmix_mask(lam, height, width)
        assert mask.shape == (height, width) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert int(mask.sum()) == math.ceil(lam * height * width) == mixing.fmix_ones(lam, height * width)

    def low_share(mask: torch.Tensor, cutoff: float = 0.1) -> float:
        """Share of the (mean-free) mask's spectrum energy at frequencies below ``cutoff`` cycles per pixel."""
        energy = torch.fft.fft2(mask - mask.mean()).abs() ** 2
        fy, fx = torch.fft.fftfreq(height)[:, None], torch.fft.fftfreq(width)[None, :]
        return float(energy[(fy**2 + fx**2).sqrt() < cutoff].sum() / energy.sum())

    shares = [low_share(mixing.fmix_mask(0.5, height, width)) for _ in range(10)]
    scattered = mixing.fmix_mask(0.5, height, width).flatten()[torch.randperm(height * width)].view(height, width)
    assert min(shares) > 0.6, shares  # measured: 0.8-0.97 at δ = 3
    assert low_share(scattered) < 0.2  # the same ones scattered at random: white noise, ~3 % below 0.1
    smooth = [low_share(mixing.fmix_mask(0.5, height, width, decay=1.0)) for _ in range(10)]
    assert sum(shares) > sum(smooth)  # a larger decay gives smoother masks


def test_sample_mix_is_deterministic_for_a_seed_and_uses_the_published_settings():
    images = torch.zeros(6, 3, 16, 16)

    def draws(seed: int, kind: str) -> list:
        torch.manual_seed(seed)
        mixes = [mixing.sample_mix(MixConfig.from_args(cli_args(), kind), images) for _ in range(4)]
        return [(m.lam, m.perm.tolist(), None if m.mask is None else m.mask.tolist(), m.point) for m in mixes]

    for kind in mixing.MIX_METHODS:
        assert draws(0, kind) == draws(0, kind)
        assert draws(0, kind) != draws(1, kind)
    fmix = draws(0, "fmix")
    assert all(lam == pytest.approx(sum(map(sum, mask[0][0])) / 256) for lam, _, mask, _ in fmix)
    assert {point for *_, point in draws(0, "mixup")} == {0}

    torch.manual_seed(0)
    config = MixConfig.from_args(cli_args(), "manifold")
    points = [mixing.sample_mix(config, images).point for _ in range(600)]
    counts = [points.count(p) for p in range(len(MIX_POINTS))]
    assert min(counts) > 60, counts  # uniform over the 6 points: 100 each
    lams = torch.tensor([mixing.sample_mix(config, images).lam for _ in range(2000)])
    # Beta(0.2, 0.2): mean 1/2, variance 1/(4·1.4) ≈ 0.179, mass piled at both ends
    assert float(lams.mean()) == pytest.approx(0.5, abs=0.03) and float(lams.var()) == pytest.approx(0.179, abs=0.02)

    never = MixConfig(prob=0.0)
    assert all(mixing.sample_mix(never, images).lam == 1.0 for _ in range(5))


def cli_args(*extra: str):
    return train_mixup.get_args_parser().parse_args(["--tag", "t", *extra])


def test_manifold_mixing_at_the_input_equals_input_mixup_and_mixes_once_elsewhere():
    torch.manual_seed(0)
    model = Classifier("resnet18", 5).eval()
    images, _ = batch()
    perm = torch.tensor([1, 2, 3, 0])
    with torch.no_grad():
        manifold = model(images, with_cam=True, hidden_mix=BatchMix(0.3, perm, point=0).hidden)
        mixup = model(BatchMix(0.3, perm).apply(images), with_cam=True)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(manifold, mixup, strict=True))

        calls = []

        def spy(point: int, hidden: torch.Tensor) -> torch.Tensor:
            calls.append((point, hidden.shape[1]))
            return BatchMix(0.3, perm, point=3).hidden(point, hidden)

        deep = model(images, hidden_mix=spy)
    assert [p for p, _ in calls] == list(range(len(MIX_POINTS)))
    assert [c for _, c in calls] == [3, *model.backbone.stage_channels]
    assert not torch.allclose(deep, mixup[0])


# -- entropy and concentration --------------------------------------------------------------------------------------
def test_entropy_is_maximal_at_one_half():
    zero = torch.zeros(2, 3, requires_grad=True)
    top = sigmoid_entropy(zero)
    assert float(top.detach()) == pytest.approx(math.log(2))
    top.backward()
    assert torch.equal(zero.grad, torch.zeros(2, 3))  # a maximum: no slope at p = 0.5
    for logits in (torch.full((2, 3), 0.5), torch.randn(4, 7), torch.tensor([[-3.0, 2.0]])):
        assert float(sigmoid_entropy(logits)) < math.log(2)
    assert float(sigmoid_entropy(torch.tensor([[200.0, -200.0]]))) == pytest.approx(0.0, abs=1e-12)


def square(size: int, grid: int = 15) -> torch.Tensor:
    """A map with a centred ``size`` x ``size`` square of ones on a ``grid`` x ``grid`` grid, [1, 1, grid, grid]."""
    attention = torch.zeros(1, 1, grid, grid)
    start = (grid - size) // 2
    attention[..., start : start + size, start : start + size] = 1.0
    return attention


def test_concentration_is_zero_for_a_single_pixel_and_grows_with_spread():
    one = torch.ones(1, 1)
    single = square(1)
    single_off_centre = torch.zeros(1, 1, 15, 15)
    single_off_centre[0, 0, 2, 11] = 5.0
    assert float(concentration_loss(single, one, eps=0.0)) == 0.0
    assert float(concentration_loss(single_off_centre, one, eps=0.0)) == pytest.approx(0.0, abs=1e-12)
    losses = [float(concentration_loss(square(size), one, eps=0.0)) for size in (1, 3, 5, 7, 11, 15)]
    assert losses[0] == 0.0 and all(a < b for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] == pytest.approx(2 / 3 * 16 / 14, rel=1e-4)  # uniform: per-axis variance (n+1)/(3(n-1))

    # weights: an absent class counts 0, a class of both sources its mixed weight; the batch mean divides by B
    two = torch.cat([square(3), square(15)], dim=1)  # [1, 2, 15, 15]
    spread = float(concentration_loss(square(15), one))
    assert float(concentration_loss(two, torch.tensor([[0.0, 0.3]]))) == pytest.approx(0.3 * spread, rel=1e-5)
    pair = torch.cat([two, two])
    weights = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert float(concentration_loss(pair, weights)) == pytest.approx(spread / 2, rel=1e-5)


# -- the step and the script ----------------------------------------------------------------------------------------
def test_method_spec_builds_the_mixing_methods():
    args = cli_args("--fmix", "1", "--ent", "0", "--concent_loss_weight", "1e-3", "--mixup_prob", "0.5")
    assert args.mix == "fmix"
    spec = methods.method_spec("fmix", args)
    assert spec.mix == MixConfig("fmix", alpha=1.0, decay=3.0, prob=0.5, ent_weight=0.0, con_weight=1e-3)
    assert spec.puzzle is None and spec.oc is None
    assert methods.method_spec("manifold", cli_args("--mix_alpha", "0.4")).mix.alpha == 0.4
    assert methods.method_spec("vanilla", cli_args()).mix is None
    with pytest.raises(WSSSError, match="unknown --mix 'cutmix'"):
        MixConfig.from_args(cli_args(), "cutmix")


@pytest.mark.parametrize("kind", mixing.MIX_METHODS)
def test_the_script_runs_one_step_for_each_mix(kind, synthetic_voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = train_mixup.main(train_mixup.get_args_parser().parse_args(flags(synthetic_voc, "--mix", kind)))
    final = tmp_path / "experiments/models/mix/r18.pth"
    load_classifier_weights(Classifier("resnet18", 20), final)  # strict: the CAM stage's inference network
    records = [json.loads(line) for line in (final.with_suffix("") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1]
    assert {"loss", "c_loss", "ent_loss", "con_loss", "lam"} <= set(records[0])
    assert 0.0 <= summary["train/lam"] <= 1.0 and 0.0 < summary["train/ent_loss"] <= math.log(2)
    manifest = json.loads((final.with_suffix("") / "manifest.json").read_text())
    assert manifest["flags"]["mix"] == kind and "mix" in manifest["identity_flags"]


def test_school_project_switches_and_bad_mixing_flags(synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parser = train_mixup.get_args_parser()
    school = parser.parse_args(["--manifold_mixup", "1", "--ent", "1", "--concent", "0", "--max_epochs", "25"])
    assert (school.mix, school.ent, school.concent, school.max_epoch) == ("manifold", True, False, 25)

    err = cli_error(train_mixup.main, parser, flags(synthetic_voc, "--mix", "cutmix"), capsys)
    assert "argument --mix: invalid choice: 'cutmix'" in err and "mixup" in err and "manifold" in err
    err = cli_error(train_mixup.main, parser, flags(synthetic_voc, "--fmix", "0"), capsys)
    assert "always mixes" in err and "train_vanilla.py" in err
    err = cli_error(train_mixup.main, parser, flags(synthetic_voc, "--mix_alpha", "0"), capsys)
    assert "argument --mix_alpha/--mix-alpha: must be a number > 0" in err
    err = cli_error(train_mixup.main, parser, flags(synthetic_voc, "--mixup_prob", "1.5"), capsys)
    assert err == "error: --mixup_prob 1.5: the probability that a batch is mixed must lie in [0, 1]"
    assert not (tmp_path / "experiments").exists()  # refused before any folder

    vanilla = train_vanilla.get_args_parser()
    err = cli_error(train_vanilla.main, vanilla, flags(synthetic_voc, "--augment", "randaugment_mixup"), capsys)
    assert "mixup is not a data augmentation here" in err and "train_mixup.py --mix mixup" in err


# -- learning -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.torch_threads(2)
def test_a_short_mixup_cam_run_clearly_beats_the_untrained_network(five_class_voc, tmp_path, monkeypatch):
    """test_learning.py's protocol (same data, recipe and margin) with Mixup-CAM instead of vanilla training."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    checkpoint.save_weights(paths.final_weights_path("untrained"), Classifier("resnet18", 20).state_dict())
    untrained = test_learning.cam_miou(five_class_voc, "untrained")
    recipe = [
        "--tag", "trained", "--data_dir", str(five_class_voc), "--domain_train", "train_aug", "--architecture",
        "resnet18", "--backbone_weights", "none", "--batch_size", "16", "--max_epoch", "12", "--image_size", "96",
        "--min_image_size", "80", "--max_image_size", "112", "--num_workers", "0", "--device", "cpu", "--optimizer",
        "adamw", "--lr", "0.001", "--label_smoothing", "0.1", "--mix", "mixup",
    ]  # fmt: skip
    train_mixup.main(train_mixup.get_args_parser().parse_args(recipe))
    trained = test_learning.cam_miou(five_class_voc, "trained")
    assert trained > untrained + test_learning.MIN_GAIN, f"Mixup-CAM mIoU {trained:.1f} vs untrained {untrained:.1f}"
