"""DeepLabV3+ (core/segmentation, scripts/segmentation, tools/export_voc_test.py) on the synthetic VOC tree:
network shapes and keys, the reference layouts, flip TTA, the label-folder check, train -> inference -> evaluate,
domains without ground truth, the VOC test export; resnet18, random weights, 64 px, CPU."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

import commands
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core import cli
from core.artifacts import load_label_map, save_label_map
from core.datasets import SegmentationDataset, build_source
from core.errors import WSSSError
from core.models import load_classifier_weights
from core.segmentation.network import DeepLabV3Plus
from core.segmentation.predict import multiscale_probs
from core.segmentation.training import validate_segmentation
from scripts import evaluate
from scripts.segmentation import inference, train
from tools import export_voc_test

pytestmark = pytest.mark.torch_threads(2)

REPO = Path(__file__).resolve().parents[1]


def small(**kwargs) -> DeepLabV3Plus:
    torch.manual_seed(0)
    return DeepLabV3Plus("resnet18", kwargs.pop("num_classes", 6), **kwargs).eval()


# -- the network -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dilated", "stride", "rates"), [(False, 16, (1, 6, 12, 18)), (True, 8, (1, 12, 24, 36))])
def test_aspp_rates_follow_the_output_stride(dilated, stride, rates):
    model = small(dilated=dilated)
    assert model.output_stride == stride
    assert tuple(getattr(model.aspp, f"aspp{i}").atrous_conv.dilation[0] for i in range(1, 5)) == rates
    assert model.aspp.aspp1.atrous_conv.kernel_size == (1, 1)
    assert model.decoder.conv1.in_channels == model.backbone.stage_channels[1]  # layer1 features (64 for resnet18)


@pytest.mark.parametrize("use_gn", [True, False])
def test_output_has_the_input_size_and_the_chosen_norm(use_gn):
    model = small(use_gn=use_gn)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 37, 50))
    assert logits.shape == (2, 6, 37, 50)
    norm = nn.GroupNorm if use_gn else nn.BatchNorm2d
    assert isinstance(model.aspp.bn1, norm) and isinstance(model.decoder.classifier[5], norm)
    if use_gn:
        assert model.decoder.bn1.num_groups == 4
    keys = set(model.state_dict())
    assert {"aspp.global_avg_pool.1.weight", "aspp.global_avg_pool.2.weight", "decoder.classifier.8.bias"} <= keys
    assert ("aspp.bn1.running_mean" in keys) is not use_gn
    assert {name for name in model.param_groups()} == {
        "pretrained_weights",
        "pretrained_biases",
        "scratch_weights",
        "scratch_biases",
    }


def reference_layouts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The three P-NOC layouts of SPEC §2.4 (and a DataParallel prefix) of a current state dict."""
    stage_of = {"conv1.": "stage1.0.", "bn1.": "stage1.1.", "layer1.": "stage2.0.", "layer2.": "stage3.0."}
    stage_of |= {"layer3.": "stage4.0.", "layer4.": "stage5.0."}

    def staged(key: str) -> str:
        native = key[len("backbone.") :]
        return next(new + native[len(old) :] for old, new in stage_of.items() if native.startswith(old))

    heads = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    stages = {staged(k): v for k, v in backbone.items()}
    return {
        "2023-10": {"model." + k[len("backbone.") :]: v for k, v in backbone.items()} | stages | heads,
        "2024-02": stages | heads,
        "current+module": {"module." + k: v for k, v in state.items()},
    }


def test_every_reference_layout_loads():
    state = small().state_dict()
    for name, layout in reference_layouts(state).items():
        fresh = DeepLabV3Plus("resnet18", 6).eval()
        load_classifier_weights(fresh, layout)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items()), name


def test_checkpoint_of_another_class_count_is_refused_in_one_line(tmp_path):
    path = tmp_path / "d3p-21.pth"
    torch.save(DeepLabV3Plus("resnet18", 21).state_dict(), path)
    with pytest.raises(WSSSError) as error:
        load_classifier_weights(DeepLabV3Plus("resnet18", 6), path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "21-class" in message and "DeepLabV3+" in message and "6 classes (background included)" in message


def test_flip_tta_is_mirror_invariant_on_a_symmetric_image():
    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, size=(40, 24, 3), dtype=np.uint8)
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # 40 x 48, mirror-symmetric
    probs = multiscale_probs(small(), image, (0.5, 1.0, 1.5), device="cpu")
    assert probs.shape == (6, 40, 48)
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 48))
    torch.testing.assert_close(probs, probs.flip(-1), atol=1e-5, rtol=1e-4)


# -- training, inference, evaluation ---------------------------------------------------------------------------------


def train_flags(data_dir: Path, tag: str, *extra: str) -> list[str]:
    return [
        "--tag", tag, "--data_dir", str(data_dir), "--domain_train", "val", "--domain_valid", "val",
        "--architecture", "resnet18", "--backbone_weights", "none", "--batch_size", "12", "--max_epoch", "1",
        "--image_size", "64", "--min_image_size", "56", "--max_image_size", "72", "--num_workers", "0",
        "--device", "cpu", "--optimizer", "momentum", "--lr", "0.01", *extra,
    ]  # fmt: skip


def test_train_infer_evaluate_and_export(synthetic_voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--augment", "colorjitter,cutmix", "--label_smoothing", "0.1", "--final_weights", "best"]
    args = train.get_args_parser().parse_args(train_flags(synthetic_voc, "seg/r18", *extra))
    summary = train.main(args)
    run_dir = tmp_path / "experiments/models/seg/r18"
    assert {"last.pth", "best.pth", "manifest.json", "metrics.jsonl"} <= {p.name for p in run_dir.iterdir()}
    final = tmp_path / "experiments/models/seg/r18.pth"
    assert final.read_bytes() == (run_dir / "best.pth").read_bytes()  # --final_weights best
    assert 0 <= summary["val/miou"] <= 100 and summary["best_epoch"] == 1

    common = ["--tag", "seg/r18", "--data_dir", str(synthetic_voc), "--architecture", "resnet18"]
    common += ["--num_workers", "0", "--device", "cpu", "--scale", "1.0,0.5", "--flip", "false"]
    result = inference.main(inference.get_args_parser().parse_args([*common, "--domain", "val"]))
    out_dir = Path(result["out_dir"])
    assert out_dir == Path("experiments/predictions/seg/r18@val@scale=1.0,0.5")
    assert result["written"] == 12 and (out_dir / "manifest.json").is_file()
    prediction = load_label_map(next(out_dir.glob("*.png")))
    assert prediction.shape == (64, 64) and prediction.max() <= 5
    assert Image.open(next(out_dir.glob("*.png"))).mode == "P"
    again = inference.main(inference.get_args_parser().parse_args([*common, "--domain", "val"]))
    assert again["written"] == 0 and again["skipped"] == 12  # resumed: nothing redone

    scores = evaluate.main(
        evaluate.get_args_parser().parse_args(
            ["--data_dir", str(synthetic_voc), "--domain", "val", "--mode", "png", "--pred_dir", str(out_dir)]
            + ["--num_workers", "1"]
        )
    )
    assert 0 <= scores["miou"] <= 100

    exported = export_voc_test.main(
        export_voc_test.get_args_parser().parse_args(
            ["--data_dir", str(synthetic_voc), "--domain", "val", "--pred_dir", str(out_dir), "--out", "export"]
        )
    )
    assert exported["exported"] == 12
    with tarfile.open(exported["archive"]) as tar:
        names = tar.getnames()
    assert sum(n.startswith("results/VOC2012/Segmentation/comp6_test_cls/") and n.endswith(".png") for n in names) == 12

    # The VOC reader gives 21 classes; those weights do not load into a network of another class count.
    other = DeepLabV3Plus("resnet18", 6)
    with pytest.raises(WSSSError, match="21-class"):
        load_classifier_weights(other, tmp_path / "experiments/models/seg/r18.pth")


def tree_with_test_domain(synthetic_voc: Path, tmp_path: Path) -> Path:
    """A copy of the tree with a ``test`` list of three images that have neither a mask nor an annotation."""
    root = tmp_path / "VOC2012"
    shutil.copytree(synthetic_voc, root)
    ids = [line.strip() for line in (root / "ImageSets/Segmentation/val.txt").read_text().splitlines()][:3]
    test_ids = [f"test_{i}" for i in range(3)]
    for image_id, test_id in zip(ids, test_ids, strict=True):
        shutil.copy(root / "JPEGImages" / f"{image_id}.jpg", root / "JPEGImages" / f"{test_id}.jpg")
    (root / "ImageSets/Segmentation/test.txt").write_text("\n".join(test_ids) + "\n")
    return root


def test_test_domain_without_ground_truth(synthetic_voc, tmp_path, monkeypatch):
    root = tree_with_test_domain(synthetic_voc, tmp_path)
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "d3p.pth"
    torch.save(small().state_dict(), weights)
    flags = ["--tag", "seg/test", "--weights", str(weights), "--data_dir", str(root), "--domain", "test"]
    flags += ["--architecture", "resnet18", "--num_workers", "0", "--device", "cpu", "--scale", "1.0"]
    # The dataset reader decides the class count: a 6-class network (5 synthetic classes) is not VOC's 21.
    with pytest.raises(WSSSError, match="21 classes"):
        inference.main(inference.get_args_parser().parse_args(flags))
    assert not (tmp_path / "experiments").exists()  # refused before any folder was made
    torch.save(DeepLabV3Plus("resnet18", 21).state_dict(), weights)
    result = inference.main(inference.get_args_parser().parse_args(flags))
    assert result["written"] == 3
    assert sorted(p.stem for p in Path(result["out_dir"]).glob("*.png")) == ["test_0", "test_1", "test_2"]
    with pytest.raises(WSSSError) as error:
        evaluate.main(
            evaluate.get_args_parser().parse_args(
                ["--data_dir", str(root), "--domain", "test", "--mode", "png", "--pred_dir", result["out_dir"]]
            )
        )
    assert "\n" not in str(error.value)


# -- the label-folder check ------------------------------------------------------------------------------------------


def label_folder_copy(source, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for image_id in source.ids:
        save_label_map(folder / f"{image_id}.png", source.read_mask(image_id))
    return folder


def broken(kind: str, folder: Path, ids: list[str]) -> str:
    """Break the label folder one way; returns a text the refusal must contain."""
    first = folder / f"{ids[0]}.png"
    if kind == "missing":
        first.unlink()
        return ids[0]
    if kind == "size":
        save_label_map(first, np.zeros((32, 32), np.uint8) + 1)
        return first.name
    if kind == "values":
        Image.fromarray(np.full((64, 64), 77, np.uint8), mode="L").save(first)
        return first.name
    for image_id in ids:  # all black
        save_label_map(folder / f"{image_id}.png", np.zeros((64, 64), np.uint8))
    return "almost all background"


@pytest.mark.parametrize("kind", ["missing", "size", "values", "black"])
def test_broken_label_folders_are_refused_in_one_line_before_any_folder(kind, synthetic_voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = build_source("voc12", synthetic_voc, "val")
    folder = label_folder_copy(source, tmp_path / "experiments/predictions/pseudo")
    expected = broken(kind, folder, source.ids)
    args = train.get_args_parser().parse_args(train_flags(synthetic_voc, "seg/broken", "--label_name", "pseudo"))
    with pytest.raises(WSSSError) as error:
        train.main(args)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "experiments/models/seg").exists()


# -- learning ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deeplab_trained_on_synthetic_gt_beats_an_untrained_network(synthetic_voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = train_flags(synthetic_voc, "seg/learn", "--optimizer", "adamw", "--lr", "0.001", "--lr_alpha_scratch", "1")
    flags += ["--domain_train", "train", "--batch_size", "4", "--max_epoch", "8", "--min_image_size", "64"]
    flags += ["--max_image_size", "64", "--print_ratio", "1"]
    args = train.get_args_parser().parse_args(flags)
    summary = train.main(args)

    source = build_source("voc12", synthetic_voc, "val")
    loader = torch.utils.data.DataLoader(SegmentationDataset(source, None), batch_size=1)
    torch.manual_seed(0)
    untrained = validate_segmentation(DeepLabV3Plus("resnet18", 21), loader, torch.device("cpu"), source.classes)
    assert summary["val/miou"] > untrained["miou"] + 5, (summary["val/miou"], untrained["miou"])
    assert summary["val/miou_fg"] > 1  # foreground classes are found, not only the background prior


def test_runner_refuses_a_missing_label_folder_naming_the_stage_to_run(tmp_path):
    env = os.environ | {"WORK_DIR": str(tmp_path), "DATASET": "synthetic", "LABEL_NAME": "rw/none@train", "NGPU": "1"}
    done = commands.run(
        ["bash", str(REPO / "runners" / "4-segmentation.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "experiments/predictions/rw/none@train" in done.stderr and "3-rw.sh" in done.stderr
    assert not (tmp_path / "experiments" / "models").exists()


def test_benchmark_seg_reports_positive_rates_beside_limits(capsys):
    from tools import benchmark

    flags = ["seg", "--architecture", "resnet18", "--size", "32", "--batch_size", "2", "--steps", "1", "--warmup", "0"]
    result = benchmark.main(benchmark.get_args_parser().parse_args([*flags, "--scales", "1.0", "--device", "cpu"]))
    assert set(result["stages"]) == {"train", "inference"}
    for stage in result["stages"].values():
        assert stage["images_per_s"] > 0 and stage["limit"]["images_per_s"] > 0
    assert '"benchmark": "seg"' in capsys.readouterr().out


# -- multi-process ----------------------------------------------------------------------------------------------------


def test_two_processes_train_like_one_process_with_the_same_global_batch(synthetic_voc, tmp_path):
    """torchrun with 2 CPU processes (gloo) and one process, global batches of 4 images, 2 per optimizer step: the
    same weights (the loss is one mean over the global batch's labelled pixels). Frozen backbone BatchNorm (--mode
    fix) and the GroupNorm head: per-process BatchNorm statistics would differ from the global batch's on CPU, where
    SyncBatchNorm does not run."""
    flags = train_flags(synthetic_voc, "ddp", "--mode", "fix", "--use_gn", "true", "--batch_size", "4")
    flags += ["--accumulate_steps", "2", "--domain_train", "train", "--validate", "false", "--image_size", "48"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *flags]
    done = commands.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = [f if f != "ddp" else "single" for f in flags]
    done = commands.run([sys.executable, __file__, *single], cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(tmp_path / "experiments/models/ddp.pth", weights_only=True)
    one = torch.load(tmp_path / "experiments/models/single.pth", weights_only=True)
    start = DeepLabV3Plus("resnet18", 21, use_gn=True).state_dict()
    norms = [k for k in start if k.startswith(("aspp", "decoder")) and k.endswith("weight") and start[k].ndim == 1]
    assert norms and all(torch.all(start[k] == 1) and not torch.equal(one[k], start[k]) for k in norms)  # γ trained
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


def _deterministic_worker() -> None:
    # Each process draws its own augmentation and dropout streams: with a fixed resize-and-crop and no dropout the
    # two runs see the same pixels and the same network, so only the splitting of the batch differs.
    from core.datasets import transforms
    from core.segmentation import training

    training.build_segmentation_transform = lambda low, high, crop, augment: transforms.build_validation_transform(crop)
    nn.Dropout.forward = lambda self, x: x
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cli.run(train.main, train.get_args_parser())


if __name__ == "__main__":
    _deterministic_worker()
