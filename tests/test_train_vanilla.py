"""scripts/cam/train_vanilla.py end to end on the synthetic VOC tree (resnet18, random weights, CPU, 1 epoch)."""

from __future__ import annotations

import json
import math

import pytest

from core import cli
from core.models import Classifier, load_classifier_weights
from scripts.cam import train_vanilla

pytestmark = pytest.mark.torch_threads(2)


def flags(data_dir, *extra: str) -> list[str]:
    return [
        "--tag", "vanilla/synthetic-r18", "--data_dir", str(data_dir), "--domain_train", "train_aug",
        "--architecture", "resnet18", "--backbone_weights", "none", "--batch_size", "8", "--max_epoch", "1",
        "--image_size", "48", "--min_image_size", "48", "--max_image_size", "64", "--num_workers", "0",
        "--device", "cpu", "--lr", "0.01", *extra,
    ]  # fmt: skip


def test_one_epoch_writes_loadable_weights_and_validation_metrics(synthetic_voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train_vanilla.get_args_parser().parse_args(
        flags(
            synthetic_voc,
            "--validate",
            "true",
            "--validate_max_steps",
            "2",
            "--label_smoothing",
            "0.1",
            "--augment",
            "colorjitter",
            "--class_weight",
            ",".join(["1"] * 20),
        )
    )
    summary = train_vanilla.main(args)

    final = tmp_path / "experiments" / "models" / "vanilla" / "synthetic-r18.pth"
    assert (tmp_path / summary["final_path"]).resolve() == final.resolve()
    model = Classifier("resnet18", 20)
    load_classifier_weights(model, final)  # strict: every key and shape of the inference-time model
    run_dir = final.with_suffix("")
    assert {"last.pth", "args.json", "log.txt", "metrics.jsonl"} <= {p.name for p in run_dir.iterdir()}
    assert json.loads((run_dir / "args.json").read_text())["architecture"] == "resnet18"

    # 36 train_aug images, global batch 8 -> 4 steps (last partial batch dropped).
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"]
    assert len(epoch) == 1 and epoch[0]["step"] == 4
    # With smoothing 0.1 the targets lie in {0.05, 0.95}: the loss cannot drop below their entropy (≈ 0.199).
    assert 0.19 < summary["train/loss"] < 5.0
    assert 0 <= summary["val/miou"] <= 100 and 0 <= summary["val/miou_fg"] <= 100
    assert min(abs(summary["val/threshold"] - t) for t in (0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45)) < 1e-9
    assert not math.isnan(summary["val/recall"])
    assert set(summary["val/iou"]) >= {"background"}


def test_bad_class_weight_and_existing_output_are_one_line_errors(synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_vanilla.main, train_vanilla.get_args_parser(), flags(synthetic_voc, "--class_weight", "1,2,3"))
    assert exit_info.value.code == 2
    assert "error: --class_weight has 3 values but the dataset has 20 classes" in capsys.readouterr().err

    final = tmp_path / "experiments" / "models" / "vanilla" / "synthetic-r18.pth"
    final.write_bytes(b"earlier")
    with pytest.raises(SystemExit):
        cli.run(train_vanilla.main, train_vanilla.get_args_parser(), flags(synthetic_voc, "--overwrite", "false"))
    assert "synthetic-r18.pth already exists" in capsys.readouterr().err
    assert final.read_bytes() == b"earlier"
