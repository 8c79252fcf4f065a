"""PoolNet (poolnet/): the network, frozen BatchNorm, the Caffe key mapping, train/test end to end, resume, the
reference's command lines and bad input. resnet18 base, random weights, 64 px synthetic VOC images, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import checkpoint, cli, engine
from core.artifacts import save_saliency
from core.datasets import build_source
from core.errors import WSSSError
from core.models import build_backbone
from core.optim import build_optimizer, build_param_groups
from poolnet import caffe, main_voc
from poolnet import test as poolnet_test
from poolnet import train as poolnet_train
from poolnet.data import pad_collate
from poolnet.model import PoolNet, load_poolnet_weights

pytestmark = pytest.mark.torch_threads(1)

HEAD = ("--head_scale", "0.25")  # a quarter of the reference head: the tests check wiring, not quality

FEW_IDS = 4


@pytest.fixture()
def work(tmp_path, monkeypatch, synthetic_voc):
    """A working folder with a 4-id list ``few.txt`` and ``sal/<id>.png``: the GT foreground as 0/255 PNGs."""
    monkeypatch.chdir(tmp_path)
    source = build_source("voc12", synthetic_voc, "train")
    ids = source.ids[:FEW_IDS]
    (tmp_path / "few.txt").write_text("\n".join(ids) + "\n")
    for image_id in ids:
        mask = source.read_mask(image_id)
        save_saliency(tmp_path / "sal" / f"{image_id}.png", ((mask > 0) & (mask < 255)).astype(np.uint8) * 255)
    return tmp_path


def train_flags(data_dir, *extra: str, tag: str = "pn") -> list[str]:
    return [
        "--tag", tag, "--data_dir", str(data_dir), "--domain", "few.txt", "--sal_dir", "sal",
        "--architecture", "resnet18", "--backbone_weights", "none", "--max_epoch", "1", "--batch_size", "2",
        "--accumulate_steps", "2", "--num_workers", "0", "--device", "cpu", "--lr", "1e-4", *HEAD, *extra,
    ]  # fmt: skip


def test_output_has_the_input_size_for_any_size():
    torch.manual_seed(0)
    model = PoolNet("resnet18", head_scale=0.25).eval()
    for height, width in ((64, 64), (50, 70), (97, 130)):
        with torch.no_grad():
            logits = model(torch.rand(2, 3, height, width) * 255)
        assert logits.shape == (2, 1, height, width) and torch.isfinite(logits).all()


def test_batchnorm_is_frozen_in_training():
    torch.manual_seed(0)
    model = PoolNet("resnet18", head_scale=0.25).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)  # kept in eval mode by the frozen-BN backbone
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    groups = build_param_groups(model.param_groups(), 1e-3, 5e-4, 1.0, 1.0)
    optimizer = build_optimizer(groups, "adam")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for m in norms for p in m.parameters())
    assert isinstance(optimizer, torch.optim.Adam) and all(g["lr"] == 1e-3 for g in optimizer.param_groups)

    images, labels = torch.rand(2, 3, 64, 64) * 255, (torch.rand(2, 1, 64, 64) > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(model(images), labels, reduction="sum").backward()
    optimizer.step()
    for key, value in model.state_dict().items():
        if "running_" in key:
            assert torch.equal(value, stats[key]), key


def test_pad_collate_marks_the_padding_invalid():
    items = [
        {"id": "a", "image": torch.ones(3, 4, 6), "label": torch.ones(1, 4, 6)},
        {"id": "b", "image": torch.ones(3, 5, 3), "label": torch.ones(1, 5, 3)},
    ]
    batch = pad_collate(items)
    assert batch["image"].shape == (2, 3, 5, 6) and batch["valid"].shape == (2, 1, 5, 6)
    assert int(batch["valid"][0].sum()) == 24 and int(batch["valid"][1].sum()) == 15
    assert float(batch["label"][0, 0, 4].sum()) == 0  # padded rows: label 0 and left out of the loss


def test_train_then_test_writes_saliency_pngs_and_resumes(work, synthetic_voc):
    summary = poolnet_train.main(poolnet_train.get_args_parser().parse_args(train_flags(synthetic_voc)))
    final = Path(summary["final_path"])
    assert final == Path("experiments/models/pn.pth") and np.isfinite(summary["train/loss"])
    manifest = json.loads(Path("experiments/models/pn/manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"]["saliency"]["path"] == "sal"

    test_argv = ["--tag", "pn", "--data_dir", str(synthetic_voc), "--domain", "few.txt", "--architecture", "resnet18"]
    test_argv += [*HEAD, "--batch_size", "3", "--num_workers", "0", "--device", "cpu"]
    result = poolnet_test.main(poolnet_test.get_args_parser().parse_args(test_argv))
    out_dir = Path("experiments/predictions/pn@few")
    assert result["written"] == FEW_IDS and Path(result["out_dir"]) == out_dir
    for image_id in (work / "few.txt").read_text().split():
        png = Image.open(out_dir / f"{image_id}.png")
        assert png.mode == "L" and png.size == (64, 64)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["inputs"]["weights"]["sha256"]) == 64

    # Resumable: a deleted map is the only one written again; batch size does not change the maps.
    first = sorted(out_dir.glob("*.png"))[0]
    kept = np.asarray(Image.open(first))
    first.unlink()
    again = poolnet_test.main(
        poolnet_test.get_args_parser().parse_args(
            [*test_argv[:-6], "--batch_size", "1", "--num_workers", "0", "--device", "cpu"]
        )
    )
    assert (again["written"], again["skipped"]) == (1, FEW_IDS - 1)
    assert np.array_equal(np.asarray(Image.open(first)), kept)


def test_resume_gives_the_weights_of_an_uninterrupted_run(work, synthetic_voc, monkeypatch):
    argv = train_flags(synthetic_voc, "--max_epoch", "2")
    straight = poolnet_train.main(poolnet_train.get_args_parser().parse_args([*argv, "--tag", "straight"]))

    save = engine.state.save_checkpoint

    def save_then_die(ctx: engine.TrainContext) -> None:
        save(ctx)
        if ctx.epoch == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(engine.state, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        poolnet_train.main(poolnet_train.get_args_parser().parse_args([*argv, "--tag", "resumed"]))
    monkeypatch.setattr(engine.state, "save_checkpoint", save)
    resumed = poolnet_train.main(
        poolnet_train.get_args_parser().parse_args([*argv, "--tag", "resumed", "--resume", "true"])
    )
    a = torch.load(straight["final_path"], weights_only=True)
    b = torch.load(resumed["final_path"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seed_command_lines_parse_and_translate(tmp_path, monkeypatch):
    inside = tmp_path / "poolnet"
    inside.mkdir()
    monkeypatch.chdir(inside)
    parser = main_voc.get_args_parser()
    seed_train = "--arch resnet --mode train --train_root /data/VOC2012 --pseudo_root ../experiments/predictions/ccamh"
    config = parser.parse_args(seed_train.split())
    args = poolnet_train.get_args_parser().parse_args(main_voc.train_argv(config))
    assert args.architecture == "resnet50" and args.domain == "train_aug" and args.data_dir == "/data/VOC2012"
    assert args.sal_dir == str(tmp_path / "experiments/predictions/ccamh") and args.tag == "poolnet/ccamh"
    assert (args.batch_size, args.accumulate_steps, args.max_epoch, args.optimizer) == (1, 10, 9, "adam")
    assert (args.lr, args.wd, args.backbone_weights) == (5e-5, 5e-4, "imagenet")

    seed_test = "--arch resnet --mode test --model run/epoch_9.pth --sal_folder ../experiments/predictions/pn"
    config = parser.parse_args([*seed_test.split(), "--train_root", "/data/VOC2012"])
    args = poolnet_test.get_args_parser().parse_args(main_voc.test_argv(config))
    assert args.weights == str(inside / "run/epoch_9.pth") and args.pred_dir == str(
        tmp_path / "experiments/predictions/pn"
    )
    assert args.domain == "train_aug" and args.architecture == "resnet50"


def test_main_voc_runs_from_inside_poolnet(work, synthetic_voc, monkeypatch):
    inside = work / "poolnet"
    inside.mkdir()
    monkeypatch.chdir(inside)
    monkeypatch.setattr(main_voc, "ROOT", work)  # the repository root the reference's paths point at
    common = ["--arch", "resnet18", "--train_root", str(synthetic_voc), "--train_list", "../few.txt", "--no-cuda"]
    common += ["--num_thread", "0", "--batch_size", "2", *HEAD]
    train = main_voc.get_args_parser().parse_args(
        [*common, "--mode", "train", "--pseudo_root", "../sal", "--epoch", "1", "--iter_size", "2",
         "--pretrained_model", "none"]
    )  # fmt: skip
    summary = main_voc.main(train)
    assert Path(summary["final_path"]) == Path("experiments/models/poolnet/sal.pth")

    monkeypatch.chdir(inside)
    test = main_voc.get_args_parser().parse_args(
        [*common, "--mode", "test", "--model", "../experiments/models/poolnet/sal.pth", "--sal_folder", "../pn_out"]
    )
    assert main_voc.main(test)["written"] == FEW_IDS
    assert len(list((work / "pn_out").glob("*.png"))) == FEW_IDS


def test_weights_of_another_architecture_are_one_line(work, synthetic_voc, capsys):
    torch.manual_seed(0)
    checkpoint.save_weights(work / "r18.pth", PoolNet("resnet18", head_scale=0.25).state_dict())
    argv = ["--weights", "r18.pth", "--tag", "x", "--data_dir", str(synthetic_voc), "--domain", "few.txt"]
    argv += ["--architecture", "resnet34", *HEAD, "--num_workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(poolnet_test.main, poolnet_test.get_args_parser(), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "resnet18-like" in err and "--architecture resnet34" in err and "--architecture they were trained" in err

    model = PoolNet("resnet18", head_scale=0.25)
    with pytest.raises(WSSSError, match="--head_scale they were trained with"):
        load_poolnet_weights(PoolNet("resnet18", head_scale=0.5), work / "r18.pth")
    with pytest.raises(WSSSError, match="not PoolNet weights"):
        checkpoint.save_weights(work / "bb.pth", build_backbone("resnet18").state_dict())
        load_poolnet_weights(model, work / "bb.pth")


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing", "lacks 2 of the 4 PNGs"),
        ("rgb", "is a RGB image; PoolNet trains on single-channel"),
        ("size", "is 32x32 but its image is 64x64"),
    ],
)
def test_bad_saliency_folder_is_one_line(work, synthetic_voc, capsys, problem, expected):
    ids = (work / "few.txt").read_text().split()
    if problem == "missing":
        for image_id in ids[:2]:
            (work / "sal" / f"{image_id}.png").unlink()
    elif problem == "rgb":
        Image.new("RGB", (64, 64)).save(work / "sal" / f"{ids[1]}.png")
    else:
        Image.new("L", (32, 32)).save(work / "sal" / f"{ids[1]}.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(poolnet_train.main, poolnet_train.get_args_parser(), train_flags(synthetic_voc))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in err, err
    if problem == "missing":
        assert ids[0] in err
    assert not Path("experiments/models/pn").exists()  # refused before any folder was made


def caffe_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The backbone's tensors under Caffe ResNet-50 blob names (conv, bn = statistics, scale = gamma/beta)."""
    out = {}
    for key, value in backbone.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] in ("conv1", "bn1"):
            layer = "conv1" if parts[0] == "conv1" else ("bn_conv1" if "running" in key else "scale_conv1")
            out[f"{layer}.{parts[-1]}"] = value
            continue
        stage, block = int(parts[0][-1]) + 1, "abcdef"[int(parts[1])]
        if parts[2] == "downsample":
            kind = "res" if parts[3] == "0" else ("bn" if "running" in key else "scale")
            branch = "1"
        else:
            kind = "res" if parts[2].startswith("conv") else ("bn" if "running" in key else "scale")
            branch = "2" + "abc"[int(parts[2][-1]) - 1]
        out[f"{kind}{stage}{block}_branch{branch}.{parts[-1]}"] = value
    out["fc1000.weight"] = torch.zeros(1000, 2048)
    return out


def test_caffe_key_mapping_loads_a_constructed_state_dict(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("resnet50", mode="fix")
    for module in source.modules():  # non-trivial statistics, so a swapped mapping would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    torch.save(caffe_state_dict(source), tmp_path / "resnet50_caffe.pth")
    assert "scale2a_branch2b.bias" in caffe_state_dict(source) and "bn5c_branch2c.running_var" in caffe_state_dict(
        source
    )

    torch.manual_seed(1)
    model = PoolNet("resnet50", backbone_weights=tmp_path / "resnet50_caffe.pth", head_scale=0.25)
    assert model.style == "caffe"
    loaded = model.backbone.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    # Caffe layout: stride in the 1x1 conv of layer2/layer3's first block, BGR minus the Caffe mean.
    assert model.backbone.layer2[0].conv1.stride == (2, 2) and model.backbone.layer2[0].conv2.stride == (1, 1)
    image = torch.full((1, 3, 2, 2), 100.0)
    image[:, 0] = 200.0  # red
    normalized = model.normalize(image)
    assert normalized[0, 2, 0, 0].item() == pytest.approx(200.0 - caffe.CAFFE_MEAN_BGR[2])  # red is BGR's last

    # The style travels with the weights: a default-built network takes it over when they are loaded.
    checkpoint.save_weights(tmp_path / "pn.pth", model.state_dict())
    fresh = PoolNet("resnet50", input_style="torchvision", head_scale=0.25)
    load_poolnet_weights(fresh, tmp_path / "pn.pth")
    assert fresh.style == "caffe" and fresh.backbone.layer3[0].conv1.stride == (2, 2)

    with pytest.raises(WSSSError, match="Bottleneck ResNets only"):
        PoolNet("resnet18", backbone_weights=tmp_path / "resnet50_caffe.pth", head_scale=0.25)
