"""CAM inference (scripts/cam/inference.py) and the shared per-image loop of core/inference.py.

Random-weight resnet18 classifiers on the synthetic VOC tree (64 px images), CPU only.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core import checkpoint, cli, inference, paths
from core.artifacts import load_cam, strided_size
from core.cam.cams import multiscale_cams
from core.datasets import VOC_CLASSES, build_source
from core.errors import WSSSError
from core.labels import foreground_keys
from core.models import Classifier
from scripts.cam import inference as cam_inference

pytestmark = pytest.mark.torch_threads(1)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SCALES = "0.5,1.0"  # two scales keep the runs short; the reference-pinning test uses the default four
FEW_IDS = 4


@pytest.fixture()
def work(tmp_path, monkeypatch, synthetic_voc):
    """A working folder holding experiments/models/r18.pth (random resnet18, 20 classes) and a 4-id list."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    checkpoint.save_weights(paths.final_weights_path("r18"), Classifier("resnet18", 20).state_dict())
    ids = build_source("voc12", synthetic_voc, "train").ids[:FEW_IDS]
    (tmp_path / "few.txt").write_text("\n".join(ids) + "\n")
    return tmp_path


def flags(data_dir, *extra: str, domain: str = "few.txt", tag: str = "r18") -> list[str]:
    return [
        "--architecture",
        "resnet18",
        "--tag",
        tag,
        "--data_dir",
        str(data_dir),
        "--domain",
        domain,
        "--scales",
        SCALES,
        "--device",
        "cpu",
        "--num_workers",
        "0",
        *extra,
    ]


def run(argv: list[str]) -> dict:
    return cam_inference.main(cam_inference.get_args_parser().parse_args(argv))


# --------------------------------------------------------------------------------------------------------------------
# Folder names
# --------------------------------------------------------------------------------------------------------------------


def test_predictions_dir_keeps_the_full_domain_name():
    root = Path("experiments/predictions")
    assert (
        paths.predictions_dir("pnoc/r1", "train_aug", [0.5, 1, 1.5, 2])
        == root / "pnoc/r1@train_aug@scale=0.5,1.0,1.5,2.0"
    )
    assert paths.predictions_dir("t", "train", [1.0]) != paths.predictions_dir("t", "train_aug", [1.0])
    assert paths.predictions_dir("t", "val", [1.0]) != paths.predictions_dir("t", "test", [1.0])
    assert paths.predictions_dir("t", "/lists/my_ids.txt", [1.0]) == root / "t@my_ids@scale=1.0"
    with pytest.raises(WSSSError, match="relative name"):
        paths.predictions_dir("../t", "train", [1.0])


# --------------------------------------------------------------------------------------------------------------------
# scripts/cam/inference.py
# --------------------------------------------------------------------------------------------------------------------


def test_one_file_per_labelled_image_with_gt_keys_then_resume(work, synthetic_voc):
    summary = run(flags(synthetic_voc, "--num_workers", "1"))
    out_dir = work / "experiments" / "predictions" / f"r18@few@scale={SCALES}"
    assert Path(summary["out_dir"]).resolve() == out_dir.resolve()
    source = build_source("voc12", synthetic_voc, str(work / "few.txt"))
    assert summary["written"] == FEW_IDS and summary["skipped"] == 0 and summary["images_per_s"] > 0
    assert sorted(p.name for p in out_dir.glob("*.npz")) == sorted(f"{i}.npz" for i in source.ids)
    provenance = {"args.json", "log.txt", "manifest.json"}
    assert {p.name for p in out_dir.iterdir()} - {f"{i}.npz" for i in source.ids} == provenance
    for image_id in source.ids:
        cams = load_cam(out_dir / f"{image_id}.npz")
        height, width = source.read_image(image_id).shape[:2]
        assert cams.keys.tolist() == (np.flatnonzero(source.label(image_id)) + 1).tolist()
        assert cams.hr_cam.shape == (len(cams.keys), height, width)
        assert cams.cam.shape == (len(cams.keys), *strided_size(height, width))
        for planes in (cams.cam, cams.hr_cam):
            assert planes.dtype == np.float32 and planes.min() >= 0 and planes.max() < 1
            peaks = planes.reshape(len(cams.keys), -1).max(axis=1)
            assert np.all((peaks == 0) | (np.abs(peaks - 1) < 1e-3))  # each plane divided by its own max

    stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.npz")}
    again = run(flags(synthetic_voc))
    assert (again["written"], again["skipped"]) == (0, FEW_IDS)
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.npz")} == stamps

    # A deleted file is recreated; a leftover temporary file of an interrupted write is not taken for it.
    victim = out_dir / f"{source.ids[1]}.npz"
    reference = load_cam(victim)
    victim.unlink()
    (out_dir / f".{victim.name}.tmp-999-deadbeef.npz").write_bytes(b"half a zip")
    third = run(flags(synthetic_voc))
    assert (third["written"], third["skipped"]) == (1, FEW_IDS - 1)
    recreated = load_cam(victim)
    assert np.array_equal(recreated.keys, reference.keys) and np.allclose(recreated.hr_cam, reference.hr_cam, atol=1e-6)


def reference_cams(model: torch.nn.Module, image: np.ndarray, keys: list[int], scales: list[float]):
    """The reference's per-image loop written out plainly (SPEC §5), one forward per image and per mirror."""
    height, width = image.shape[:2]
    strided = (math.ceil(height / 4), math.ceil(width / 4))
    up = (16 * math.ceil(height / 16), 16 * math.ceil(width / 16))
    cam_sum = torch.zeros(20, *strided, dtype=torch.float64)
    hr_sum = torch.zeros(20, height, width, dtype=torch.float64)
    for scale in scales:
        resized = Image.fromarray(image).resize((round(width * scale), round(height * scale)), Image.BICUBIC)
        x = torch.from_numpy(((np.asarray(resized, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1))[None]
        with torch.no_grad():
            plain = F.relu(model(x, with_cam=True)[1])[0]
            mirrored = F.relu(model(torch.flip(x, dims=[3]), with_cam=True)[1])[0]
        maps = (plain + torch.flip(mirrored, dims=[2]))[None]
        cam_sum += F.interpolate(maps, strided, mode="bilinear", align_corners=False)[0].double()
        hr_sum += F.interpolate(maps, up, mode="bilinear", align_corners=False)[0, :, :height, :width].double()
    channels = [k - 1 for k in keys]
    cam, hr_cam = cam_sum[channels], hr_sum[channels]
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-5)
    hr_cam = hr_cam / (hr_cam.amax(dim=(1, 2), keepdim=True) + 1e-5)
    return cam.float().numpy(), hr_cam.float().numpy()


def test_files_match_a_plain_reimplementation_of_the_reference_loop(work, synthetic_voc):
    scales = [0.5, 1.0, 1.5, 2.0]
    source = build_source("voc12", synthetic_voc, "train")
    image_id = source.ids[0]
    (work / "one.txt").write_text(image_id + "\n")
    summary = run(flags(synthetic_voc, "--scales", ",".join(map(str, scales)), domain="one.txt"))
    model = Classifier("resnet18", 20)
    model.load_state_dict(torch.load(work / "experiments/models/r18.pth", weights_only=True))
    model.eval()

    saved = load_cam(Path(summary["out_dir"]) / f"{image_id}.npz")
    expected_cam, expected_hr = reference_cams(model, source.read_image(image_id), saved.keys.tolist(), scales)
    assert saved.keys.size >= 1
    assert np.abs(saved.cam - expected_cam).max() < 1e-5
    assert np.abs(saved.hr_cam - expected_hr).max() < 1e-5

    # A size that is not a multiple of 16 exercises the resize-then-crop of hr_cam and the odd strided size.
    odd = np.ascontiguousarray(source.read_image(source.ids[1])[5:42, 3:53])  # 37 x 50
    keys, cam, hr_cam = multiscale_cams(model, odd, scales, device="cpu", keys=[2, 7])
    expected_cam, expected_hr = reference_cams(model, odd, [2, 7], scales)
    assert keys.tolist() == [2, 7] and cam.shape == (2, 10, 13) and hr_cam.shape == (2, 37, 50)
    assert np.abs(cam - expected_cam).max() < 1e-5 and np.abs(hr_cam - expected_hr).max() < 1e-5


def test_resize_maps_cams_back_to_the_original_size(work, synthetic_voc):
    summary = run(flags(synthetic_voc, "--resize", "48", "--scales", "1.0", "--pred_dir", "resized"))
    assert summary["written"] == FEW_IDS and summary["out_dir"] == "resized"
    cams = load_cam(next(Path("resized").glob("*.npz")))
    assert cams.hr_cam.shape[1:] == (64, 64) and cams.cam.shape[1:] == (16, 16)


def custom_copy(synthetic_voc: Path, root: Path, labels_csv: str) -> Path:
    """A custom dataset of three synthetic images with the given labels.csv rows (20 VOC classes, no masks)."""
    ids = build_source("voc12", synthetic_voc, "train").ids[:3]
    (root / "images").mkdir(parents=True)
    for image_id in ids:
        shutil.copy(synthetic_voc / "JPEGImages" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    (root / "lists").mkdir()
    (root / "lists" / "three.txt").write_text("\n".join(ids) + "\n")
    (root / "labels.csv").write_text(labels_csv.format(*ids))
    return root


def test_background_only_images_are_excluded_and_counted(work, synthetic_voc):
    root = custom_copy(synthetic_voc, work / "custom", "{0},dog\n{1},\n{2},cat|person\n")
    argv = flags(root, "--dataset", "custom", "--scales", "1.0", domain="three")
    summary = run(argv)
    out_dir = Path(summary["out_dir"])
    assert (summary["written"], summary["excluded"]) == (2, 1)
    ids = (root / "lists" / "three.txt").read_text().split()
    assert not (out_dir / f"{ids[1]}.npz").exists()
    assert load_cam(out_dir / f"{ids[2]}.npz").keys.tolist() == [8, 15]  # cat, person

    kept = run(argv + ["--exclude_bg_images", "false"])
    assert (kept["written"], kept["excluded"]) == (1, 0)
    empty = load_cam(out_dir / f"{ids[1]}.npz")
    assert empty.keys.size == 0 and empty.hr_cam.shape == (0, 64, 64)


def test_user_errors_are_one_line_and_exit_2(work, synthetic_voc, capsys):
    def error_of(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(cam_inference.main, cam_inference.get_args_parser(), argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    err = error_of(flags(synthetic_voc, tag="missing/run"))
    assert "weights experiments/models/missing/run.pth not found" in err and "scripts/cam/train_pnoc.py" in err

    checkpoint.save_weights(paths.final_weights_path("five"), Classifier("resnet18", 5).state_dict())
    err = error_of(flags(synthetic_voc, "--weights", "five"))
    assert "5-class resnet18-like classifier" in err and "dataset has 20 foreground classes" in err

    root = custom_copy(synthetic_voc, work / "unlabelled", "{0},dog\n{1},cat\n")  # the third id has no label
    err = error_of(flags(root, "--dataset", "custom", domain="three"))
    assert "CAM inference needs image-level labels" in err and "1 of 3 ids" in err

    root = custom_copy(synthetic_voc, work / "no_foreground", "{0},\n{1},\n{2},\n")
    assert "has a foreground class" in error_of(flags(root, "--dataset", "custom", domain="three"))


def second_call_runs_out_of_memory(monkeypatch) -> None:
    """Make the second call of CAM inference's batch function raise CUDA's out-of-memory error."""
    calls = []
    real = cam_inference.multiscale_cams_batch

    def run_out_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(cam_inference, "multiscale_cams_batch", run_out_on_the_second)


def test_cuda_out_of_memory_stops_naming_the_image_and_keeps_finished_files(work, synthetic_voc, monkeypatch):
    second_call_runs_out_of_memory(monkeypatch)
    ids = build_source("voc12", synthetic_voc, str(work / "few.txt")).ids
    with pytest.raises(WSSSError, match=f"CUDA out of memory on image {ids[1]} \\(64x64\\).*--resize") as error:
        run(flags(synthetic_voc, "--scales", "1.0", "--pred_dir", "oom"))
    assert "\n" not in str(error.value) and "--batch_size" not in str(error.value)
    assert sorted(p.name for p in Path("oom").glob("*.npz")) == [f"{ids[0]}.npz"]

    second_call_runs_out_of_memory(monkeypatch)  # a batch of two: both named, --batch_size 1 suggested
    with pytest.raises(WSSSError, match=f"on a batch of 2 images \\(first: {ids[2]}, {ids[3]}\\).*--batch_size 1"):
        run(flags(synthetic_voc, "--scales", "1.0", "--pred_dir", "oom2", "--batch_size", "2"))
    assert sorted(p.name for p in Path("oom2").glob("*.npz")) == [f"{ids[0]}.npz", f"{ids[1]}.npz"]


def test_batched_inference_writes_the_same_cams_and_resumes(work, synthetic_voc):
    one = run(flags(synthetic_voc, "--pred_dir", "one"))
    ids = build_source("voc12", synthetic_voc, str(work / "few.txt")).ids
    first = run(flags(synthetic_voc, "--pred_dir", "batched", "--batch_size", "3", domain="few.txt"))
    assert (first["written"], first["skipped"]) == (FEW_IDS, 0)
    Path("batched", f"{ids[1]}.npz").unlink()  # an interrupted run: one file missing
    again = run(flags(synthetic_voc, "--pred_dir", "batched", "--batch_size", "3"))
    assert (again["written"], again["skipped"]) == (1, FEW_IDS - 1)
    for image_id in ids:
        alone, batched = load_cam(Path(one["out_dir"]) / f"{image_id}.npz"), load_cam(Path(f"batched/{image_id}.npz"))
        assert batched.keys.tolist() == alone.keys.tolist()
        assert np.abs(batched.cam - alone.cam).max() < 1e-5 and np.abs(batched.hr_cam - alone.hr_cam).max() < 1e-5
    # --batch_size is how the files are computed, not what they hold: another value resumes the same folder.
    assert run(flags(synthetic_voc, "--pred_dir", "batched"))["skipped"] == FEW_IDS


# --------------------------------------------------------------------------------------------------------------------
# core.inference.run_over_images
# --------------------------------------------------------------------------------------------------------------------


def test_run_over_images_takes_this_ranks_shard(voc_source, tmp_path, monkeypatch):
    monkeypatch.setattr(inference.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(inference.distributed, "get_world_size", lambda: 3)
    seen = []

    def write(item):
        seen.append(item["id"])
        assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.uint8
        assert item["label"].shape == (20,)
        (tmp_path / f"{item['id']}.txt").write_text("done")

    ids = voc_source.ids[:8]
    (tmp_path / f"{ids[4]}.txt").write_text("done earlier")
    summary = inference.run_over_images(voc_source, ids, write, tmp_path, ".txt", progress=False)
    assert seen == [ids[1], ids[7]]  # ids[1::3] = 1, 4, 7; 4 was done already
    assert (summary.written, summary.skipped) == (2, 1)

    with pytest.raises(RuntimeError, match="without creating"):
        inference.run_over_images(voc_source, ids[:2], lambda item: None, tmp_path / "x", ".txt", progress=False)


def test_run_over_images_reports_an_unreadable_image_in_one_line(tmp_path, synthetic_voc):
    root = custom_copy(synthetic_voc, tmp_path / "broken", "{0},dog\n{1},cat\n{2},cow\n")
    ids = (root / "lists" / "three.txt").read_text().split()
    (root / "images" / f"{ids[2]}.jpg").write_bytes(b"not a jpeg")
    source = build_source("custom", root, "three")
    written = []

    def write(item):
        written.append(item["id"])
        (tmp_path / f"{item['id']}.out").write_text("ok")

    with pytest.raises(WSSSError, match=f"cannot decode image .*{ids[2]}.jpg") as error:
        inference.run_over_images(source, ids, write, tmp_path, ".out", num_workers=1, progress=False)
    assert "\n" not in str(error.value) and written == ids[:2]


def _item(image_id: str, height: int) -> dict:
    return {"id": image_id, "image": np.zeros((height, 8, 3), np.uint8)}


def test_group_items_batches_equal_shapes_and_sends_waiting_groups_before_an_error():
    items = [_item("a", 4), _item("b", 6), _item("c", 4), _item("d", 4), _item("e", 6)]
    groups = list(inference.group_items(items, 2, inference.image_shape))
    assert [[i["id"] for i in g] for g in groups] == [["a", "c"], ["b", "e"], ["d"]]
    assert [[i["id"] for i in g] for g in inference.group_items(items, 1, inference.image_shape)] == [
        ["a"], ["b"], ["c"], ["d"], ["e"]
    ]  # fmt: skip
    broken = [_item("a", 4), _item("b", 6), {"id": "x", "error": "cannot decode"}, _item("c", 4)]
    assert [[i["id"] for i in g] for g in inference.group_items(broken, 4, inference.image_shape)] == [
        ["a"], ["b"], ["x"], ["c"]
    ]  # fmt: skip
    # More than four batches' worth waiting (13 items, batch 3): the fullest group goes before it is full.
    many = [_item("1", 1), _item("1b", 1)] + [_item(str(h), h) for h in range(2, 13)]
    early = next(iter(inference.group_items(many, 3, inference.image_shape)))
    assert [i["id"] for i in early] == ["1", "1b"]
    spread = [_item(str(h), h) for h in range(1, 11)]
    first = next(iter(inference.group_items(spread, 2, inference.image_shape)))
    assert len(first) == 1  # nothing pairs up: the first group goes once nine items wait
    assert sorted(i["id"] for g in inference.group_items(spread, 2, inference.image_shape) for i in g) == sorted(
        i["id"] for i in spread
    )


def test_labels_helpers():
    labels = {"a": np.array([0, 1, 0, 1], np.float32), "b": np.zeros(4, np.float32), "c": np.array([1, 0, 0, 0])}
    assert foreground_keys(labels["a"]).tolist() == [2, 4]
    assert inference.split_background_only(labels) == (["a", "c"], ["b"])
