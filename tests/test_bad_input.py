"""Bad input found when the CAM stage was tried as a new user would (issue 7): every case ends in one clear line,
exit status 2, and damages nothing already written."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_training import ToyImages, bce_step, parse, toy_model

from core import artifacts, checkpoint, cli, engine, paths, runlog, runtime
from core.artifacts import atomic_write, cam_path, load_cam, save_cam
from core.datasets import build_source
from core.errors import WSSSError
from core.evaluation import evaluate_predictions
from core.models import Classifier, load_classifier_weights, read_checkpoint
from core.optim import PolyLR
from scripts import evaluate
from scripts.cam import inference as cam_inference
from scripts.cam import make_pseudo_masks, train_vanilla
from tools import visualize

pytestmark = pytest.mark.torch_threads(1)
REPO = Path(__file__).resolve().parents[1]


def cli_error(main, parser, argv, capsys) -> str:
    """Run a script through cli.run; assert exit status 2 and return stderr's last line (the error)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, parser, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err, "no error message"
    return err.splitlines()[-1]


def save_raw_cam(path: Path, keys, hr_cam, cam=None, version: int | None = artifacts.CAM_FORMAT_VERSION) -> Path:
    """A CAM file written by other code (no checks, optional format_version)."""
    hr_cam = np.asarray(hr_cam, dtype=np.float32)
    if cam is None:
        cam = hr_cam[:, ::4, ::4]
    content = {"keys": np.asarray(keys, dtype=np.int64), "cam": np.asarray(cam, np.float32), "hr_cam": hr_cam}
    if version is not None:
        content["format_version"] = np.int64(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **content)
    return path


# --------------------------------------------------------------------------------------------------------------------
# A toy training run (tests/toy_training.py)
# --------------------------------------------------------------------------------------------------------------------


def toy_args(tag: str, *extra: str) -> argparse.Namespace:
    return parse(tag, "--batch_size", "2", *extra)


def toy_train(models_dir: Path, args: argparse.Namespace, step_fn=bce_step, also_save=None, second=False):
    run = runtime.setup(args, "test", models_dir=models_dir)
    try:
        loader = engine.build_loader(ToyImages(8), run, train=True)
        ctx = engine.TrainContext(run, len(loader))
        for name in ("cg", "oc") if second else ("cg",):
            model = toy_model()
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
            ctx.add(name, model, optimizer, PolyLR(optimizer, ctx.total_optimizer_steps))
        extra = {} if also_save is None else {"also_save": also_save}
        return engine.fit(ctx, loader, step_fn, **extra)
    finally:
        run.close()


# --------------------------------------------------------------------------------------------------------------------
# 1. --resume true on a finished run
# --------------------------------------------------------------------------------------------------------------------


def test_resume_of_a_finished_run_is_refused_and_leaves_the_final_weights(tmp_path):
    toy_train(tmp_path, toy_args("done", "--max_epoch", "1"))
    final = tmp_path / "done.pth"
    before = final.read_bytes()
    with pytest.raises(WSSSError) as info:
        toy_train(tmp_path, toy_args("done", "--max_epoch", "1", "--resume", "true"))
    message = str(info.value)
    assert "done.pth" in message and "finished" in message and "--overwrite true" in message and "\n" not in message
    assert final.read_bytes() == before


# --------------------------------------------------------------------------------------------------------------------
# 2. flags checked before any folder is created; strict lists
# --------------------------------------------------------------------------------------------------------------------


def vanilla_flags(data_dir, *extra: str) -> list[str]:
    return [
        "--tag", "vanilla/bad", "--data_dir", str(data_dir), "--domain_train", "train", "--architecture", "resnet18",
        "--backbone_weights", "none", "--batch_size", "8", "--max_epoch", "1", "--image_size", "48",
        "--num_workers", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "flag, value",
    [("--max_epoch", "0"), ("--max_epoch", "-1"), ("--image_size", "0"), ("--validate_thresholds", "0.1,,0.2")],
)
def test_bad_training_flags_fail_before_any_folder(flag, value, synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = cli_error(
        train_vanilla.main, train_vanilla.get_args_parser(), vanilla_flags(synthetic_voc, flag, value), capsys
    )
    assert flag in err
    assert not (tmp_path / "experiments").exists()


def test_tag_with_a_trailing_slash_is_refused_before_any_folder(synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [*vanilla_flags(synthetic_voc), "--tag", "trail/"]
    err = cli_error(train_vanilla.main, train_vanilla.get_args_parser(), argv, capsys)
    assert (
        err
        == "error: --tag 'trail/' must not end with '/' or have a part starting with '.' (it would name a hidden file)"
    )
    assert not (tmp_path / "experiments").exists()


def inference_flags(data_dir, *extra: str) -> list[str]:
    return [
        "--architecture", "resnet18", "--tag", "r18", "--data_dir", str(data_dir), "--domain", "train",
        "--device", "cpu", "--num_workers", "0", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("scales", ["0.001", "1.0,,2.0", "1.0,", "nan", "1.0,inf"])
def test_bad_scales_fail_before_any_folder(scales, synthetic_voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint.save_weights(paths.final_weights_path("r18"), Classifier("resnet18", 20).state_dict())
    argv = inference_flags(synthetic_voc, "--scales", scales)
    err = cli_error(cam_inference.main, cam_inference.get_args_parser(), argv, capsys)
    assert "--scales" in err
    assert not (tmp_path / "experiments" / "predictions").exists()


def test_list_flags_are_strict():
    for text in ("1.0,,2.0", ",1.0", "1.0,", "", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.float_list(text)
    assert cli.float_list(" 0.5, 1.0 ,2") == [0.5, 1.0, 2.0]
    with pytest.raises(argparse.ArgumentTypeError):
        cli.str_list("a,,b")
    assert cli.str_list("a, b") == ["a", "b"]


# --------------------------------------------------------------------------------------------------------------------
# 3. CAM thresholds lie in [0, 1]
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [("--threshold", "1.5"), ("--threshold", "-0.1"), ("--threshold", "nan"), ("--max_th", "2.0"), ("--min_th", "-1")],
)
def test_evaluate_thresholds_outside_0_1_are_refused(extra, synthetic_voc, tmp_path, capsys):
    argv = ["--data_dir", str(synthetic_voc), "--domain", "train", "--pred_dir", str(tmp_path), *extra]
    err = cli_error(evaluate.main, evaluate.get_args_parser(), argv, capsys)
    assert extra[0] in err and "[0, 1]" in err


@pytest.mark.parametrize("extra", [("--threshold", "1.5"), ("--threshold", "nan"), ("--bg_threshold", "-0.1")])
def test_pseudo_mask_thresholds_outside_0_1_are_refused(extra, synthetic_voc, tmp_path, capsys):
    argv = ["--data_dir", str(synthetic_voc), "--domain", "train", "--pred_dir", str(tmp_path), *extra]
    err = cli_error(make_pseudo_masks.main, make_pseudo_masks.get_args_parser(), argv, capsys)
    assert extra[0] in err and "[0, 1]" in err
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------------------
# 4. one validation of a loaded CAM file, used by every reader
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def few(tmp_path, monkeypatch, synthetic_voc, perfect_cams):
    """4 train ids in few.txt, their perfect CAM files in cams/, cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    source = build_source("voc12", synthetic_voc, "train")
    ids = source.ids[:4]
    (tmp_path / "few.txt").write_text("\n".join(ids) + "\n")
    perfect_cams(source, tmp_path / "cams", ids)
    return ids


def _few_flags(data_dir, tmp_path, *extra):
    return [
        "--data_dir",
        str(data_dir),
        "--domain",
        str(tmp_path / "few.txt"),
        "--pred_dir",
        str(tmp_path / "cams"),
        *extra,
    ]


@pytest.mark.parametrize("bad", ["nan", "above_one", "keys_vs_planes", "duplicate_keys"])
def test_cam_files_with_bad_values_are_refused_by_evaluation(bad, few, synthetic_voc, tmp_path, capsys):
    path = tmp_path / "cams" / f"{few[1]}.npz"
    with np.load(path) as data:
        keys, hr_cam = data["keys"], data["hr_cam"].copy()
    cam = None
    if bad == "nan":
        hr_cam[0, 0, 0] = np.nan
    elif bad == "above_one":
        hr_cam[0] *= 1.5
        hr_cam[0, 0, 0] = 1.5
    elif bad == "keys_vs_planes":
        keys = np.concatenate([keys, [keys.max() + 1]])
    else:
        keys, hr_cam = np.concatenate([keys, keys]), np.concatenate([hr_cam, hr_cam])
    save_raw_cam(path, keys, hr_cam, cam)
    err = cli_error(evaluate.main, evaluate.get_args_parser(), _few_flags(synthetic_voc, tmp_path), capsys)
    assert err.startswith("error: ") and f"{few[1]}.npz" in err


def test_pseudo_masks_refuse_a_cam_of_another_size_without_crf(few, synthetic_voc, tmp_path, capsys):
    path = tmp_path / "cams" / f"{few[2]}.npz"
    with np.load(path) as data:
        keys = data["keys"]
    save_cam(path, keys, np.zeros((len(keys), 12, 8)), np.zeros((len(keys), 48, 32)))
    out = tmp_path / "masks"
    argv = _few_flags(synthetic_voc, tmp_path, "--output", str(out), "--num_workers", "1")
    err = cli_error(make_pseudo_masks.main, make_pseudo_masks.get_args_parser(), argv, capsys)
    assert f"{few[2]}.npz" in err and "48x32" in err and "64x64" in err
    assert not (out / f"{few[2]}.png").exists()


def test_visualize_refuses_a_cam_with_values_above_one(few, synthetic_voc, tmp_path, capsys):
    path = tmp_path / "cams" / f"{few[0]}.npz"
    with np.load(path) as data:
        save_raw_cam(path, data["keys"], data["hr_cam"] * 3)
    argv = [
        "--data_dir",
        str(synthetic_voc),
        "--domain",
        str(tmp_path / "few.txt"),
        "--cam_dir",
        str(tmp_path / "cams"),
    ]
    err = cli_error(visualize.main, visualize.get_args_parser(), [*argv, "--out", str(tmp_path / "v.png")], capsys)
    assert f"{few[0]}.npz" in err and "[0, 1]" in err


def test_load_cam_checks_size_and_class_count(tmp_path):
    hr_cam = np.random.default_rng(0).random((1, 20, 24)).astype(np.float32)
    path = save_cam(tmp_path / "a.npz", [3], hr_cam[:, ::4, ::4], hr_cam)
    assert load_cam(path, size=(20, 24), num_classes=3).keys.tolist() == [3]
    with pytest.raises(WSSSError, match=r"20x24.*30x24"):
        load_cam(path, size=(30, 24))
    with pytest.raises(WSSSError, match=r"keys \[3\].*2 classes"):
        load_cam(path, num_classes=2)


# --------------------------------------------------------------------------------------------------------------------
# 5. unwritable outputs and failing writes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, words", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")]
)
def test_write_failures_in_atomic_write_are_one_line(code, words, tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(WSSSError) as info:
        with atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise OSError(code, "simulated")
    message = str(info.value)
    assert str(target) in message and words in message and "\n" not in message
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_torch_save_is_one_line(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"x")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WSSSError, match=r"cannot write .*w\.pth.*disk"):
        checkpoint.save_weights(tmp_path / "w.pth", {"a": torch.zeros(2)})
    assert not list(tmp_path.iterdir())


def test_evaluate_json_to_an_unwritable_path_fails_before_the_work(synthetic_voc, tmp_path, capsys, caplog):
    (tmp_path / "blocker").write_text("a file, not a folder")
    argv = ["--data_dir", str(synthetic_voc), "--domain", "train", "--pred_dir", str(tmp_path / "nowhere")]
    caplog.set_level(logging.INFO)
    err = cli_error(
        evaluate.main, evaluate.get_args_parser(), [*argv, "--json", str(tmp_path / "blocker/r.json")], capsys
    )
    assert "--json" in err and "blocker" in err
    assert "evaluation of" not in caplog.text


def test_unwritable_output_folders_are_refused_up_front(few, synthetic_voc, tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    argv = _few_flags(synthetic_voc, tmp_path, "--output", str(tmp_path / "blocker" / "masks"))
    err = cli_error(make_pseudo_masks.main, make_pseudo_masks.get_args_parser(), argv, capsys)
    assert "blocker" in err and "--output" in err
    checkpoint.save_weights(paths.final_weights_path("r18"), Classifier("resnet18", 20).state_dict())
    argv = inference_flags(synthetic_voc, "--pred_dir", str(tmp_path / "blocker" / "cams"))
    err = cli_error(cam_inference.main, cam_inference.get_args_parser(), argv, capsys)
    assert "blocker" in err and "--pred_dir" in err


def test_check_writable(tmp_path):
    assert artifacts.check_writable(tmp_path / "new" / "deeper" / "file.json") is None
    assert not (tmp_path / "new").exists()  # nothing created
    (tmp_path / "f").write_text("x")
    with pytest.raises(WSSSError, match=r"--out .*f"):
        artifacts.check_writable(tmp_path / "f" / "x.png", "--out")


# --------------------------------------------------------------------------------------------------------------------
# 6. unreadable weights and class-count mismatches
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), b"hello\n"]
)
def test_weights_that_are_not_pytorch_files(content, tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(WSSSError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "w.pth" in message and "not a PyTorch" in message
    assert "pickled" not in message and "--trust_checkpoint" not in message


def test_inference_class_count_mismatch_names_the_dataset_and_weights_flags(
    synthetic_voc, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    checkpoint.save_weights(paths.final_weights_path("r18"), Classifier("resnet18", 5).state_dict())
    err = cli_error(cam_inference.main, cam_inference.get_args_parser(), inference_flags(synthetic_voc), capsys)
    assert "5-class" in err and "20" in err and "--dataset" in err and "--weights" in err
    assert "--num_classes" not in err


def test_class_count_mismatch_names_the_flag_of_the_caller(tmp_path):
    path = tmp_path / "oc.pth"
    torch.save(Classifier("resnet18", 5).state_dict(), path)
    with pytest.raises(WSSSError, match=r"--oc-pretrained") as info:
        load_classifier_weights(Classifier("resnet18", 20), path, weights_flag="--oc-pretrained")
    assert "--num_classes" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# 7. kills: metrics rows, temp files, P-NOC's two final files
# --------------------------------------------------------------------------------------------------------------------


EXITING_SCRIPT = """
import argparse, atexit, gc, logging, sys
from pathlib import Path
from core import cli

# Registered before cli.run's hook, so it runs after it (exit hooks run last-in, first-out).
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, file=sys.stderr))

def main(args):
    Path(args.out).write_text("written")
    logging.getLogger("script").info("last line")
    return 0

parser = argparse.ArgumentParser()
parser.add_argument("--out")
if __name__ == "__main__":
    cli.run(main, parser)
"""


def test_scripts_skip_the_collections_at_exit_and_lose_no_output(tmp_path):
    # cli.run freezes the collector's objects at exit, sparing the ~0.9 s of full collections over torch's objects;
    # what the script wrote and logged is complete.
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "out.txt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert (tmp_path / "out.txt").read_text() == "written"
    lines = done.stderr.strip().splitlines()
    assert lines[-2].endswith("INFO script: last line") and lines[-1] == "frozen at exit: True"


def test_resume_drops_metrics_rows_of_the_unfinished_epoch(tmp_path):
    def killed_in_epoch_two(ctx, batch, step):
        if step == ctx.steps_per_epoch + 3:  # after the first log line of epoch 2 (4 steps per epoch)
            raise KeyboardInterrupt
        return bce_step(ctx, batch, step)

    with pytest.raises(KeyboardInterrupt):
        toy_train(tmp_path, toy_args("m", "--max_epoch", "2"), killed_in_epoch_two)
    assert any(r["step"] > 4 for r in runlog.read_metrics(tmp_path / "m" / "metrics.jsonl"))
    toy_train(tmp_path, toy_args("m", "--max_epoch", "2", "--resume", "true"))
    records = runlog.read_metrics(tmp_path / "m" / "metrics.jsonl")
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)) and [r["step"] for r in records] == sorted(r["step"] for r in records)


def test_stale_temp_files_of_atomic_write_are_removed_on_start(tmp_path):
    run_dir = tmp_path / "exp" / "t"
    run_dir.mkdir(parents=True)
    stale = [run_dir / ".last.pth.tmp-4999999-0a1b2c3d.pth", tmp_path / "exp" / ".t.pth.tmp-4999999-deadbeef.pth"]
    kept = [
        run_dir / ".notes.tmp",
        run_dir / "last.pth.tmp-4999999-0a1b2c3d.pth",
        tmp_path / "exp" / ".other.pth.tmp-4999999-deadbeef.pth",
    ]
    for path in stale + kept:
        path.write_bytes(b"")
    run = runtime.setup(toy_args("exp/t"), "test", models_dir=tmp_path)
    run.close()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_second_final_file_is_written_before_the_main_one_and_resume_finishes_it(tmp_path, monkeypatch):
    main_path, oc_path = tmp_path / "p.pth", tmp_path / "p-oc.pth"
    save = checkpoint.save_weights

    def killed_before_main(path, state_dict):
        if Path(path) == main_path:
            raise KeyboardInterrupt
        return save(path, state_dict)

    monkeypatch.setattr(checkpoint, "save_weights", killed_before_main)
    with pytest.raises(KeyboardInterrupt):
        toy_train(tmp_path, toy_args("p", "--max_epoch", "1"), also_save={"oc": oc_path}, second=True)
    assert oc_path.exists() and not main_path.exists()
    monkeypatch.setattr(checkpoint, "save_weights", save)
    oc_path.unlink()  # a kill before the second file: the resumed run writes both
    summary = toy_train(
        tmp_path, toy_args("p", "--max_epoch", "1", "--resume", "true"), also_save={"oc": oc_path}, second=True
    )
    assert main_path.exists() and oc_path.exists() and summary["also_saved"] == {"oc": str(oc_path)}


# --------------------------------------------------------------------------------------------------------------------
# 8. CAM files of other code bases without format_version
# --------------------------------------------------------------------------------------------------------------------


def test_cam_file_without_format_version_reads_as_current_with_one_note(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(artifacts, "_UNVERSIONED_NOTED", False)
    hr_cam = np.random.default_rng(1).random((2, 16, 12)).astype(np.float32)
    for name in ("a", "b"):
        save_raw_cam(tmp_path / f"{name}.npz", [1, 4], hr_cam, version=None)
    caplog.set_level(logging.INFO)
    for name in ("a", "b"):
        loaded = load_cam(tmp_path / f"{name}.npz")
        assert loaded.keys.tolist() == [1, 4] and np.array_equal(loaded.hr_cam, hr_cam)
    assert len(re.findall("format_version", caplog.text)) == 1
    np.savez(tmp_path / "c.npz", keys=np.array([1]), cam=hr_cam[:1, ::4, ::4])
    with pytest.raises(WSSSError, match="hr_cam"):
        load_cam(tmp_path / "c.npz")


# --------------------------------------------------------------------------------------------------------------------
# 9. evaluation of an image without a foreground class
# --------------------------------------------------------------------------------------------------------------------


def test_missing_cam_of_a_background_only_image_says_so(synthetic_voc, tmp_path, capsys, perfect_cams):
    root = tmp_path / "VOC2012"
    shutil.copytree(synthetic_voc, root)
    source = build_source("voc12", root, "train")
    empty = source.ids[3]
    xml = root / "Annotations" / f"{empty}.xml"
    xml.write_text(re.sub(r"<object>.*?</object>", "", xml.read_text(), flags=re.S))
    perfect_cams(source, tmp_path / "cams", [i for i in source.ids if i != empty])
    argv = ["--data_dir", str(root), "--domain", "train", "--pred_dir", str(tmp_path / "cams")]
    err = cli_error(evaluate.main, evaluate.get_args_parser(), argv, capsys)
    assert empty in err and "no foreground class" in err and "--exclude_bg_images false" in err
    with pytest.raises(WSSSError, match="no foreground class"):
        evaluate_predictions(build_source("voc12", root, "train"), tmp_path / "cams", "npy", [0.2])
    # a file without keys (what --exclude_bg_images false writes) is then scored as all background
    save_cam(cam_path(tmp_path / "cams", empty), [], np.zeros((0, 16, 16)), np.zeros((0, 64, 64)))
    summary = evaluate.main(evaluate.get_args_parser().parse_args([*argv, "--threshold", "0.2"]))
    assert json.loads(json.dumps(summary))["miou"] < 100
