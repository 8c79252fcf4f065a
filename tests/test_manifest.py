"""Provenance manifests: every output folder records what made it; a rerun with other flags or inputs refuses.

The chain under test is the one a user runs: train (tiny) -> CAM inference -> pseudo masks -> evaluation, then
retrain the model and rerun the later stages into the same folders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from core import checkpoint, cli, manifest, paths
from core.errors import WSSSError
from core.models import Classifier
from scripts import evaluate
from scripts.cam import inference as cam_inference
from scripts.cam import make_pseudo_masks, train_vanilla

pytestmark = pytest.mark.torch_threads(1)

FEW_IDS = 3


@pytest.fixture()
def work(tmp_path, monkeypatch, synthetic_voc):
    """A working folder with random weights experiments/models/r18.pth and a list of 3 training ids."""
    monkeypatch.chdir(tmp_path)
    save_random_weights(seed=0)
    ids = [line for line in (synthetic_voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()]
    (tmp_path / "few.txt").write_text("\n".join(ids[:FEW_IDS]) + "\n")
    return tmp_path


def save_random_weights(seed: int) -> Path:
    torch.manual_seed(seed)
    return checkpoint.save_weights(paths.final_weights_path("r18"), Classifier("resnet18", 20).state_dict())


def data_flags(data_dir: Path) -> list[str]:
    return ["--data_dir", str(data_dir), "--domain", "few.txt"]


def infer(data_dir: Path, *extra: str) -> dict:
    argv = ["--architecture", "resnet18", "--tag", "r18", "--scales", "1.0", "--num_workers", "0"]
    return cam_inference.main(cam_inference.get_args_parser().parse_args([*argv, *data_flags(data_dir), *extra]))


def make_masks(data_dir: Path, cams: str, *extra: str) -> dict:
    argv = ["--pred_dir", cams, "--num_workers", "1", *data_flags(data_dir), *extra]
    return make_pseudo_masks.main(make_pseudo_masks.get_args_parser().parse_args(argv))


def error_line(main, parser, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, parser, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cam_folder_records_weights_flags_counts_and_completion(work, synthetic_voc):
    summary = infer(synthetic_voc)
    out_dir = Path(summary["out_dir"])
    record = manifest.read_manifest(out_dir)
    weights = manifest.file_fingerprint(paths.final_weights_path("r18"))
    assert record["inputs"]["weights"]["sha256"] == weights["sha256"] and record["inputs"]["weights"]["bytes"] > 0
    assert record["script"] == "scripts/cam/inference.py" and record["stage"] == "cam"
    assert record["flags"]["scales"] == [1.0] and "num_workers" not in record["identity_flags"]
    assert record["counts"] == {"written": FEW_IDS, "skipped": 0, "excluded": 0}
    assert record["complete"] is True and record["finished"] >= record["started"]
    assert record["git_commit"] is None or len(record["git_commit"].split("+")[0]) == 40
    assert json.loads((out_dir / "args.json").read_text())["tag"] == "r18" and (out_dir / "log.txt").is_file()


def test_rerun_after_retraining_refuses_then_overwrite_rebuilds(work, synthetic_voc, capsys):
    first = infer(synthetic_voc)
    out_dir = Path(first["out_dir"])
    old_cam = (out_dir / sorted(p.name for p in out_dir.glob("*.npz"))[0]).read_bytes()

    save_random_weights(seed=1)  # the model was retrained: other weights under the same tag
    argv = ["--architecture", "resnet18", "--tag", "r18", "--scales", "1.0", "--num_workers", "0"]
    argv += data_flags(synthetic_voc)
    err = error_line(cam_inference.main, cam_inference.get_args_parser(), argv, capsys)
    assert "input weights changed" in err and "--overwrite true" in err and str(out_dir) in err
    assert (out_dir / sorted(p.name for p in out_dir.glob("*.npz"))[0]).read_bytes() == old_cam  # nothing touched

    again = infer(synthetic_voc, "--overwrite", "true")
    assert (again["written"], again["skipped"]) == (FEW_IDS, 0)
    assert (out_dir / sorted(p.name for p in out_dir.glob("*.npz"))[0]).read_bytes() != old_cam
    weights = manifest.file_fingerprint(paths.final_weights_path("r18"))
    assert manifest.read_manifest(out_dir)["inputs"]["weights"]["sha256"] == weights["sha256"]


def test_same_inputs_resume_and_operational_flags_do_not_matter(work, synthetic_voc):
    infer(synthetic_voc)
    again = infer(synthetic_voc, "--num_workers", "1")
    assert (again["written"], again["skipped"]) == (0, FEW_IDS)


def test_pseudo_masks_with_a_new_threshold_into_the_same_folder_refuse(work, synthetic_voc, capsys):
    cams = infer(synthetic_voc)["out_dir"]
    out = str(work / "masks")
    first = make_masks(synthetic_voc, cams, "--threshold", "0.25", "--output", out)
    assert first["written"] == FEW_IDS
    record = manifest.read_manifest(Path(out))
    assert record["inputs"]["cams"]["manifest_id"] == manifest.read_manifest(Path(cams))["id"]

    argv = ["--pred_dir", cams, "--num_workers", "1", "--threshold", "0.4", "--output", out]
    err = error_line(
        make_pseudo_masks.main, make_pseudo_masks.get_args_parser(), argv + data_flags(synthetic_voc), capsys
    )
    assert "--threshold 0.25 -> 0.4" in err and "--overwrite true" in err


def test_pseudo_masks_of_rebuilt_cams_refuse_to_keep_stale_masks(work, synthetic_voc, capsys):
    cams = infer(synthetic_voc)["out_dir"]
    make_masks(synthetic_voc, cams)
    save_random_weights(seed=1)
    infer(synthetic_voc, "--overwrite", "true")  # the CAM folder's own files go; its mask sub-folder stays

    argv = ["--pred_dir", cams, "--num_workers", "1", *data_flags(synthetic_voc)]
    err = error_line(make_pseudo_masks.main, make_pseudo_masks.get_args_parser(), argv, capsys)
    assert "input cams changed" in err


def test_outputs_without_a_manifest_are_of_unknown_origin(work, synthetic_voc, capsys):
    out_dir = paths.predictions_dir("r18", "few.txt", [1.0])
    out_dir.mkdir(parents=True)
    (out_dir / "2007_000001.npz").write_bytes(b"made elsewhere")
    argv = ["--architecture", "resnet18", "--tag", "r18", "--scales", "1.0", *data_flags(synthetic_voc)]
    err = error_line(cam_inference.main, cam_inference.get_args_parser(), argv, capsys)
    assert "no manifest.json" in err and "--overwrite true" in err
    assert (out_dir / "2007_000001.npz").read_bytes() == b"made elsewhere"


def test_evaluation_header_names_the_model_that_made_the_cams(work, synthetic_voc, caplog):
    cams = infer(synthetic_voc)["out_dir"]
    argv = ["--pred_dir", cams, "--num_workers", "1", *data_flags(synthetic_voc)]
    with caplog.at_level(logging.INFO):
        summary = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    made_by = summary["protocol"]["made_by"]
    assert "scripts/cam/inference.py from experiments/models/r18.pth" in made_by and "complete" in made_by
    assert "made_by" in caplog.text
    results = paths.evaluation_dir(cams)
    assert json.loads((results / "results.json").read_text())["miou"] == summary["miou"]
    assert (
        manifest.read_manifest(results)["inputs"]["predictions"]["manifest_id"]
        == manifest.read_manifest(Path(cams))["id"]
    )


def training_flags(data_dir: Path, *extra: str) -> list[str]:
    return [
        "--tag", "vanilla/m", "--data_dir", str(data_dir), "--domain_train", "train_aug", "--architecture",
        "resnet18", "--backbone_weights", "none", "--batch_size", "8", "--max_epoch", "1", "--image_size", "32",
        "--min_image_size", "32", "--max_image_size", "40", "--num_workers", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def test_training_run_folder_records_its_final_weights(synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    summary = train_vanilla.main(train_vanilla.get_args_parser().parse_args(training_flags(synthetic_voc)))
    record = manifest.read_manifest(paths.run_dir("vanilla/m"))
    assert record["complete"] and record["script"] == "scripts/cam/train_vanilla.py"
    assert record["outputs"]["weights"]["sha256"] == manifest.file_fingerprint(summary["final_path"])["sha256"]
    assert record["context"]["data_dir"] == str(synthetic_voc)


def test_resume_with_other_flags_refuses(synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parser = train_vanilla.get_args_parser()
    argv = training_flags(synthetic_voc, "--max_epoch", "2")

    def die_after_first_epoch(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr("core.engine.state.save_checkpoint", _save_then(die_after_first_epoch))
    with pytest.raises(KeyboardInterrupt):
        train_vanilla.main(parser.parse_args(argv))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    err = error_line(train_vanilla.main, parser, [*argv, "--resume", "true", "--lr", "0.5"], capsys)
    assert "--lr 0.1 -> 0.5" in err and "--overwrite true" in err


def _save_then(action):
    from core.engine import state

    save = state.save_checkpoint

    def wrapped(ctx):
        save(ctx)
        action(ctx)

    return wrapped


def test_provenance_id_follows_identity_flags_and_inputs():
    base = manifest.Provenance("cam", "scripts/cam/inference.py", {"scales": [1.0], "num_workers": 4})
    same = manifest.Provenance("cam", "scripts/cam/inference.py", {"scales": [1.0], "num_workers": 0})
    other = manifest.Provenance("cam", "scripts/cam/inference.py", {"scales": [0.5], "num_workers": 4})
    retrained = manifest.Provenance(
        "cam", "scripts/cam/inference.py", {"scales": [1.0]}, inputs={"weights": {"path": "a.pth", "sha256": "x"}}
    )
    assert base.id == same.id and base.id != other.id and base.id != retrained.id
    assert "--scales 1.0 -> 0.5" in manifest.describe_changes(base.record("t"), other)


def test_unreadable_manifest_is_one_line(tmp_path):
    (tmp_path / manifest.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(WSSSError, match="cannot read"):
        manifest.read_manifest(tmp_path)
