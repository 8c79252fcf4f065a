"""EPS (core/cam/eps.py, scripts/cam/train_eps.py): the overlap rule, L_sal, the saliency data, a 2-step run with
--ppc true whose checkpoint CAM inference reads, and the one-line refusals; PPC on the vanilla generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core import cli
from core.artifacts import load_cam, save_saliency
from core.cam import eps
from core.datasets import build_source
from core.datasets.transforms import build_segmentation_transform
from core.models import Classifier, load_classifier_weights
from scripts.cam import inference as cam_inference
from scripts.cam import train_eps, train_mixup, train_vanilla

pytestmark = pytest.mark.torch_threads(1)


def test_overlap_rule_puts_a_class_outside_the_saliency_into_the_background_set():
    saliency = torch.zeros(1, 4, 4)
    saliency[0, :, :2] = 1.0  # the left half is salient
    logits = torch.full((1, 4, 4, 4), -10.0)  # 3 classes + background (last)
    logits[0, 0, :, :2] = 10.0  # class 0 covers the salient half: foreground
    logits[0, 1, :, 2:] = 10.0  # class 1 lies outside the saliency (a rail, the water): background
    logits[0, 2, :, 2] = 10.0  # class 2 is absent from the labels: in neither set
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    foreground, background = eps.split_classes(torch.softmax(logits, 1), saliency, labels, tau=0.4)
    assert foreground.tolist() == [[True, False, False]] and background.tolist() == [[False, True, False]]
    # the predicted saliency: λ·M_fg + (1-λ)(1-M_bg) is 1 where class 0 is, 0 where class 1 is -> L_sal ≈ 0
    logits[0, 2] = -10.0
    loss, predicted = eps.eps_loss(logits, saliency, labels, tau=0.4, lam=0.5)
    assert loss.item() < 1e-6 and predicted[0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    # the overlap divides by the region plus 1e-4·hw: a region half inside the saliency has o = 4 / (8 + 0.0016) > 0.4
    logits[0, 1] = -10.0
    logits[0, 1, :2, :], logits[0, 0, :2, :] = 10.0, -10.0
    foreground, _ = eps.split_classes(torch.softmax(logits, 1), saliency, labels, tau=0.4)
    assert foreground[0, 1]
    padded = saliency.clone()
    padded[0, 3] = -1.0  # crop padding: out of the loss
    loss_padded, _ = eps.eps_loss(logits, padded, labels)
    loss_full, _ = eps.eps_loss(logits, saliency, labels)
    assert loss_padded.item() != pytest.approx(loss_full.item())


@pytest.fixture(scope="module")
def saliency_dir(synthetic_voc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saliency PNGs of the synthetic `train` ids made from their GT masks (255 on objects)."""
    folder = tmp_path_factory.mktemp("saliency")
    source = build_source("voc12", synthetic_voc, "train")
    for image_id in source.ids:
        mask = source.read_mask(image_id)
        save_saliency(folder / f"{image_id}.png", ((mask > 0) & (mask < 255)).astype(np.float32))
    return folder


def test_saliency_dataset_moves_the_saliency_with_the_image_and_marks_padding(synthetic_voc, saliency_dir):
    source = build_source("voc12", synthetic_voc, "train")
    transform = build_segmentation_transform(40, 40, 48, seed=0)  # 40 px images in a 48 px crop: padding
    item = eps.SaliencyDataset(source, transform, saliency_dir)[0]
    saliency = item["saliency"].numpy()
    assert item["image"].shape == (3, 48, 48) and saliency.shape == (48, 48)
    assert set(np.unique(saliency)) <= {-1.0, 0.0, 1.0} and (saliency == -1).any() and (saliency == 1).any()
    padded = saliency == -1
    assert np.all(item["image"].numpy()[:, padded] == 0)  # the image is padded exactly there


def eps_flags(data_dir: Path, sal_dir: Path | None, *extra: str, tag: str = "eps/r18") -> list[str]:
    common = [
        "--tag", tag, "--data_dir", str(data_dir), "--domain_train", "few.txt", "--architecture", "resnet18",
        "--backbone_weights", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
        "--batch_size", "2", "--max_epoch", "1", "--num_workers", "0", "--device", "cpu", "--print_ratio", "0.5",
    ]  # fmt: skip
    return common + (["--sal_dir", str(sal_dir)] if sal_dir is not None else []) + list(extra)


@pytest.fixture()
def few(tmp_path, monkeypatch, synthetic_voc) -> Path:
    monkeypatch.chdir(tmp_path)
    ids = build_source("voc12", synthetic_voc, "train").ids[:4]
    (tmp_path / "few.txt").write_text("\n".join(ids) + "\n")
    return tmp_path


def test_two_eps_steps_with_ppc_write_a_checkpoint_that_cam_inference_reads(few, synthetic_voc, saliency_dir):
    argv = eps_flags(synthetic_voc, saliency_dir, "--ppc", "true", "--ppc_view_size", "32")
    summary = train_eps.main(train_eps.get_args_parser().parse_args(argv))
    final = Path(summary["final_path"])
    records = [json.loads(line) for line in (final.with_suffix("") / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert steps[-1]["step"] == 2 and {"c_loss", "sal_loss", "ppc_loss", "ppc_cp", "ppc_cc", "ppc_intra"} <= set(
        steps[0]
    )
    state = torch.load(final, weights_only=True)
    assert state["classifier.weight"].shape[0] == 21 and eps.is_eps_state_dict(state)
    assert "projection.conv.weight" in state
    manifest = json.loads((final.with_suffix("") / "manifest.json").read_text())
    assert manifest["inputs"]["sal_dir"]["path"] == str(saliency_dir)

    inference_argv = [
        "--architecture", "resnet18", "--weights", str(final), "--tag", "eps-cams", "--data_dir", str(synthetic_voc),
        "--domain", "few.txt", "--scales", "1.0", "--device", "cpu", "--num_workers", "0",
    ]  # fmt: skip
    result = cam_inference.main(cam_inference.get_args_parser().parse_args(inference_argv))
    assert result["written"] == 4
    cams = load_cam(next(Path(result["out_dir"]).glob("*.npz")))
    assert cams.hr_cam.min() >= 0 and cams.hr_cam.max() <= 1 and cams.keys.min() >= 1


def test_eps_bad_input_is_one_line_and_writes_nothing(few, synthetic_voc, saliency_dir, tmp_path, capsys):
    parser = train_eps.get_args_parser()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_eps.main, parser, eps_flags(synthetic_voc, None))
    assert exit_info.value.code == 2 and "--sal_dir is required" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    ids = (tmp_path / "few.txt").read_text().split()
    (partial / f"{ids[0]}.png").write_bytes((saliency_dir / f"{ids[0]}.png").read_bytes())
    with pytest.raises(SystemExit):
        cli.run(train_eps.main, parser, eps_flags(synthetic_voc, partial))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"3 of 4 saliency maps missing in --sal_dir {partial} (first: {ids[1]}" in err[0]
    assert not (tmp_path / "experiments").exists()


def test_ppc_with_a_method_without_features_is_one_line(few, synthetic_voc, capsys):
    argv = eps_flags(synthetic_voc, None, "--ppc", "true", "--mix", "mixup", tag="mixup/r18")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_mixup.main, train_mixup.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "--ppc true: method mixup gives no features for PPC's projection head" in err[0]
    assert not Path("experiments").exists()


def test_vanilla_with_ppc_trains_the_projection_head_and_inference_drops_it(few, synthetic_voc):
    argv = eps_flags(synthetic_voc, None, "--ppc", "true", "--ppc_view_size", "32", tag="vanilla/r18-ppc")
    summary = train_vanilla.main(train_vanilla.get_args_parser().parse_args(argv))
    assert {"train/ppc_loss", "train/ppc_intra"} <= set(summary)
    state = torch.load(summary["final_path"], weights_only=True)
    assert "projection.conv.weight" in state
    load_classifier_weights(Classifier("resnet18", 20), summary["final_path"])  # the CAM network, strictly
