"""The saliency stage: C²AM losses (hand-computed), polarity, the seed command lines, training and inference through
the scripts, bad CAM folders, a learning test, and 2-process DDP against one process.

Run as a script (``torchrun --standalone --nproc_per_node=2 tests/test_ccam.py <train_hints flags>``) this file is
the worker of the two-process test: it trains with a deterministic transform (no random flip, whose per-process
streams would differ) and otherwise runs scripts/ccam/train_hints.py unchanged.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import commands
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import cli, paths
from core.artifacts import load_cam
from core.ccam import losses, training
from core.ccam.network import CCAM
from core.datasets import build_source
from core.errors import WSSSError
from scripts.ccam import inference as ccam_inference
from scripts.ccam import train, train_hints, train_with_cam_hints

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.torch_threads(1)

NEG_LOG_HIGH = -math.log(0.9995)  # a similarity of 1 clamped
NEG_LOG_DIAG = -math.log(math.sqrt(0.5))  # 45 degrees
NEG_LOG_LOW = -math.log(5e-4)  # a similarity of 0 clamped


# --------------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------------


def test_sim_max_on_a_hand_computed_3x3_similarity_matrix():
    # Rows at 0, 45 and 90 degrees: S = [[1, .707, 0], [.707, 1, .707], [0, .707, 1]], clamped to [5e-4, 0.9995].
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    up, one, down = math.exp(0.25), 1.0, math.exp(-0.25)  # rank 0, 1, 2 -> exp(-0.25 (rank - 1))
    expected = (
        (up * NEG_LOG_HIGH + one * NEG_LOG_DIAG + down * NEG_LOG_LOW)  # row 0: self, 45, 90 degrees
        + (one * NEG_LOG_DIAG + up * NEG_LOG_HIGH + down * NEG_LOG_DIAG)  # row 1: the two 45-degree ties rank 1 and 2
        + (down * NEG_LOG_LOW + one * NEG_LOG_DIAG + up * NEG_LOG_HIGH)
    ) / 9
    assert losses.sim_max(e, alpha=0.25).item() == pytest.approx(expected, rel=1e-5)
    ranks = losses.rank_weights(losses.cosine_similarity_matrix(e, e), 0.25)
    assert ranks[0].tolist() == pytest.approx([up, one, down])


def test_sim_min_pushes_background_from_foreground():
    bg = torch.tensor([[1.0, 0.0]])
    fg = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # orthogonal (cos 0 -> 5e-4) and parallel (cos 1 -> 0.9995)
    expected = (-math.log(1 - 5e-4) - math.log(1 - 0.9995)) / 2
    assert losses.sim_min(bg, fg).item() == pytest.approx(expected, rel=1e-5)


def test_hint_loss_is_exactly_zero_without_hint_pixels_and_bce_where_all_are_hints():
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    none = losses.hint_loss(logits, torch.full((2, 1, 4, 4), 0.39), fg_threshold=0.4)
    assert none.item() == 0.0 and not torch.isnan(none)
    none.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    everywhere = losses.hint_loss(logits, torch.full((2, 1, 4, 4), 0.4), fg_threshold=0.4, label_smoothing=0.1)
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.95))
    assert everywhere.item() == pytest.approx(bce.item(), rel=1e-6)
    # Background hints (off by default): below --bg_threshold, towards eps / 2.
    low = losses.hint_loss(logits, torch.zeros(2, 1, 4, 4), fg_threshold=0.4, bg_threshold=0.1, label_smoothing=0.1)
    assert low.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.05)).item())


# --------------------------------------------------------------------------------------------------------------------
# Network and polarity
# --------------------------------------------------------------------------------------------------------------------


class FixedMap(nn.Module):
    """Stands in for C²AM in the polarity check: a fixed 8x8 logit map, high on the border (inverted) or inside."""

    def __init__(self, border_high: bool) -> None:
        super().__init__()
        band = training.border_band(8, 8).float()
        self.register_buffer("logits", (band if border_high else 1 - band) * 4 - 2)
        self.register_buffer("inverted", torch.zeros(()))

    def set_inverted(self, inverted: bool) -> None:
        self.inverted.fill_(float(inverted))

    def forward(self, x):
        return None, None, self.logits.expand(x.shape[0], 1, 8, 8)


@pytest.mark.parametrize("border_high", [True, False])
def test_polarity_decision_on_a_constructed_map(border_high):
    loader = [{"image": torch.zeros(3, 3, 16, 16)}]
    model = FixedMap(border_high)
    assert training.decide_polarity(model, loader, torch.device("cpu"), 8) is border_high
    assert model.inverted.item() == float(border_high)


def test_an_inverted_network_returns_a_foreground_high_map_and_keeps_the_decision_in_its_weights():
    torch.manual_seed(0)
    model = CCAM("resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    fg, bg, logits = model(x)
    assert fg.shape == bg.shape == (1, 256 + 512) and logits.shape == (1, 1, 4, 4)
    _, normal = model(x, with_cam=True)
    model.set_inverted(True)
    _, flipped = model(x, with_cam=True)
    torch.testing.assert_close(flipped, -normal)
    assert model.state_dict()["inverted"].item() == 1.0
    with pytest.raises(WSSSError, match="stage4_out_features 1024 does not match resnet18"):
        CCAM("resnet18", stage4_out_features=1024)
    assert CCAM("resnet50", stage4_out_features=1024).ac_head.activation_head.in_channels == 3072


def test_reference_grouping_trains_convolutions_at_x1_and_no_batchnorm_affine():
    model = CCAM("resnet18")
    groups = model.param_groups("reference")
    assert set(groups) == {"pretrained_weights", "pretrained_biases"}
    assert any(p is model.ac_head.activation_head.weight for p in groups["pretrained_weights"])
    assert not model.ac_head.bn_head.weight.requires_grad and not model.backbone.bn1.weight.requires_grad
    paper = CCAM("resnet18").param_groups("paper")
    assert len(paper["scratch_weights"]) == 2 and len(paper["scratch_biases"]) == 1  # head conv + BN γ; BN β


# --------------------------------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------------------------------

README_TRAIN = (
    "--tag voc12-ccamh-rs269@rs269pnoc@rs269ra@0.4 --batch_size 128 --accumulate_steps 1 --mixed_precision true "
    "--architecture resnest269 --stage4_out_features 1024 --fg_threshold 0.4 "
    "--cams_dir ./experiments/predictions/pnoc/voc12-rs269 --dataset voc12 --data_dir /data/VOC2012"
)
README_INFERENCE = (
    "--tag voc12-ccamh-rs269@rs269pnoc@rs269ra@0.4 --architecture resnest269 --stage4_out_features 1024 "
    "--domain train_aug --dataset voc12 --data_dir /data/VOC2012"
)


@pytest.mark.parametrize("script", [train_hints, train_with_cam_hints])
def test_the_seed_command_lines_parse(script):
    args = script.get_args_parser().parse_args(README_TRAIN.split())
    assert (args.batch_size, args.accumulate_steps, args.mixed_precision) == (128, 1, True)
    assert (args.stage4_out_features, args.fg_threshold, args.bg_threshold) == (1024, 0.4, None)
    assert (args.lr, args.max_epoch, args.alpha, args.param_groups) == (0.001, 10, 0.25, "paper")
    args = ccam_inference.get_args_parser().parse_args(README_INFERENCE.split())
    assert (args.domain, args.scales, args.activation) == ("train_aug", [0.5, 1.0, 1.5, 2.0], "relu")
    assert train.get_args_parser().parse_args(["--tag", "x", "--weights", "imagenet"]).backbone_weights == "imagenet"


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan"])
def test_a_hint_threshold_outside_0_1_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_hints.get_args_parser().parse_args(["--tag", "x", "--fg_threshold", value])
    assert exit_info.value.code == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# Training and inference through the scripts, and bad CAM folders
# --------------------------------------------------------------------------------------------------------------------


def common_flags(data_dir: Path, tag: str, *extra: str) -> list[str]:
    return [
        "--tag", tag, "--data_dir", str(data_dir), "--domain", "train", "--domain_valid", "val",
        "--architecture", "resnet18", "--backbone_weights", "none", "--image_size", "64",
        "--batch_size", "4", "--max_epoch", "1", "--num_workers", "0", "--device", "cpu", "--validate_max_steps", "1",
        *extra,
    ]  # fmt: skip


def hint_flags(data_dir: Path, cams: Path | str, tag: str = "ccamh", *extra: str) -> list[str]:
    return common_flags(data_dir, tag, "--cams_dir", str(cams), *extra)


@pytest.fixture()
def perfect_hints(synthetic_voc, perfect_cams, tmp_path) -> Path:
    source = build_source("voc12", synthetic_voc, "train")
    ids = [i for i in source.ids if source.label(i).any()]
    return perfect_cams(source, tmp_path / "cams", ids)


def test_train_hints_then_inference_write_one_plane_foreground_maps(
    synthetic_voc, perfect_hints, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    summary = train_hints.main(train_hints.get_args_parser().parse_args(hint_flags(synthetic_voc, perfect_hints)))
    assert Path(summary["final_path"]).is_file() and "val/fg_iou" in summary
    manifest = (tmp_path / "experiments/models/ccamh/manifest.json").read_text()
    assert '"cams"' in manifest and str(perfect_hints) in manifest
    flags = ["--tag", "ccamh", "--data_dir", str(synthetic_voc), "--domain", "val", "--architecture", "resnet18"]
    flags += ["--scales", "1.0,0.5", "--device", "cpu", "--num_workers", "0"]
    result = ccam_inference.main(ccam_inference.get_args_parser().parse_args(flags))
    out = Path(result["out_dir"])
    assert out == paths.predictions_dir("ccamh", "val", [1.0, 0.5]) and result["written"] == 12
    cams = load_cam(next(out.glob("*.npz")))
    assert cams.keys.tolist() == [1] and cams.hr_cam.shape == (1, 64, 64) and cams.hr_cam.max() > 0.99
    again = ccam_inference.main(ccam_inference.get_args_parser().parse_args(flags))  # resumes: nothing left to do
    assert (again["written"], again["skipped"]) == (0, 12)
    # A reference checkpoint has no polarity decision: inference decides it from the border band.
    weights = torch.load(summary["final_path"], weights_only=True)
    del weights["inverted"]
    torch.save({"state_dict": weights}, tmp_path / "reference.pth")
    flags += ["--weights", str(tmp_path / "reference.pth"), "--pred_dir", str(tmp_path / "ref"), "--image_size", "64"]
    assert ccam_inference.main(ccam_inference.get_args_parser().parse_args(flags))["written"] == 12


def test_unsupervised_training_decides_the_polarity_after_the_first_epoch(synthetic_voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = train.main(train.get_args_parser().parse_args(common_flags(synthetic_voc, "ccam", "--validate", "false")))
    assert "val/inverted" in summary
    weights = torch.load(summary["final_path"], weights_only=True)
    assert weights["inverted"].item() == summary["val/inverted"]


def test_bad_cam_folders_are_refused_in_one_line(synthetic_voc, perfect_hints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def refused(cams: Path | str, match: str) -> None:
        args = train_hints.get_args_parser().parse_args(hint_flags(synthetic_voc, cams))
        with pytest.raises(WSSSError, match=match) as error:
            train_hints.main(args)
        assert "\n" not in str(error.value)
        assert not (tmp_path / "experiments").exists()  # refused before any folder was made

    refused(tmp_path / "nowhere", "does not exist; run scripts/cam/inference.py --domain train")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "holds no CAM files")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(perfect_hints, incomplete)
    gone = sorted(incomplete.glob("*.npz"))[:4]
    for path in gone:
        path.unlink()
    refused(incomplete, rf"4 of \d+ CAM files of --domain train missing in .*incomplete \(first: {gone[0].stem}, ")
    (incomplete / "manifest.json").write_text('{"id": "0", "context": {"domain": "val"}}')
    refused(incomplete, "CAM files of --domain train missing .* the folder was made for --domain val")
    other_size = tmp_path / "other_size"
    other_size.mkdir()
    for path in perfect_hints.glob("*.npz"):
        with np.load(path) as cam:
            hr = np.repeat(np.repeat(cam["hr_cam"], 2, axis=1), 2, axis=2)
            np.savez(other_size / path.name, keys=cam["keys"], cam=cam["hr_cam"][:, ::2, ::2], hr_cam=hr)
    refused(other_size, "hr_cam is 128x128 but image .* is 64x64")


# --------------------------------------------------------------------------------------------------------------------
# Learning and DDP
# --------------------------------------------------------------------------------------------------------------------

MIN_GAIN = 10.0  # fg IoU points over the untrained network; measured: untrained 17.7, trained 43.8 (3 epochs, 64 px)


@pytest.mark.slow
def test_ccamh_separates_foreground_clearly_better_than_an_untrained_network(
    synthetic_voc, perfect_hints, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    flags = hint_flags(synthetic_voc, perfect_hints, "learn", "--max_epoch", "3", "--batch_size", "8")
    flags += ["--lr", "0.05", "--dilated", "true", "--validate_max_steps", "none", "--print_ratio", "1"]
    args = train_hints.get_args_parser().parse_args(flags)
    torch.manual_seed(0)
    untrained = CCAM("resnet18", dilated=True)
    source = build_source("voc12", synthetic_voc, "val")
    from core.datasets import SegmentationDataset
    from core.datasets.transforms import build_validation_transform

    loader = torch.utils.data.DataLoader(SegmentationDataset(source, build_validation_transform(64)), batch_size=12)
    before = training.validate_saliency(untrained, loader, torch.device("cpu"), args.validate_thresholds)
    after = train_hints.main(args)
    assert after["val/fg_iou"] > before["fg_iou"] + MIN_GAIN, (after["val/fg_iou"], before["fg_iou"])


def test_two_processes_update_like_one_process(synthetic_voc, perfect_hints, tmp_path):
    flags = hint_flags(synthetic_voc, perfect_hints, "ddp", "--mode", "fix", "--accumulate_steps", "2")
    flags += ["--validate", "false", "--lr", "0.05", "--resize_size", "64"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *flags]
    done = commands.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = [f if f != "ddp" else "single" for f in flags]
    commands.run([sys.executable, __file__, *single], cwd=tmp_path, env=env, check=True, capture_output=True)
    ddp = torch.load(tmp_path / "experiments/models/ddp.pth", weights_only=True)
    one = torch.load(tmp_path / "experiments/models/single.pth", weights_only=True)
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5, msg=key)  # running var ~1e8
    head = "ac_head.activation_head.weight"
    assert not torch.equal(one[head], CCAM("resnet18").state_dict()[head])


def _deterministic_worker() -> None:
    # No random flip: each process draws its own augmentation stream, so only a deterministic transform lets the
    # two runs see the same pixels. Everything else is the unchanged script.
    from core.datasets import transforms

    training.build_segmentation_transform = lambda resize, _, crop: transforms.build_validation_transform(crop)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cli.run(train_hints.main, train_hints.get_args_parser())


if __name__ == "__main__":
    _deterministic_worker()
