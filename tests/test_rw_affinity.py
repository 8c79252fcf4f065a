"""AffinityNet: the network on ResNet and ResNeSt, the edge map, the reference's checkpoint layouts, the affinity
targets and loss on hand-made label maps, and training through scripts/rw/train_affinity.py."""

from __future__ import annotations

import re

import pytest
import torch

from core.errors import WSSSError
from core.models import Classifier
from core.rw.network import AffinityNet, load_affinity_net, normalize_affinity_keys

pytestmark = pytest.mark.torch_threads(1)


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("architecture", "stem"), [("resnet18", 64), ("resnest50", 64)])
def test_edge_logits_come_at_stride_4_and_only_the_edge_branch_gets_gradients(architecture, stem):
    torch.manual_seed(0)
    model = AffinityNet(architecture).train()
    assert model.fc_edge1[0].in_channels == stem == model.backbone.stage_channels[0]
    logits = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 1, 16, 24)
    logits.mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.edge_parameters())
    assert not any(m.training for m in model.backbone.modules())  # the frozen backbone stays in eval mode
    edge = model.edge_map(torch.randn(3, 50, 70))
    assert edge.shape == (13, 18) and edge.dtype == torch.float32 and 0 < edge.min() <= edge.max() < 1


def test_the_edge_map_averages_an_image_and_its_mirror():
    torch.manual_seed(0)
    model = AffinityNet("resnet18").eval()
    image = torch.randn(3, 64, 64)
    edge = model.edge_map(image)
    mirrored = model.edge_map(image.flip(-1))
    torch.testing.assert_close(edge, mirrored.flip(-1), atol=1e-5, rtol=1e-5)
    logits = model(torch.stack([image, image.flip(-1)]))[:, 0]
    torch.testing.assert_close(edge, torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2), atol=1e-5, rtol=1e-5)
    assert model.edge_map(image, pad_size=96).shape == (16, 16)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint layouts (SPEC §2.4)
# --------------------------------------------------------------------------------------------------------------------


def _stage_key(key: str, prefix: str) -> str:
    """``backbone.conv1.x`` -> ``<prefix>1.0.x`` etc.: the reference's stage naming (stage k+1 <-> prefix index k)."""
    key = key[len("backbone.") :]
    for native, stage in (("conv1.", "0.0."), ("bn1.", "0.1."), *((f"layer{i}.", f"{i}.0.") for i in range(1, 5))):
        if key.startswith(native):
            index, rest = stage.split(".", 1)
            number = int(index) + (1 if prefix == "stage" else 0)
            return f"{prefix}{number}.{rest}{key[len(native) :]}"
    raise AssertionError(key)


def _layouts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    edges = {k: v for k, v in state.items() if k.startswith("fc_edge")}
    duplicates = {
        re.sub(r"^fc_edge(\d)", lambda m: f"edge_layers.{int(m.group(1)) - 1}", k): v for k, v in edges.items()
    }
    buffers = {"path_indices_0": torch.zeros(3, 7, dtype=torch.int64), "path_indices_1": torch.zeros(5, 2)}
    return {
        "current + path buffers": state | buffers,
        "stage ModuleList + edge_layers": {_stage_key(k, "backbone."): v for k, v in backbone.items()}
        | edges
        | duplicates
        | buffers,
        "model + stage duplicates": {"model." + k[len("backbone.") :]: v for k, v in backbone.items()}
        | {_stage_key(k, "stage"): v for k, v in backbone.items()}
        | edges
        | buffers,
        "stages only, edge_layers only, DataParallel": {
            "module." + k: v for k, v in ({_stage_key(k, "stage"): v for k, v in backbone.items()} | duplicates).items()
        },
    }


@pytest.mark.parametrize("architecture", ["resnet18", "resnest50"])
def test_the_reference_affinity_layouts_load(architecture, tmp_path):
    torch.manual_seed(0)
    trained = AffinityNet(architecture)
    state = trained.state_dict()
    image = torch.randn(3, 32, 32)
    expected = trained.eval().edge_map(image)
    for name, layout in _layouts(state).items():
        assert normalize_affinity_keys(layout).keys() == state.keys(), name
        path = tmp_path / "aff.pth"
        torch.save(layout, path)
        loaded = load_affinity_net(path)  # the architecture is read from the file
        assert loaded.model_kwargs["architecture"] == architecture
        torch.testing.assert_close(loaded.edge_map(image), expected, msg=name)


def test_weights_of_another_backbone_or_network_are_refused_in_one_line(tmp_path):
    path = tmp_path / "aff.pth"
    torch.save(AffinityNet("resnet18").state_dict(), path)
    with pytest.raises(WSSSError) as error:
        load_affinity_net(path, "resnet34")
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "resnet18" in message and "--architecture" in message
    torch.save(Classifier("resnet18", 5).state_dict(), path)
    with pytest.raises(WSSSError, match="not an AffinityNet.*train_affinity.py"):
        load_affinity_net(path)
