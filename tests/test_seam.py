"""The ResNet-38 backbone, its reference checkpoints, SEAM's PCM and loss terms, and train_seam.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.artifacts import load_cam
from core.cam import seam, training
from core.cam.seam import PixelCorrelationModule, SeamClassifier, SeamOutputs
from core.errors import WSSSError
from core.models import Classifier, build_backbone, load_classifier_weights
from core.models.compat import RESNET38_BLOCKS, architecture_of, describe_state_dict
from scripts.cam import inference, train_seam

pytestmark = pytest.mark.torch_threads(1)


# -- ResNet-38 ------------------------------------------------------------------------------------------------------
def test_resnet38_is_the_published_network():
    with torch.device("meta"):  # shapes only: no 105 M-parameter initialisation
        backbone = build_backbone("resnet38", mode="fix", trainable_stem=False)
        outputs = backbone(torch.empty(2, 3, 448, 448))
    assert sum(p.numel() for p in backbone.parameters()) == 105_070_912
    assert [tuple(o.shape[1:]) for o in outputs] == [
        (128, 224, 224), (256, 112, 112), (512, 56, 56), (1024, 56, 56), (4096, 56, 56)
    ]  # fmt: skip
    assert backbone.output_stride == 8 and backbone.out_channels == 4096
    state = backbone.state_dict()
    assert architecture_of(state) == "resnet38" and "blocks 3,3,6,3,1,1" in describe_state_dict(state)
    for key in ("conv1a.weight", "b2.conv_branch2a.weight", "b4_5.bn_branch2a.running_var", "b7.conv_branch2b2.weight"):
        assert key in state
    trainable = {name.split(".")[0] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable.isdisjoint({"conv1a", "b2", "b2_1", "b2_2", "bn7"})  # frozen stem; BN frozen (mode fix)
    assert not any("bn" in name for name, p in backbone.named_parameters() if p.requires_grad)


def test_resnet38_stage_features_are_the_references_conv4_conv5_conv6():
    torch.manual_seed(0)
    backbone = build_backbone("test_resnet38").eval()
    image = torch.randn(1, 3, 32, 32)
    stem, x1, x2, x3, x4 = backbone(image)
    hidden = backbone.conv1a(image)
    for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
        hidden = getattr(backbone, name)(hidden)[0]
    conv4 = torch.relu(backbone.b5.bn_branch2a(hidden))
    torch.testing.assert_close(x2, conv4)
    assert all(f.min() >= 0 for f in (stem, x1, x2, x3, x4)) and x4.shape[-2:] == (4, 4)


def test_imagenet_weights_of_resnet38_ask_for_a_converted_file():
    with pytest.raises(WSSSError, match="--backbone_weights PATH") as info:
        build_backbone("test_resnet38", weights="imagenet")
    assert "\n" not in str(info.value) and "core/models/resnet38.py" in str(info.value)


def reference_layout(model: torch.nn.Module, projection: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s weights under the SEAM/PPC/PSA key names, without the BN counters (as the released files)."""
    renames = {"classifier.": "fc8.", "pcm.low.": "f8_3.", "pcm.mid.": "f8_4.", "pcm.fuse.": "f9."}
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.removeprefix("backbone.")
        for old, new in renames.items():
            key = new + key[len(old) :] if key.startswith(old) else key
        state[key] = value.clone()
    if projection:
        state["fc_proj.weight"] = torch.randn(128, model.backbone.out_channels, 1, 1)
    return state


def test_released_seam_ppc_and_psa_layouts_load(tmp_path):
    torch.manual_seed(0)
    seam_model = SeamClassifier("test_resnet38", 20, mode="fix")
    torch.save(reference_layout(seam_model, projection=True), tmp_path / "ppc.pth")
    loaded = SeamClassifier("test_resnet38", 20, mode="fix")
    load_classifier_weights(loaded, tmp_path / "ppc.pth")  # the projection head is training-only: dropped
    for key, value in seam_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # CAM inference recognises the released SEAM/PPC file by its PCM and runs its PCM maps.
    flags = ["--tag", "ppc", "--architecture", "test_resnet38", "--mode", "fix"]
    network = training.trained_classifier(
        inference.get_args_parser().parse_args(flags), 20, tmp_path / "ppc.pth", "cpu"
    )
    assert isinstance(network, SeamClassifier) and network.projection is None and not network.training

    psa_model = Classifier("test_resnet38", 20, mode="fix")
    torch.save(reference_layout(psa_model), tmp_path / "psa.pth")
    load_classifier_weights(Classifier("test_resnet38", 20, mode="fix"), tmp_path / "psa.pth")

    # A converted ImageNet file (backbone keys only) and a SEAM file both serve as --backbone_weights.
    backbone_only = {k: v for k, v in reference_layout(psa_model).items() if not k.startswith("fc8.")}
    torch.save(backbone_only, tmp_path / "imagenet.pth")
    for name, source in (("imagenet.pth", psa_model), ("ppc.pth", seam_model)):
        backbone = build_backbone("test_resnet38", weights=tmp_path / name)
        assert torch.equal(backbone.b4_5.conv_branch2a.weight, source.backbone.b4_5.conv_branch2a.weight)


def test_resnet38_checkpoint_of_another_layout_is_refused_in_one_line(tmp_path):
    torch.save(Classifier("resnet18", 20).state_dict(), tmp_path / "r18.pth")
    truncated = reference_layout(SeamClassifier("test_resnet38", 20))
    del truncated["b4_5.conv_branch2a.weight"]
    torch.save(truncated, tmp_path / "truncated.pth")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name in ("r18.pth", "truncated.pth"):
        with pytest.raises(WSSSError) as info:
            load_classifier_weights(SeamClassifier("test_resnet38", 20), tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
        with pytest.raises(WSSSError, match="does not fit test_resnet38") as info:
            build_backbone("test_resnet38", weights=tmp_path / name)
        assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing rewritten
    assert RESNET38_BLOCKS == (3, 3, 6, 3, 1, 1)


# -- PCM and loss terms ---------------------------------------------------------------------------------------------
def test_pcm_output_is_a_convex_combination_of_its_inputs():
    torch.manual_seed(0)
    pcm = PixelCorrelationModule(8, 16)
    image, low, mid = torch.randn(2, 3, 24, 24), torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)
    weights = pcm.affinity(image, low, mid, (6, 6))
    assert weights.shape == (2, 36, 36) and weights.min() >= 0
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 36), atol=1e-4, rtol=0)
    maps = torch.randn(2, 4, 6, 6)
    refined = pcm(maps, image, low, mid)
    torch.testing.assert_close(refined, (maps.flatten(2) @ weights).view(2, 4, 6, 6))
    low_bound, high_bound = maps.flatten(2).amin(2)[..., None, None], maps.flatten(2).amax(2)[..., None, None]
    assert (refined >= low_bound - 1e-4).all() and (refined <= high_bound + 1e-4).all()


def test_pcm_input_keeps_the_best_foreground_class_and_sets_background():
    maps = torch.tensor([[[[9.0, 5.0, 0.0]], [[1.0, 2.0, 0.5]], [[4.0, -1.0, 0.8]]]])  # [1, 3 (bg, c1, c2), 1, 3]
    prepared = seam.pcm_input(maps)
    # max-normalised c1 (0.5, 1, 0.25) and c2 (1, 0, 0.2): each pixel keeps its best class; bg = 1 - best.
    expected = torch.tensor([[[[0.0, 0.0, 0.75]], [[0.0, 1.0, 0.25]], [[1.0, 0.0, 0.0]]]])
    torch.testing.assert_close(prepared, expected, atol=1e-4, rtol=0)


def ramp(size: int, classes: int = 3) -> torch.Tensor:
    """Per-class linear ramps sampled on an align-corners grid: resizing them is exact (an equivariant map)."""
    grid = torch.linspace(0, 1, size)
    planes = [grid[None, :] * (c + 1) + grid[:, None] * (classes - c) for c in range(classes)]
    return torch.stack(planes)[None]


def outputs(maps: torch.Tensor) -> SeamOutputs:
    return SeamOutputs(maps, maps.clone(), maps)


def test_equivariance_loss_is_zero_for_an_equivariant_map():
    labels = torch.tensor([[1.0, 1.0]])  # 2 foreground classes + background channel
    class_loss = seam.methods.classification_loss()
    terms = seam.seam_losses(outputs(ramp(8)), outputs(ramp(5)), (64, 64), (19, 19), labels, class_loss)
    assert terms["er_loss"].item() == pytest.approx(0.0, abs=1e-5)
    mirrored = seam.seam_losses(outputs(ramp(8)), outputs(ramp(5).flip(-1)), (64, 64), (19, 19), labels, class_loss)
    assert mirrored["er_loss"].item() > 0.1


def test_ohem_averages_exactly_the_top_fifth():
    errors = torch.stack([torch.arange(100.0), torch.arange(100.0).flip(0) * 2]).view(2, 4, 5, 5)
    # top 20 of 0..99 = 80..99 (mean 89.5); of 0..198 step 2 = 160..198 (mean 179): mean of both 134.25
    assert seam.ohem_mean(errors, 0.2).item() == pytest.approx(134.25)
    assert seam.ohem_mean(torch.arange(21.0 * 3 * 3).view(1, 21, 3, 3), 0.2).item() == pytest.approx(
        float(np.mean(np.arange(189)[-37:]))  # int(189 * 0.2) = 37 entries
    )


def test_adaptive_min_pooling_averages_the_lowest_quarter_of_max_fg():
    maps = torch.stack([torch.arange(16.0).view(4, 4), torch.zeros(4, 4)])[None]  # max_fg = 0..15
    assert seam.adaptive_min_pool_loss(maps).item() == pytest.approx(1.5)  # mean of 0, 1, 2, 3


def test_inference_forward_returns_the_pcm_maps():
    torch.manual_seed(0)
    model = SeamClassifier("resnet18", 5, dilated=True).eval()
    image = torch.randn(2, 3, 64, 64)
    logits, cams = model(image, with_cam=True)
    full = model(image, full=True)
    assert cams.shape == (2, 5, 8, 8) and full.maps.shape == (2, 6, 8, 8)
    torch.testing.assert_close(cams, full.refined[:, 1:])
    torch.testing.assert_close(logits, full.maps[:, 1:].mean(dim=(2, 3)))


# -- scripts --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_ppc", [False, True])
def test_train_seam_then_inference_writes_pcm_cams(with_ppc, synthetic_voc, tmp_path):
    args = train_seam.get_args_parser().parse_args([
        "--tag", "seam/r18", "--data_dir", str(synthetic_voc), "--domain_train", "train", "--architecture", "resnet18",
        "--backbone_weights", "none", "--mode", "normal", "--dilated", "false", "--trainable-stem", "true",
        "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80", "--batch_size", "12",
        "--max_epoch", "1", "--num_workers", "0", "--device", "cpu", "--print_ratio", "0.5",
        "--ppc", str(with_ppc).lower(), "--ppc_view_size", "48",
    ])  # fmt: skip
    summary = train_seam.main(args)
    final = Path(summary["final_path"])
    records = [json.loads(line) for line in (final.with_suffix("") / "metrics.jsonl").read_text().splitlines()]
    terms = [r for r in records if r["kind"] == "train"][-1]
    seam_terms = ("cls_loss", "min_loss", "er_loss", "ecr_loss") + (("ppc_loss",) if with_ppc else ())
    assert {"loss", *seam_terms} <= set(terms)
    assert terms["loss"] == pytest.approx(sum(terms[k] for k in seam_terms), rel=1e-5)
    state = torch.load(final, weights_only=True)
    assert state["classifier.weight"].shape[0] == 21 and "pcm.fuse.weight" in state  # VOC: 20 + background
    assert ("projection.conv.weight" in state) == with_ppc
    if with_ppc:  # L_nce = 0.1 (L_cp + L_cc + L_intra)
        assert terms["ppc_loss"] == pytest.approx(0.1 * (terms["ppc_cp"] + terms["ppc_cc"] + terms["ppc_intra"]))

    out_dir = tmp_path / "cams"
    result = inference.main(inference.get_args_parser().parse_args([
        "--tag", "seam/r18", "--architecture", "resnet18", "--data_dir", str(synthetic_voc), "--domain", "val",
        "--scales", "1.0", "--device", "cpu", "--num_workers", "0", "--pred_dir", str(out_dir),
    ]))  # fmt: skip
    assert result["written"] > 0
    cams = load_cam(next(out_dir.glob("*.npz")))
    assert cams.hr_cam.shape[1:] == (64, 64) and 0 <= cams.hr_cam.min() and cams.hr_cam.max() <= 1
    assert len(cams.keys) == len(cams.hr_cam) > 0


def test_train_seam_with_backbone_weights_of_another_layout_stops_in_one_line(synthetic_voc, tmp_path):
    torch.save(Classifier("resnet18", 20).state_dict(), tmp_path / "r18.pth")
    args = train_seam.get_args_parser().parse_args([
        "--tag", "seam/bad", "--data_dir", str(synthetic_voc), "--domain_train", "train",
        "--architecture", "test_resnet38", "--backbone_weights", str(tmp_path / "r18.pth"), "--image_size", "32",
        "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
    ])  # fmt: skip
    with pytest.raises(WSSSError, match="resnet18-like.*does not fit test_resnet38") as info:
        train_seam.main(args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "experiments" / "models" / "seam" / "bad.pth").exists()
