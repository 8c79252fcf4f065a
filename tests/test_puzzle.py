"""Tile order, tile/merge identity and the Puzzle forward of core/puzzle.py."""

import pytest
import torch
from torch import nn

from core.cam.puzzle import merge_tiles, puzzle_outputs, tile_images
from core.losses import reconstruction_loss


class PooledConvCAM(nn.Module):
    """Stand-in classifier: stride-16 average pooling then a 1x1 conv, so each map cell sees one 16x16 block."""

    def __init__(self, num_classes: int = 3, stride: int = 16) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(stride)
        self.classifier = nn.Conv2d(3, num_classes, 1, bias=False)

    def forward(self, x, with_cam=False):
        maps = self.classifier(self.pool(x))
        logits = maps.mean(dim=(2, 3))
        return (logits, maps) if with_cam else logits


def test_tile_order_row_major_tile_major():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    tiles = tile_images(x, pieces=4, output_stride=1)
    assert tiles.shape == (8, 1, 2, 2)
    # tile-major: index t * B + b holds tile t of image b; tiles go top-left, top-right, bottom-left, bottom-right
    assert torch.equal(tiles[0], x[0, :, :2, :2])
    assert torch.equal(tiles[1], x[1, :, :2, :2])
    assert torch.equal(tiles[2], x[0, :, :2, 2:])
    assert torch.equal(tiles[5], x[1, :, 2:, :2])
    assert torch.equal(tiles[7], x[1, :, 2:, 2:])
    assert tiles[2].flatten().tolist() == [2.0, 3.0, 6.0, 7.0]
    assert tiles[5].flatten().tolist() == [24.0, 25.0, 28.0, 29.0]


@pytest.mark.parametrize("pieces", [4, 9, 1])
def test_tile_then_merge_is_identity(pieces):
    side = int(pieces**0.5)
    x = torch.randn(3, 5, 6 * side, 4 * side)
    assert torch.equal(merge_tiles(tile_images(x, pieces, output_stride=1), pieces), x)


def test_merge_then_tile_is_identity():
    tiles = torch.randn(8, 3, 2, 3)
    assert torch.equal(tile_images(merge_tiles(tiles), output_stride=1), tiles)


def test_tiling_rejects_sizes_not_divisible_by_twice_the_stride():
    with pytest.raises(ValueError, match="divisible by 32"):
        tile_images(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="perfect square"):
        tile_images(torch.zeros(1, 3, 64, 64), pieces=3)
    with pytest.raises(ValueError):
        merge_tiles(torch.zeros(6, 3, 2, 2))


def test_puzzle_outputs_of_a_local_model_equal_the_full_maps():
    torch.manual_seed(0)
    model = PooledConvCAM()
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    _, full_maps = model(x, with_cam=True)
    merged = puzzle_outputs(model, x)
    assert merged.shape == full_maps.shape == (2, 3, 4, 6)
    # the pooling cells never straddle tile borders, so tiling changes nothing for this model
    assert torch.allclose(merged, full_maps, atol=1e-6)
    assert reconstruction_loss(full_maps, merged, torch.ones(2, 3)).item() < 1e-6
    merged.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_puzzle_outputs_differ_for_a_model_with_context():
    torch.manual_seed(0)

    class GlobalContextCAM(PooledConvCAM):
        def forward(self, x, with_cam=False):
            maps = self.classifier(self.pool(x))
            maps = maps + maps.mean(dim=(2, 3), keepdim=True)  # every cell sees the whole input
            return (maps.mean(dim=(2, 3)), maps) if with_cam else maps.mean(dim=(2, 3))

    model = GlobalContextCAM()
    x = torch.randn(1, 3, 64, 64)
    _, full_maps = model(x, with_cam=True)
    assert not torch.allclose(puzzle_outputs(model, x), full_maps, atol=1e-4)
