"""Puzzle-CAM tiling: cut images into a grid of tiles, run the classifier on the tiles, stitch the tile maps back.

Layout convention (the reference's): tiles are taken row-major from the grid and stacked tile-major along the batch
axis, so for a batch ``[x0, x1]`` and 4 pieces the tiled batch is
``[x0 top-left, x1 top-left, x0 top-right, x1 top-right, x0 bottom-left, x1 bottom-left, x0 bottom-right, ...]``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)


def grid_side(pieces: int) -> int:
    """Number of tiles per grid row for ``pieces`` tiles (a perfect square >= 1)."""
    side = math.isqrt(pieces)
    if pieces < 1 or side * side != pieces:
        raise ValueError(f"the number of puzzle pieces must be a perfect square (4, 9, ...), got {pieces}")
    return side


def tile_images(x: torch.Tensor, pieces: int = 4, output_stride: int = 16) -> torch.Tensor:
    """Cut every image into a ``sqrt(pieces) x sqrt(pieces)`` grid and stack the tiles on the batch axis.

    Args:
        x: [B, K, H, W] (images or feature maps, any dtype).
        pieces: number of tiles, a perfect square (4 = 2x2 grid).
        output_stride: the classifier's output stride; H and W must be divisible by ``side * output_stride`` so the
            stitched tile maps have exactly the size of the full-image maps. Use 1 to only require an even split.

    Returns:
        [pieces * B, K, H / side, W / side]; tile ``t`` of image ``b`` is at index ``t * B + b``, tiles row-major.
    """
    side = grid_side(pieces)
    b, k, h, w = x.shape
    multiple = side * output_stride
    if h % multiple or w % multiple:
        raise ValueError(
            f"Puzzle tiling needs image height and width divisible by {multiple} "
            f"({side} tiles x output stride {output_stride}), got {h}x{w}: use a crop size such as 512"
        )
    th, tw = h // side, w // side
    tiles = x.reshape(b, k, side, th, side, tw)
    # [B, K, row, th, col, tw] -> [row, col, B, K, th, tw]: row-major tiles, batch inside each tile slot
    tiles = tiles.permute(2, 4, 0, 1, 3, 5)
    return tiles.reshape(pieces * b, k, th, tw)


def merge_tiles(tiles: torch.Tensor, pieces: int = 4) -> torch.Tensor:
    """Stitch tile-major stacked tiles back into full maps (the inverse of :func:`tile_images`).

    Args:
        tiles: [pieces * B, C, h, w], tile ``t`` of sample ``b`` at index ``t * B + b``.
        pieces: number of tiles per sample, a perfect square.

    Returns:
        [B, C, side * h, side * w] with ``side = sqrt(pieces)``.
    """
    side = grid_side(pieces)
    n, c, h, w = tiles.shape
    if n % pieces:
        raise ValueError(f"{n} tiles cannot be split into groups of {pieces} pieces")
    b = n // pieces
    grid = tiles.reshape(side, side, b, c, h, w)
    # [row, col, B, C, h, w] -> [B, C, row, h, col, w]
    grid = grid.permute(2, 3, 0, 4, 1, 5)
    return grid.reshape(b, c, side * h, side * w)


def puzzle_outputs(model: nn.Module, x: torch.Tensor, pieces: int = 4, output_stride: int = 16) -> torch.Tensor:
    """Run ``model`` on the tiles of ``x`` and return the tile class maps merged back to full size (``A_re``).

    Args:
        model: a classifier whose ``forward(x, with_cam=True)`` returns ``(logits [N, C], maps [N, C, h, w])``.
        x: float [B, 3, H, W], normalised images; H, W divisible by ``sqrt(pieces) * output_stride``.
        pieces: number of tiles (4 = the reference's 2x2 grid).
        output_stride: the model's output stride (16 for ResNet/ResNeSt, 8 when dilated).

    Returns:
        float [B, C, H / output_stride, W / output_stride], raw (pre-ReLU) merged maps, differentiable.
    """
    tiles = tile_images(x, pieces, output_stride)
    _, tile_maps = model(tiles, with_cam=True)
    return merge_tiles(tile_maps, pieces)
