"""Random-walk inference (scripts/rw/inference.py): CAM files in, RW CAM files out, resumable, with a manifest, and
one-line errors for bad input. A random-weight resnet18 AffinityNet on the synthetic VOC tree (64 px), CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core import checkpoint, paths
from core.artifacts import cam_path, load_cam, save_cam
from core.datasets import build_source
from core.errors import WSSSError
from core.multiscale import imagenet_normalize
from core.rw.network import AffinityNet, load_affinity_net
from core.rw.walk import random_walk, rw_maps
from scripts.rw import inference as rw_inference

pytestmark = pytest.mark.torch_threads(1)

CAMS = "cams@few"
FEW_IDS = 3


@pytest.fixture()
def work(tmp_path, monkeypatch, synthetic_voc, perfect_cams):
    """A working folder with experiments/models/aff.pth (random resnet18 AffinityNet), a 3-id list and its perfect
    CAMs in experiments/predictions/cams@few."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    checkpoint.save_weights(paths.final_weights_path("aff"), AffinityNet("resnet18").state_dict())
    source = build_source("voc12", synthetic_voc, "train")
    (tmp_path / "few.txt").write_text("\n".join(source.ids[:FEW_IDS]) + "\n")
    perfect_cams(source, paths.PREDICTIONS_DIR / CAMS, source.ids[:FEW_IDS])
    return tmp_path


def run(data_dir: Path, *extra: str) -> dict:
    argv = [
        "--data_dir", str(data_dir), "--domain", "few.txt", "--model_name", "aff", "--cam_dir", CAMS,
        "--image_size", "64", "--device", "cpu", "--num_workers", "0", *extra,
    ]  # fmt: skip
    return rw_inference.main(rw_inference.get_args_parser().parse_args(argv))


def test_rw_files_are_cam_files_of_the_walk_then_resume(work, synthetic_voc):
    result = run(synthetic_voc, "--exp_times", "4")
    out = Path(result["out_dir"])
    assert out == paths.PREDICTIONS_DIR / "aff@few@beta=10@exp_times=4@rw"
    assert result["written"] == FEW_IDS and result["skipped"] == 0
    source = build_source("voc12", synthetic_voc, "few.txt")
    model = load_affinity_net(paths.final_weights_path("aff"))
    for image_id in source.ids:
        cams, rw = load_cam(cam_path(paths.PREDICTIONS_DIR / CAMS, image_id)), load_cam(cam_path(out, image_id))
        assert np.array_equal(rw.keys, cams.keys) and rw.hr_cam.shape == cams.hr_cam.shape
        assert rw.hr_cam.max() == pytest.approx(1.0) and rw.cam.max() == pytest.approx(1.0)  # one global max
        # the file is the walk of the boundary map of the image, as the core functions compute it
        image = source.read_image(image_id)
        edge = model.edge_map(torch.from_numpy(imagenet_normalize(image)), pad_size=64)
        expected = rw_maps(random_walk(torch.from_numpy(cams.cam), edge, exp_times=4), image.shape[:2])
        np.testing.assert_allclose(rw.cam, expected[0], atol=1e-6)
        np.testing.assert_allclose(rw.hr_cam, expected[1], atol=1e-6)
    recorded = json.loads((out / "manifest.json").read_text())
    assert recorded["stage"] == "rw" and recorded["complete"] and set(recorded["inputs"]) == {"weights", "cams"}
    assert recorded["flags"]["beta"] == 10 and recorded["counts"]["written"] == FEW_IDS
    again = run(synthetic_voc, "--exp_times", "4")
    assert again["written"] == 0 and again["skipped"] == FEW_IDS
    with pytest.raises(WSSSError, match="beta"):  # the same folder with other flags is refused
        run(synthetic_voc, "--exp_times", "4", "--beta", "5", "--pred_dir", str(out))


def test_per_class_normalisation_and_a_cam_file_without_classes(work, synthetic_voc):
    first = build_source("voc12", synthetic_voc, "few.txt").ids[0]
    save_cam(cam_path(paths.PREDICTIONS_DIR / CAMS, first), [], np.zeros((0, 16, 16)), np.zeros((0, 64, 64)))
    result = run(synthetic_voc, "--exp_times", "2", "--rw_normalize", "per_class")
    out = Path(result["out_dir"])
    assert out.name.endswith("@rw@per_class") and result["written"] == FEW_IDS
    assert load_cam(cam_path(out, first)).keys.size == 0
    for path in sorted(out.glob("*.npz"))[1:]:
        maps = load_cam(path).hr_cam
        np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, rtol=1e-6)


def test_bad_input_is_one_line_and_writes_nothing(work, synthetic_voc):
    ids = build_source("voc12", synthetic_voc, "few.txt").ids
    with pytest.raises(WSSSError, match=r"--beta 0\.0"):
        run(synthetic_voc, "--beta", "0")
    with pytest.raises(WSSSError, match="--exp_times 13"):
        run(synthetic_voc, "--exp_times", "13")
    with pytest.raises(WSSSError, match="does not exist; run scripts/cam/inference.py"):
        run(synthetic_voc, "--cam_dir", "nowhere")
    with pytest.raises(WSSSError, match="weights experiments/models/other.pth not found"):
        run(synthetic_voc, "--model_name", "other")
    with pytest.raises(WSSSError, match="resnet18") as error:  # weights of another backbone
        run(synthetic_voc, "--architecture", "resnet50")
    assert "\n" not in str(error.value)
    cam_path(paths.PREDICTIONS_DIR / CAMS, ids[1]).unlink()  # an incomplete CAM folder
    with pytest.raises(WSSSError, match=f"1 of 3 CAM files missing .*first: {ids[1]}"):
        run(synthetic_voc)
    assert not list(paths.PREDICTIONS_DIR.glob("aff@*/*.npz"))
