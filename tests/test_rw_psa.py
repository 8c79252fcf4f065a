"""PSA's AffinityNet in the random-walk stage (``--method psa``): affinity labels from la/ha score maps, the feature
affinity and its loss, the sparse PSA walk against a dense implementation, and a labels -> training -> walk ->
evaluation run on the synthetic VOC tree (random resnet18, CPU)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import commands
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_rw_affinity import uncertain_borders

from core import paths
from core.artifacts import cam_path, load_cam, load_label_map, save_label_map
from core.datasets import build_source
from core.errors import WSSSError
from core.labels import cams_to_label_map
from core.models import BACKBONES
from core.rw import losses
from core.rw.labels import pool_cells, psa_affinity_labels, psa_scores
from core.rw.paths import feature_affinity, path_index
from core.rw.psa import PsaAffinityNet, load_psa_affinity_net
from core.rw.walk import psa_random_walk, psa_rw_maps, psa_seeds
from scripts import evaluate
from scripts.rw import inference as rw_inference
from scripts.rw import make_affinity_labels, train_affinity

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.torch_threads(1)


# --------------------------------------------------------------------------------------------------------------------
# Affinity labels
# --------------------------------------------------------------------------------------------------------------------


def test_psa_labels_of_a_constructed_cam():
    # One class (key 7) on a 40x44 image (the last column of cells is half padding): CAM 0.5 on the top-left 16x16,
    # 0.1 on the 16x16 cells right of it, 0 elsewhere. Without CRF, alpha 4 / 24:
    #   0.5 -> bg 0.06 (low) and ~0 (high): the class;  0.1 -> bg 0.66 (low: background, unsure) and 0.08 (high:
    #   class): 255;  0 -> bg 1 in both: background, sure: 0.
    cams = np.zeros((1, 40, 44), np.float32)
    cams[0, :16, :16] = 0.5
    cams[0, :16, 16:32] = 0.1
    la, ha = psa_scores(cams, 4, None, crf_t=0), psa_scores(cams, 24, None, crf_t=0)
    labels = psa_affinity_labels(la, ha, np.array([7]))
    assert labels.shape == (40, 44) and labels.dtype == np.uint8
    assert (labels[:16, :16] == 7).all() and (labels[:16, 16:32] == 255).all()
    assert (labels[16:] == 0).all() and (labels[:, 32:] == 0).all()
    # Scores are pooled x8 before the argmax: 6 of a cell's 8 rows at CAM 1 make the whole cell the class.
    cams[0, 16:22, :8] = 1.0
    pooled = pool_cells(psa_scores(cams, 4, None, crf_t=0))
    assert pooled.shape == (2, 5, 6)
    np.testing.assert_allclose(pooled[:, 2, 0], [0.25, 0.75])
    labels = psa_affinity_labels(psa_scores(cams, 4, None, 0), psa_scores(cams, 24, None, 0), np.array([7]))
    assert (labels[16:24, :8] == 7).all() and (labels[24:, :8] == 0).all()
    # Cells without any score (padding) are unsure.
    zeros = np.zeros((2, 16, 16), np.float32)
    zeros[0, :, :8] = 1.0
    assert (psa_affinity_labels(zeros, zeros, np.array([3]))[:, 8:] == 255).all()


# --------------------------------------------------------------------------------------------------------------------
# Feature affinity and loss
# --------------------------------------------------------------------------------------------------------------------


def test_feature_affinity_is_one_for_equal_features_and_falls_with_their_distance():
    index = path_index(5, (6, 12))
    same = torch.randn(1, 3, 1, 1).expand(2, 3, 6, 12)
    torch.testing.assert_close(feature_affinity(same, index), torch.ones(2, index.n_directions, index.n_src))
    # features growing along x by `step` per column: a pair dx columns apart has affinity exp(-|dx| step)
    step = 0.3
    ramp = (step * torch.arange(12.0)).view(1, 1, 1, 12).expand(1, 4, 6, 12)
    affinity = feature_affinity(ramp, index)[0]
    expected = torch.exp(-step * torch.from_numpy(index.directions[:, 1]).abs().float())
    torch.testing.assert_close(affinity, expected[:, None].expand_as(affinity))
    by_distance = {abs(int(dx)): float(a) for (_, dx), a in zip(index.directions, affinity[:, 0], strict=True)}
    assert [by_distance[d] for d in range(5)] == sorted(by_distance.values(), reverse=True)


def test_the_psa_loss_is_zero_for_perfect_features_on_two_regions():
    labels = torch.zeros(1, 12, 16, dtype=torch.long)
    labels[:, :, 8:] = 2
    features = torch.zeros(1, 8, 12, 16)
    features[:, :, :, 8:] = 30.0  # exp(-30): the two regions never link
    perfect = losses.combine_terms(losses.feature_pair_loss_sums(features, labels))
    assert perfect["loss"].item() < 1e-4 and perfect["neg"].item() < 1e-4
    flat = losses.combine_terms(losses.feature_pair_loss_sums(torch.zeros_like(features), labels))
    assert flat["bg"].item() < 1e-4 and flat["fg"].item() < 1e-4
    assert flat["neg"].item() == pytest.approx(-math.log(losses.EPS), rel=1e-3)  # every negative pair has a = 1
    assert flat["loss"].item() == pytest.approx(flat["neg"].item() / 2, rel=1e-6)  # 1/4 bg + 1/4 fg + 1/2 neg


# --------------------------------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------------------------------


def dense_psa_walk(seeds: torch.Tensor, features: torch.Tensor, beta: float, logt: int, radius: int = 5):
    """PSA's walk with a dense N x N matrix: every pair of cells closer than ``radius``, a unit diagonal, A^beta,
    columns normalised, squared ``logt`` times (float64)."""
    _, height, width = features.shape
    flat = features.double().reshape(len(features), -1).T  # [N, D]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1).double(), xs.reshape(-1).double()
    near = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2 < radius**2
    affinity = torch.exp(-(flat[:, None] - flat[None]).abs().mean(-1)) * near  # diagonal: exp(0) = 1
    transition = affinity.pow(beta)
    transition = transition / transition.sum(dim=0, keepdim=True)
    for _ in range(logt):
        transition = transition @ transition
    return (seeds.double().reshape(len(seeds), -1) @ transition).reshape(seeds.shape)


def test_the_sparse_psa_walk_equals_the_dense_one():
    torch.manual_seed(0)
    features, seeds = torch.rand(6, 9, 11), torch.rand(3, 9, 11)
    expected = dense_psa_walk(seeds, features, beta=8, logt=4)
    sparse = psa_random_walk(seeds, features, beta=8, logt=4, dtype=torch.float64)
    torch.testing.assert_close(sparse, expected, rtol=1e-6, atol=1e-9)  # affinities in float32, the walk in float64
    on_torch = psa_random_walk(seeds, features, beta=8, logt=4, backend="torch")
    torch.testing.assert_close(on_torch, expected.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(WSSSError, match="--logt 13"):
        psa_random_walk(seeds, features, logt=13)


def test_seeds_are_pooled_and_threshold_half_decodes_psa_argmax():
    torch.manual_seed(0)
    cams = torch.rand(2, 20, 27)
    seeds = psa_seeds(cams, bg_alpha=None, bg_score=0.27)
    assert seeds.shape == (3, 3, 4)
    torch.testing.assert_close(seeds[1:, 0, 0], cams[:, :8, :8].mean(dim=(1, 2)))
    torch.testing.assert_close(seeds[0, 2, 3], torch.tensor(0.27 * 4 * 3 / 64))  # 4x3 image pixels, zero padding
    powered = psa_seeds(cams, bg_alpha=16)
    torch.testing.assert_close(powered[0, 0, 0], ((1 - cams.amax(0)) ** 16)[:8, :8].mean())
    walked = torch.rand(3, 3, 4)
    cam, hr_cam = psa_rw_maps(walked, (20, 27))
    assert cam.shape == (2, 5, 7) and hr_cam.shape == (2, 20, 27) and 0 <= hr_cam.min() <= hr_cam.max() <= 1
    upsampled = F.interpolate(walked[None], scale_factor=8, mode="bilinear", align_corners=False)[0, :, :20, :27]
    psa_argmax = np.array([0, 4, 9])[upsampled.argmax(0).numpy()]
    np.testing.assert_array_equal(cams_to_label_map(hr_cam, np.array([4, 9]), 0.5), psa_argmax)


# --------------------------------------------------------------------------------------------------------------------
# Labels -> training -> walk -> evaluation
# --------------------------------------------------------------------------------------------------------------------


def test_psa_labels_train_walk_and_evaluate(tmp_path, synthetic_voc, perfect_cams):
    source = build_source("voc12", synthetic_voc, "train")
    ids = source.ids[:4]
    (tmp_path / "few.txt").write_text("\n".join(ids) + "\n")
    perfect_cams(source, paths.PREDICTIONS_DIR / "cams@few", ids)
    common = ["--data_dir", str(synthetic_voc), "--domain", "few.txt"]

    flags = [*common, "--method", "psa", "--experiment_name", "cams@few", "--tag", "psa", "--crf_t", "2"]
    made = make_affinity_labels.main(make_affinity_labels.get_args_parser().parse_args([*flags, "--num_workers", "1"]))
    label_dir = Path(made["out_dir"])
    assert label_dir.name == "psa@aff_la=4_ha=24" and made["written"] == len(ids)
    for image_id in ids:
        labels = load_label_map(label_dir / f"{image_id}.png")
        keys = load_cam(cam_path(paths.PREDICTIONS_DIR / "cams@few", image_id)).keys
        assert labels.shape == source.image_size(image_id) and set(np.unique(labels)) <= {0, 255, *keys.tolist()}
    assert json.loads((label_dir / "manifest.json").read_text())["context"]["alpha_high"] == 24

    train_flags = [
        *common, "--method", "psa", "--tag", "rw/psa", "--label_dir", str(label_dir), "--architecture", "resnet18",
        "--backbone_weights", "none", "--image_size", "80", "--min_image_size", "64", "--max_image_size", "96",
        "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
    ]  # fmt: skip
    args = train_affinity.get_args_parser().parse_args([*train_flags, "--max_epoch", "1"])
    assert (args.lr, args.wd, args.dilated) == (0.01, 5e-4, True)  # PPC's recipe
    trained = train_affinity.main(args)
    assert math.isfinite(trained["train/loss"]) and trained["train/pairs"] > 0
    assert isinstance(load_psa_affinity_net(trained["final_path"]), PsaAffinityNet)

    walk_flags = [*common, "--method", "psa", "--model_name", "rw/psa", "--cam_dir", "cams@few", "--logt", "2"]
    walked = rw_inference.main(rw_inference.get_args_parser().parse_args([*walk_flags, "--device", "cpu"]))
    out = Path(walked["out_dir"])
    assert out.name == "psa@few@beta=8@logt=2@bg=0.27@rw" and walked["written"] == len(ids)
    scored = evaluate.main(evaluate.get_args_parser().parse_args([*common, "--pred_dir", str(out)]))
    assert 0 <= scored["miou"] <= 100 and len(scored["sweep"]) > 1

    irn_flags = [*walk_flags, "--method", "irn", "--pred_dir", "irn_out"]
    with pytest.raises(WSSSError, match="holds a PSA AffinityNet.*--method psa") as error:
        rw_inference.main(rw_inference.get_args_parser().parse_args(irn_flags))
    assert "\n" not in str(error.value) and not Path("irn_out").exists()


def test_an_irn_checkpoint_with_method_psa_is_refused_in_one_line(tmp_path, synthetic_voc, perfect_cams):
    from core import checkpoint
    from core.rw.network import AffinityNet

    checkpoint.save_weights(paths.final_weights_path("aff"), AffinityNet("resnet18").state_dict())
    source = build_source("voc12", synthetic_voc, "train")
    (tmp_path / "few.txt").write_text(source.ids[0] + "\n")
    perfect_cams(source, paths.PREDICTIONS_DIR / "cams@few", source.ids[:1])
    argv = [
        "--data_dir", str(synthetic_voc), "--domain", "few.txt", "--method", "psa", "--model_name", "aff",
        "--cam_dir", "cams@few", "--device", "cpu",
    ]  # fmt: skip
    with pytest.raises(WSSSError, match="holds an IRN AffinityNet.*--method irn") as error:
        rw_inference.main(rw_inference.get_args_parser().parse_args(argv))
    assert "\n" not in str(error.value)
    assert not list(paths.PREDICTIONS_DIR.glob("aff@*/*.npz"))
    with pytest.raises(WSSSError, match="--method psa makes labels from CAMs"):
        make_affinity_labels.main(
            make_affinity_labels.get_args_parser().parse_args(
                ["--data_dir", str(synthetic_voc), "--method", "psa", "--cams_dir", "x", "--sal_dir", ".", "--tag", "t"]
            )
        )


@pytest.mark.skipif("test_resnet38" not in BACKBONES, reason="the ResNet-38 backbone (branch seam) is not merged")
def test_a_psa_reference_checkpoint_of_the_resnet38_layout_loads(tmp_path):
    # PSA's resnet38_aff files: the backbone's own keys at the top level, f8_3/f8_4/f8_5/f9, no BN batch counters.
    torch.manual_seed(0)
    model = PsaAffinityNet("test_resnet38").eval()
    assert model.backbone.stage_channels[2:] == (32, 64, 256)  # conv4, conv5, conv6 (x1/16 widths)
    image = torch.randn(3, 50, 70)
    features = model.feature_map(image)
    assert features.shape == (448, 7, 9)
    reference = {
        key.removeprefix("backbone."): value
        for key, value in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    torch.save(reference, tmp_path / "resnet38_aff.pth")
    loaded = load_psa_affinity_net(tmp_path / "resnet38_aff.pth", "test_resnet38")
    torch.testing.assert_close(loaded.feature_map(image), features)


def test_the_runner_config_names_the_psa_folders_as_the_scripts_do(tmp_path):
    script = (
        f'REPO={REPO}; source "$REPO/runners/config/env.sh"; source "$REPO/runners/config/pipeline.sh"; '
        'echo "$AFF_LABELS"; echo "$(rw_of train)"; echo "$PSEUDO_MASKS"; echo "$LR_AFF $RW_BETA $RW_EXP $PSEUDO_T"'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RW_", "AFF_", "LR_", "PSEUDO_", "TAG_"))}
    env |= {"WORK_DIR": str(tmp_path), "NGPU": "1", "DATASET": "voc12", "RW_METHOD": "psa", "EID": "r1"}
    done = commands.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    labels, rw, pseudo, recipe = done.stdout.strip().splitlines()
    assert labels.endswith("@aff_la=4_ha=24") and "@pnoc-psa-r1@" in rw + "@"
    assert rw.endswith("@train@beta=8@logt=6@bg=0.27@rw") and pseudo.endswith("@beta=8@logt=6@bg=0.27@rw@t=0.5@crf=1")
    assert recipe == "0.01 8 6 0.5"
    # the scripts' own names for the same flags
    args = rw_inference.get_args_parser().parse_args(
        ["--method", "psa", "--model_name", "affnet/x", "--cam_dir", "c", "--domain", "train", "--bg_score", "0.27"]
    )
    assert str(rw_inference.output_dir(args)).endswith("affnet/x@train@beta=8@logt=6@bg=0.27@rw")
    env["RW_METHOD"] = "walk"
    failed = commands.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert failed.returncode == 2 and failed.stderr.strip() == "error: unknown RW_METHOD=walk (choose irn or psa)"


# --------------------------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------------------------


def _walk_miou(model: PsaAffinityNet | None, source) -> float:
    """mIoU of the PSA walk (logt 3, bg 0.27, threshold 0.5) of seeds on 20 % of each object's stride-8 cells, on
    ``model``'s features or (None) on equal features everywhere."""
    from core.datasets.transforms import normalize, to_chw
    from core.metrics import confusion_matrix, scores_from_confusion

    rng = np.random.default_rng(0)
    classes = len(source.classes)
    confusion = np.zeros((classes, classes), np.int64)
    for image_id in source.ids:
        gt = source.read_mask(image_id)
        keys = np.array([k for k in np.unique(gt) if 0 < k < 255])
        if not keys.size:
            continue
        image = torch.from_numpy(to_chw(normalize(source.read_image(image_id))))
        features = model.feature_map(image) if model is not None else torch.zeros(8, 8, 8)
        cells = gt[4::8, 4::8]
        seeds = np.stack([(cells == k) & (rng.random(cells.shape) < 0.2) for k in keys]).astype(np.float32)
        hr_seeds = torch.from_numpy(np.repeat(np.repeat(seeds, 8, axis=1), 8, axis=2))
        walked = psa_random_walk(psa_seeds(hr_seeds, None, 0.27), features, beta=8, logt=3)
        _, hr_cam = psa_rw_maps(walked, gt.shape)
        confusion += confusion_matrix(gt, cams_to_label_map(hr_cam, keys, 0.5), classes)
    return scores_from_confusion(confusion, [str(k) for k in range(classes)])["miou"]


@pytest.mark.slow
def test_psa_training_learns_features_that_keep_the_walk_inside_objects(synthetic_voc, tmp_path):
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids:
        save_label_map(tmp_path / "labels" / f"{image_id}.png", uncertain_borders(source.read_mask(image_id)))
    flags = [
        "--method", "psa", "--tag", "learn", "--data_dir", str(synthetic_voc), "--domain", "train", "--label_dir",
        str(tmp_path / "labels"), "--architecture", "resnet18", "--backbone_weights", "none", "--image_size", "80",
        "--min_image_size", "64", "--max_image_size", "96", "--batch_size", "8", "--max_epoch", "8", "--lr", "0.05",
        "--num_workers", "0", "--device", "cpu", "--print_ratio", "1",
    ]  # fmt: skip
    torch.manual_seed(0)
    summary = train_affinity.main(train_affinity.get_args_parser().parse_args(flags))
    val = build_source("voc12", synthetic_voc, "val")
    learned, flat = _walk_miou(load_psa_affinity_net(summary["final_path"]), val), _walk_miou(None, val)
    assert learned > flat + 10, (learned, flat)
