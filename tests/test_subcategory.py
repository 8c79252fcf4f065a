"""SC-CAM and Sub-category Teaching: clustering, the two-head loss, the ViT backbone, the three scripts end to end."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import commands
import numpy as np
import pytest
import torch

from core import checkpoint, cli, paths
from core.cam import subcategory
from core.cam.subcategory import FeatureFile
from core.datasets import build_source
from core.errors import WSSSError
from core.losses import multilabel_soft_margin
from core.models import Classifier, SubcategoryClassifier, build_backbone, load_classifier_weights
from scripts.cam import cluster_subcategories, extract_features, train_subcategory
from scripts.cam import inference as cam_inference

pytestmark = pytest.mark.torch_threads(2)
REPO = Path(__file__).resolve().parents[1]
EPOCHS = "6"  # the learning test's epochs


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """30 images, 3 classes (class 2 absent), 8-d features in separated groups."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((30, 3), dtype=np.float32)
    labels[:20, 0] = 1
    labels[12:, 1] = 1
    features = rng.normal(size=(30, 8)).astype(np.float32) + 5 * (np.arange(30) % 3)[:, None]
    return features, labels


# -- clustering -----------------------------------------------------------------------------------------------------
def test_kmeans_sub_labels_are_deterministic_and_one_per_present_parent():
    features, labels = blobs()
    sub, parents = subcategory.cluster_subcategories(features, labels, "kmeans", n_clusters=3, seed=0)
    again, parents_again = subcategory.cluster_subcategories(features, labels, "kmeans", n_clusters=3, seed=0)
    assert np.array_equal(sub, again) and np.array_equal(parents, parents_again)
    assert parents.tolist() == [0, 0, 0, 1, 1, 1]  # SC-CAM's layout c·K + k; absent class 2 gets none
    assert sub.dtype == np.uint8 and sub.shape == (30, 6)
    for c in range(3):
        per_image = sub[:, parents == c].sum(axis=1)
        assert np.array_equal(per_image, labels[:, c].astype(np.uint8))  # exactly one sub-class per present parent
    assert (sub.sum(axis=0) > 0).all()  # every sub-class is used


def test_finch_gives_a_data_driven_partition_per_class():
    features, labels = blobs()
    sub, parents = subcategory.cluster_subcategories(features, labels, "finch", seed=0)
    assert set(parents.tolist()) == {0, 1}
    for c in (0, 1):
        assert np.array_equal(sub[:, parents == c].sum(axis=1), labels[:, c].astype(np.uint8))


def test_n_clusters_above_a_class_image_count_is_clamped_with_the_class_named(caplog):
    features, labels = blobs()
    with caplog.at_level(logging.WARNING, logger="core.cam.subcategory"):
        sub, parents = subcategory.cluster_subcategories(
            features, labels, "kmeans", n_clusters=19, class_names=["cat", "dog", "cow"]
        )
    # cat has 20 images (19 sub-classes), dog 18 (clamped to 18, one image each).
    assert (parents == 0).sum() == 19 and (parents == 1).sum() == 18
    assert any("dog has 18 images, fewer than --n_clusters 19: clamped to 18" in r.message for r in caplog.records)
    assert not any(r.message.startswith("cat") for r in caplog.records)


def test_id_check_names_missing_and_foreign_ids_and_lets_training_use_a_subset():
    with pytest.raises(
        WSSSError, match=r"^f does not match the dataset: 1 of the domain's 2 ids missing \(e\.g\. b\), "
    ):
        subcategory.check_same_ids(["a", "z"], ["a", "b"], "f", "fix it")
    subcategory.check_same_ids(["a", "b", "c"], ["a", "b"], "f", "fix it", allow_extra=True)  # train_aug -> train
    with pytest.raises(WSSSError, match="1 ids not in the domain"):
        subcategory.check_same_ids(["a", "b", "c"], ["a", "b"], "f", "fix it")


# -- loss and model -------------------------------------------------------------------------------------------------
def test_two_head_loss_with_zero_weight_is_the_vanilla_loss():
    torch.manual_seed(0)
    logits, sub_logits = torch.randn(4, 5), torch.randn(4, 12)
    labels, sub_labels = (torch.rand(4, 5) > 0.5).float(), (torch.rand(4, 12) > 0.5).float()
    loss, c_loss, s_loss = subcategory.subcategory_loss(logits, sub_logits, labels, sub_labels, 0.0)
    assert torch.equal(loss, multilabel_soft_margin(logits, labels)) and s_loss > 0
    five, _, _ = subcategory.subcategory_loss(logits, sub_logits, labels, sub_labels, 5.0)
    assert torch.allclose(five, c_loss + 5 * s_loss)


def test_two_head_weights_load_as_a_plain_classifier_with_the_same_cams():
    torch.manual_seed(0)
    model = SubcategoryClassifier("resnet18", 5, num_subclasses=12).eval()
    plain = Classifier("resnet18", 5).eval()
    load_classifier_weights(plain, model.state_dict())  # strict: only the sub-category head is dropped
    x = torch.randn(2, 3, 64, 64)
    logits, sub_logits, cams = model(x, with_cam=True, with_sub=True)
    plain_logits, plain_cams = plain(x, with_cam=True)
    assert torch.equal(logits, plain_logits) and torch.equal(cams, plain_cams) and sub_logits.shape == (2, 12)
    assert any(p is model.sub_classifier.weight for p in model.param_groups()["scratch_weights"])


def test_vit_backbone_gives_a_stride_16_map_of_any_size_and_never_downloads():
    backbone = build_backbone("test_vit").eval()
    (features,) = backbone(torch.randn(2, 3, 64, 40))
    assert features.shape == (2, backbone.out_channels, 4, 3) and backbone.output_stride == 16
    with pytest.raises(WSSSError, match="not downloaded.*--backbone_weights none"):
        build_backbone("test_vit", weights="imagenet")
    with pytest.raises(WSSSError, match="--dilated true does not apply"):
        build_backbone("test_vit", dilated=True)


# -- scripts --------------------------------------------------------------------------------------------------------
def train_flags(data_dir: Path, tag: str, *extra: str) -> list[str]:
    return [
        "--tag", tag, "--data_dir", str(data_dir), "--domain_train", "train_aug", "--architecture", "resnet18",
        "--backbone_weights", "none", "--batch_size", "8", "--max_epoch", "1", "--image_size", "48",
        "--min_image_size", "48", "--max_image_size", "64", "--num_workers", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def run_script(module, argv: list[str]) -> dict:
    return module.main(module.get_args_parser().parse_args(argv))


def cli_error(module, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(module.main, module.get_args_parser(), argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def save_random_classifier(tag: str, architecture: str = "resnet18", classes: int = 20) -> Path:
    torch.manual_seed(0)
    return checkpoint.save_weights(paths.final_weights_path(tag), Classifier(architecture, classes).state_dict())


def test_extract_cluster_train_infer_end_to_end(synthetic_voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = ["--data_dir", str(synthetic_voc), "--device", "cpu", "--num_workers", "0"]
    save_random_classifier("round0")
    save_random_classifier("teacher", "test_vit")

    features = run_script(
        extract_features, ["--tag", "round0", "--architecture", "resnet18", "--batch_size", "5", *data]
    )
    assert features["images"] == 36 and features["dimensions"] == 512
    again = run_script(extract_features, ["--tag", "round0", "--architecture", "resnet18", "--batch_size", "5", *data])
    assert again["skipped"]  # the finished file of the same flags and weights is kept
    loaded = subcategory.load_features(features["features_path"])
    assert loaded.features.dtype == np.float32 and loaded.labels.shape == (36, 20)
    teacher = run_script(extract_features, ["--tag", "teacher", "--teacher", "test_vit", "--image_size", "32", *data])
    assert teacher["dimensions"] == 64

    folder = str(Path(features["features_path"]).parent)
    kmeans = run_script(
        cluster_subcategories, ["--tag", "round0", "--features", folder, "--n_clusters", "2", *data[:2]]
    )
    sub = subcategory.load_sub_labels(kmeans["subcategories_path"])
    assert sub.method == "kmeans" and sub.num_subclasses == 2 * len(set(sub.parents.tolist()))
    finch = run_script(
        cluster_subcategories,
        ["--tag", "teacher", "--features", teacher["features_path"], "--clustering", "finch", *data[:2]],
    )
    assert Path(finch["subcategories_path"]).parent.name == "teacher@train_aug@finch=coarsest"

    summary = run_script(
        train_subcategory,
        train_flags(
            synthetic_voc, "sct", "--subcategories", finch["subcategories_path"], "--subcategory_weight", "2",
            "--knowledge_distillation", "true", "--teacher_weights", "experiments/models/teacher.pth",
            "--teacher_architecture", "test_vit",
        ),
    )  # fmt: skip
    assert {"train/c_loss", "train/sub_loss", "train/kd_loss"} <= set(summary)
    load_classifier_weights(Classifier("resnet18", 20), summary["final_path"])  # CAM inference's model
    written = run_script(cam_inference, ["--tag", "sct", "--architecture", "resnet18", "--scales", "1.0", *data])
    assert written["written"] == 24


def test_feature_file_of_another_domain_is_one_line(synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = build_source("voc12", synthetic_voc, "train")  # 24 of train_aug's 36 ids
    labels = np.stack([source.label(i) for i in source.ids])
    path = subcategory.save_features(
        tmp_path / "features.npz", FeatureFile(source.ids, np.ones((24, 4), np.float32), labels, "voc12", "train")
    )
    argv = ["--tag", "x", "--features", str(path), "--data_dir", str(synthetic_voc), "--domain", "train_aug"]
    err = cli_error(cluster_subcategories, argv, capsys)
    assert err.startswith(f"error: feature file {path} (extracted on voc12 train) does not match the dataset:")
    assert "12 of the domain's 36 ids missing" in err and "extract the features of --domain train_aug" in err
    assert not (tmp_path / "experiments").exists()


def test_teacher_of_another_class_count_is_one_line_before_any_folder(synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = build_source("voc12", synthetic_voc, "train_aug")
    sub = np.stack([source.label(i) for i in source.ids]).astype(np.uint8)  # one sub-class per class
    path = subcategory.save_sub_labels(
        tmp_path / "sub.npz", subcategory.SubLabels(source.ids, sub, np.arange(20), "kmeans", "voc12", "train_aug")
    )
    teacher = save_random_classifier("teacher3", "test_vit", classes=3)
    argv = train_flags(
        synthetic_voc, "sc", "--subcategories", str(path), "--knowledge_distillation", "true",
        "--teacher_weights", str(teacher), "--teacher_architecture", "test_vit",
    )  # fmt: skip
    err = cli_error(train_subcategory, argv, capsys)
    assert err == (
        f"error: --teacher_weights {teacher} is a 3-class classifier but the dataset has 20 classes: pass a teacher "
        "trained on this dataset (scripts/cam/train_vanilla.py)"
    )
    assert not (tmp_path / "experiments" / "models" / "sc").exists()


# -- learning -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_sc_round_learns_its_sub_categories(synthetic_voc, tmp_path, monkeypatch):
    """Round 0 = an untrained network: its features, k-means (K 3), then one SC-CAM round from scratch whose parent
    and sub-category losses must both fall clearly (CAM mIoU needs far longer runs: see the report/README)."""
    monkeypatch.chdir(tmp_path)
    data = ["--data_dir", str(synthetic_voc), "--device", "cpu", "--num_workers", "0"]
    save_random_classifier("round0")
    features = run_script(extract_features, ["--tag", "round0", "--architecture", "resnet18", *data])
    clusters = run_script(
        cluster_subcategories,
        ["--tag", "round0", "--features", features["features_path"], "--n_clusters", "3", *data[:2]],
    )
    argv = train_flags(
        synthetic_voc, "round1", "--subcategories", clusters["subcategories_path"], "--max_epoch", EPOCHS
    )
    run_script(train_subcategory, [*argv, "--batch_size", "12", "--optimizer", "adamw", "--lr", "0.001"])
    records = [json.loads(line) for line in Path("experiments/models/round1/metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    first, last = epochs[0], epochs[-1]
    assert last["train/sub_loss"] < 0.6 * first["train/sub_loss"], (first, last)
    assert last["train/c_loss"] < 0.8 * first["train/c_loss"], (first, last)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"METHOD": "scx"}, "error: unknown METHOD=scx (choose sc or sct)"),
        ({"SEED": "one"}, "error: SEED=one must be a non-negative integer"),
    ],
)
def test_runner_refuses_a_bad_setting_in_one_line(tmp_path, setting, message):
    env = os.environ | {"WORK_DIR": str(tmp_path), "DATASET": "synthetic", "NGPU": "1"} | setting
    done = commands.run(["bash", str(REPO / "runners" / "sc-cam.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == message
