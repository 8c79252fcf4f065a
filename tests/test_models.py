"""Backbones, the CAM classifier and checkpoint compatibility (random weights, 64x64 inputs, CPU)."""

from __future__ import annotations

import argparse
import os
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from core.errors import WSSSError
from core.models import (
    BACKBONES,
    Classifier,
    build_backbone,
    build_model,
    describe_state_dict,
    load_classifier_weights,
    read_checkpoint,
)
from core.models.backbones import FixedBatchNorm2d

torch.set_num_threads(2)


def _image(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _bn_layers(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert list(expected) == list(actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def _to_stage_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename current keys to the reference's 2023-10 → 2024-02 ``stage1..stage5`` layout."""
    renames = [("backbone.conv1.", "stage1.0."), ("backbone.bn1.", "stage1.1.")]
    renames += [(f"backbone.layer{i}.", f"stage{i + 1}.0.") for i in range(1, 5)]
    converted = {}
    for key, value in state_dict.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        converted[key] = value.clone()
    return converted


# ---------------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnest50"])
@pytest.mark.parametrize("dilated", [False, True])
def test_output_stride_and_stage_shapes(name: str, dilated: bool) -> None:
    backbone = build_backbone(name, dilated=dilated).eval()
    with torch.no_grad():
        outputs = backbone(_image(1))
    side = 8 if dilated else 4
    expected_sides = (16, 16, 8, side, side)  # stem and x1 at stride 4, x2 at 8, x3/x4 at the output stride
    assert [tuple(o.shape[2:]) for o in outputs] == [(s, s) for s in expected_sides]
    assert tuple(o.shape[1] for o in outputs) == backbone.stage_channels
    assert backbone.out_channels == backbone.stage_channels[-1]
    assert backbone.output_stride == (8 if dilated else 16)
    expected_stem = 64
    expected_x4 = 512 if name == "resnet18" else 2048
    assert backbone.stage_channels[0] == expected_stem and backbone.out_channels == expected_x4


def test_resnet_os16_matches_torchvision_dilation() -> None:
    """Our re-strided layer4 computes exactly what torchvision's replace_stride_with_dilation builds."""
    ours = build_backbone("resnet50").eval()
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    reference.load_state_dict(
        {**ours.state_dict(), **{k: v for k, v in reference.state_dict().items() if k.startswith("fc.")}}
    )
    image = _image(1)
    with torch.no_grad():
        expected = reference.layer4(
            reference.layer3(
                reference.layer2(
                    reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(image)))))
                )
            )
        )
        actual = ours(image)[-1]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_basicblock_dilation_settings() -> None:
    os16 = build_backbone("resnet18")
    assert os16.layer4[0].conv1.stride == (1, 1) and os16.layer4[0].downsample[0].stride == (1, 1)
    assert os16.layer4[0].conv1.dilation == (1, 1)  # first block keeps dilation 1, as in the reference
    assert os16.layer4[1].conv1.dilation == (2, 2) and os16.layer4[1].conv2.padding == (2, 2)
    assert os16.layer3[0].conv1.stride == (2, 2)
    os8 = build_backbone("resnet18", dilated=True)
    assert os8.layer3[0].conv1.stride == (1, 1) and os8.layer3[1].conv2.dilation == (2, 2)
    assert os8.layer4[1].conv1.dilation == (4, 4) and os8.layer4[1].conv1.padding == (4, 4)


def test_registry_names_and_unknown_backbone() -> None:
    expected = {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnest50",
        "resnest101",
        "resnest200",
        "resnest269",
        "vit_base_patch16_224",
        "vit_small_patch16_224",
        "vit_tiny_patch16_224",
        "test_vit",
        "resnet38",
        "test_resnet38",
    }
    assert set(BACKBONES) == expected
    with pytest.raises(WSSSError, match="unknown architecture 'resnet51'.*resnet50.*resnest269"):
        build_backbone("resnet51")
    with pytest.raises(WSSSError, match="unknown backbone mode"):
        build_backbone("resnet18", mode="frozen")


@pytest.fixture(scope="module")
def resnest269_state_dict() -> dict[str, torch.Tensor]:
    """Built once per run (about 2 s on CPU)."""
    return build_backbone("resnest269").state_dict()


def test_resnest269_depths_and_keys(resnest269_state_dict) -> None:
    """Depths (3, 30, 48, 8) and the official hub key names."""
    state_dict = resnest269_state_dict
    assert describe_state_dict(state_dict) == "resnest269-like network (layers 3,30,48,8)"
    for key in ("conv1.0.weight", "conv1.4.running_var", "layer3.47.conv2.fc1.bias", "layer4.0.downsample.1.weight"):
        assert key in state_dict
    assert not any(k.startswith(("fc.", "avgpool.")) for k in state_dict)


def test_fix_mode_keeps_statistics_and_freezes_affine() -> None:
    backbone = build_backbone("resnet18", mode="fix")
    backbone.train()
    bns = _bn_layers(backbone)
    assert all(isinstance(bn, FixedBatchNorm2d) for bn in bns)
    assert all(not bn.training for bn in bns)  # kept in eval by train()
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    assert backbone.conv1.weight.requires_grad and backbone.layer4[1].conv2.weight.requires_grad
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k or "num_batches" in k}
    train_output = backbone(_image(4))[-1]
    train_output.sum().backward()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        eval_output = backbone.eval()(_image(4))[-1]
    torch.testing.assert_close(train_output.detach(), eval_output)
    assert list(backbone.state_dict()) == list(build_backbone("resnet18").state_dict())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(backbone).train()  # as DDP runs would do
    assert all(isinstance(bn, nn.SyncBatchNorm) and not bn.training for bn in _bn_layers(synced))


def test_frozen_stem_and_frozen_backbone() -> None:
    backbone = build_backbone("resnet18", trainable_stem=False).train()
    assert not backbone.conv1.weight.requires_grad and not backbone.bn1.weight.requires_grad
    assert not backbone.bn1.training and backbone.layer1[0].bn1.training
    stem_mean = backbone.bn1.running_mean.clone()
    layer_mean = backbone.layer1[0].bn1.running_mean.clone()
    backbone(_image(4))
    assert torch.equal(backbone.bn1.running_mean, stem_mean)
    assert not torch.equal(backbone.layer1[0].bn1.running_mean, layer_mean)

    model = Classifier("resnet18", 3, trainable_backbone=False).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(m.training for m in model.backbone.modules() if m is not model.backbone)
    assert model.classifier.weight.requires_grad


# ---------------------------------------------------------------------------------------------- classifier


def test_logits_are_the_mean_of_the_cams() -> None:
    model = Classifier("resnet18", num_classes=5).eval()
    image = _image(2)
    with torch.no_grad():
        logits, cams = model(image, with_cam=True)
        features = model.backbone(image)[-1]
        pooled_then_conv = F.conv2d(features.mean(dim=(2, 3), keepdim=True), model.classifier.weight).flatten(1)
        plain_logits = model(image)
    assert cams.shape == (2, 5, 4, 4) and logits.shape == (2, 5)
    torch.testing.assert_close(logits, cams.mean(dim=(2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(logits, pooled_then_conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain_logits, logits, rtol=0, atol=0)
    assert (cams < 0).any()  # raw maps: no ReLU, no normalisation here


def test_channels_last_gives_the_same_output() -> None:
    model = Classifier("resnest50", num_classes=3).eval()
    image = _image(2, size=32)
    with torch.no_grad():
        expected_logits, expected_cams = model(image, with_cam=True)
        model = model.to(memory_format=torch.channels_last)
        logits, cams = model(image.to(memory_format=torch.channels_last), with_cam=True)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cams, expected_cams, rtol=1e-4, atol=1e-4)


def test_param_groups_partition_trainable_params() -> None:
    model = Classifier("resnet18", num_classes=4, trainable_stem=False)
    groups = model.param_groups()
    assert list(groups) == ["pretrained_weights", "pretrained_biases", "scratch_weights", "scratch_biases"]
    grouped = [id(p) for params in groups.values() for p in params]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable)
    assert id(model.backbone.conv1.weight) not in grouped and id(model.backbone.bn1.bias) not in grouped
    assert [id(p) for p in groups["scratch_weights"]] == [id(model.classifier.weight)]
    assert groups["scratch_biases"] == []
    bns_after_stem = [bn for bn in _bn_layers(model.backbone) if bn is not model.backbone.bn1]
    assert {id(p) for p in groups["pretrained_biases"]} == {id(bn.bias) for bn in bns_after_stem}
    # resnet18 without stem: 19 convs + 19 BN gammas are weights
    assert len(groups["pretrained_weights"]) == 2 * len(bns_after_stem)


def test_model_registry_and_model_kwargs_rebuild() -> None:
    model = build_model("classifier", architecture="resnet18", num_classes=3, mode="fix", dilated=True)
    assert isinstance(model, Classifier)
    assert model.model_kwargs == {
        "architecture": "resnet18",
        "num_classes": 3,
        "backbone_weights": "none",
        "mode": "fix",
        "dilated": True,
        "trainable_stem": True,
        "trainable_backbone": True,
    }
    rebuilt = Classifier(**model.model_kwargs)
    load_classifier_weights(rebuilt, model.state_dict())
    _assert_same_tensors(model.state_dict(), rebuilt.state_dict())
    with pytest.raises(WSSSError, match="unknown model 'cam'.*classifier"):
        build_model("cam")


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("architecture", ["resnet18", "resnest50"])
def test_every_checkpoint_layout_loads_identical_weights(tmp_path, architecture: str) -> None:
    torch.manual_seed(1)
    source = Classifier(architecture, num_classes=3)
    for bn in _bn_layers(source):  # non-default buffers, so a skipped buffer would be noticed
        bn.running_mean.uniform_(-1, 1)
        bn.num_batches_tracked.fill_(7)
    current = source.state_dict()
    backbone_native = {k[len("backbone.") :]: v for k, v in current.items() if k.startswith("backbone.")}
    stage_layout = _to_stage_layout(current)
    layouts = {
        "current": current,
        "module_prefix": {"module." + k: v for k, v in current.items()},
        "model_and_stages": {**{"model." + k: v for k, v in backbone_native.items()}, **stage_layout},
        "stages_only": stage_layout,
        "training_checkpoint": {"model": current, "epoch": 3},
        "pnoc_checkpoint": {"models": {"cg": current, "oc": {"x": torch.zeros(1)}}, "optimizers": {}},
        "state_dict_wrapper": {"state_dict": {"module." + k: v for k, v in stage_layout.items()}},
    }
    if architecture == "resnest50":
        assert "stage1.0.6.weight" in stage_layout  # the deep stem's third conv
    target = Classifier(architecture, num_classes=3)
    for layout, content in layouts.items():
        source_arg = content
        if layout in ("current", "pnoc_checkpoint"):  # through a file too (kept to two: resnest50 files are 100 MB)
            source_arg = tmp_path / f"{layout}.pth"
            torch.save(content, source_arg)
        for tensor in target.state_dict().values():  # so every tensor must come from the source
            tensor.zero_()
        mismatch = load_classifier_weights(target, source_arg)
        assert mismatch.is_empty(), layout
        _assert_same_tensors(current, target.state_dict())


def test_wrong_class_count_names_both(tmp_path) -> None:
    path = tmp_path / "voc21.pth"
    torch.save(Classifier("resnet18", num_classes=21).state_dict(), path)
    model = Classifier("resnet18", num_classes=20)
    with pytest.raises(WSSSError) as error:
        load_classifier_weights(model, path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "21-class resnet18-like classifier (layers 2,2,2,2)" in message
    assert "dataset has 20 foreground classes" in message and "--dataset" in message and "--weights" in message

    # strict=False keeps the backbone and leaves the mismatching head as it was
    head = model.classifier.weight.clone()
    mismatch = load_classifier_weights(model, path, strict=False)
    assert mismatch.wrong_shape == ["classifier.weight"]
    assert torch.equal(model.classifier.weight, head)
    saved = torch.load(path, weights_only=True)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, saved["backbone.layer4.1.conv2.weight"])


def test_wrong_architecture_names_both(tmp_path, resnest269_state_dict) -> None:
    path = tmp_path / "r18.pth"
    torch.save(Classifier("resnet18", num_classes=20).state_dict(), path)
    with pytest.raises(
        WSSSError, match=r"holds a 20-class resnet18-like .* but the model is a 20-class resnet34 .*--architecture"
    ):
        load_classifier_weights(Classifier("resnet34", num_classes=20), path)
    fake_resnest269 = {"backbone." + k: v for k, v in resnest269_state_dict.items()}
    fake_resnest269["classifier.weight"] = torch.zeros(21, 2048, 1, 1)
    with pytest.raises(
        WSSSError,
        match=r"21-class resnest269-like classifier \(layers 3,30,48,8\) but the model is a 20-class resnet18",
    ):
        load_classifier_weights(Classifier("resnet18"), fake_resnest269)


def test_legacy_pickled_checkpoint_needs_trust(tmp_path) -> None:
    model = Classifier("resnet18", num_classes=2)
    path = tmp_path / "legacy.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WSSSError, match="pickled Python objects.*--trust_checkpoint"):
        load_classifier_weights(Classifier("resnet18", num_classes=2), path)
    target = Classifier("resnet18", num_classes=2)
    load_classifier_weights(target, path, trusted=True)
    _assert_same_tensors(model.state_dict(), target.state_dict())
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(WSSSError, match="notes.pth"):
        read_checkpoint(garbage)
    with pytest.raises(WSSSError, match="missing.pth not found"):
        read_checkpoint(tmp_path / "missing.pth")


def test_backbone_weights_from_a_file(tmp_path) -> None:
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)  # a torchvision file, with fc.*
    path = tmp_path / "r18_imagenet.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    backbone = build_backbone("resnet18", weights=str(path), mode="fix")
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    _assert_same_tensors(expected, backbone.state_dict())

    classifier_path = tmp_path / "cam.pth"  # a trained classifier can seed another stage's backbone
    checkpoint = {"backbone." + k: v for k, v in expected.items()}
    checkpoint["classifier.weight"] = torch.zeros(20, 512, 1, 1)
    torch.save({"model": checkpoint}, classifier_path)
    _assert_same_tensors(expected, build_backbone("resnet18", weights=classifier_path).state_dict())

    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(WSSSError, match=r"r34\.pth holds a resnet34-like network .* does not fit resnet18"):
        build_backbone("resnet18", weights=wrong)
    with pytest.raises(WSSSError, match="nothere.pth not found"):
        build_backbone("resnet18", weights=tmp_path / "nothere.pth")


@pytest.mark.parametrize("name", ["resnet50", "resnest50"])
def test_imagenet_weights_offline_is_one_line(tmp_path, monkeypatch, name: str) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst, *args, **kwargs):  # keep the test hermetic even where a network exists
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WSSSError) as error:
        build_backbone(name, weights="imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download ImageNet weights for {name}")
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in message
    assert "--backbone_weights PATH" in message and "--backbone_weights none" in message


def test_imagenet_weights_from_the_cache_or_a_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    reference = torchvision.models.resnet18(weights=None)
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, hash_prefix))
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    _assert_same_tensors(expected, build_backbone("resnet18", weights="imagenet").state_dict())
    assert downloads == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    _assert_same_tensors(expected, build_backbone("resnet18", weights="imagenet").state_dict())
    assert len(downloads) == 1  # the second build reads the cache

    # the reference's (pre-weights-API) file name is used when it is the one cached
    (checkpoints / "resnet18-f37072fd.pth").unlink()
    torch.save(reference.state_dict(), checkpoints / "resnet18-5c106cde.pth")
    _assert_same_tensors(expected, build_backbone("resnet18", weights="imagenet").state_dict())
    assert len(downloads) == 1


# ------------------------------------------------------------------------------------------ scratch init


def _convs(module: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ["resnet18", "resnest50"])
def test_scratch_init_pytorch_gives_pytorchs_default_and_torchvision_kaiming_fan_out(name: str) -> None:
    torch.manual_seed(0)
    default = build_backbone(name, weights="none")
    torch.manual_seed(0)
    old = build_backbone(name, weights="none", scratch_init="torchvision")
    _assert_same_tensors(old.state_dict(), default.state_dict())  # the default is the constructors' init
    torch.manual_seed(0)
    reference = build_backbone(name, weights="none", scratch_init="pytorch")
    for (key, conv), (_, old_conv) in zip(_convs(reference), _convs(old), strict=True):
        weight = conv.weight.detach()
        fan_in = weight[0].numel()  # in_channels / groups * kh * kw
        fan_out = weight.shape[0] * weight[0, 0].numel()  # out_channels * kh * kw, as torch computes it
        bound = 1 / fan_in**0.5  # kaiming_uniform_(a=sqrt(5)): U(-bound, bound), std bound / sqrt(3)
        assert weight.abs().max().item() <= bound, key
        assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.06), key
        assert old_conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.06), key
    for bn in _bn_layers(reference):  # every BN gamma 1 (no zero-init of the last BN of a block), beta 0
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()
    if name == "resnet18":  # layer3.0.conv2 (256 -> 256, 3x3): std 0.0120 (PyTorch) vs 0.0295 (torchvision)
        assert dict(_convs(reference))["layer3.0.conv2"].weight.std().item() == pytest.approx(0.0120, abs=0.0003)
        assert dict(_convs(old))["layer3.0.conv2"].weight.std().item() == pytest.approx(0.0295, abs=0.0005)
    with pytest.raises(WSSSError, match="unknown scratch init 'kaiming'"):
        build_backbone("resnet18", scratch_init="kaiming")


def test_default_scratch_init_is_torchvisions_constructor_unchanged() -> None:
    torch.manual_seed(7)
    expected = torchvision.models.resnet18(weights=None).state_dict()
    torch.manual_seed(7)
    model = Classifier("resnet18", 8, backbone_weights="none")
    _assert_same_tensors({k: v for k, v in expected.items() if not k.startswith("fc.")}, model.backbone.state_dict())


@pytest.mark.parametrize("scratch_init", ["pytorch", "torchvision"])
def test_scratch_init_never_touches_loaded_weights(tmp_path, monkeypatch, scratch_init: str) -> None:
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(weights=None)
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    _assert_same_tensors(expected, build_backbone("resnet18", weights=path, scratch_init=scratch_init).state_dict())
    model = Classifier("resnet18", 8, backbone_weights=str(path), scratch_init=scratch_init)
    _assert_same_tensors(expected, model.backbone.state_dict())
    # ImageNet weights, from the hub cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-5c106cde.pth")
    imagenet = build_backbone("resnet18", weights="imagenet", scratch_init=scratch_init)
    _assert_same_tensors(expected, imagenet.state_dict())


def test_scratch_init_flag_default_and_choices() -> None:
    from core.cam import training as cam_training

    parser = argparse.ArgumentParser()
    cam_training.add_classifier_args(parser)
    args = parser.parse_args(["--architecture", "resnet18", "--backbone_weights", "none"])
    assert args.scratch_init == "torchvision"
    with pytest.raises(SystemExit):
        parser.parse_args(["--scratch_init", "xavier"])
    for flag, expected_std in (("pytorch", 1 / (3 * 64 * 9) ** 0.5), ("torchvision", (2 / (64 * 9)) ** 0.5)):
        torch.manual_seed(0)
        args = parser.parse_args(["--architecture", "resnet18", "--backbone_weights", "none", "--scratch-init", flag])
        model = cam_training.classifier_from_flags(args, 8)
        std = model.backbone.layer1[0].conv1.weight.std().item()  # 64 -> 64, 3x3
        assert std == pytest.approx(expected_std, rel=0.06)
        assert "scratch_init" not in model.model_kwargs  # checkpoints supply every weight: not needed to rebuild
