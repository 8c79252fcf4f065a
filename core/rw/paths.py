"""Pixel pairs within a radius and the lattice paths between them (SPEC §9.2): the geometry of the affinities.

AffinityNet predicts a boundary map; the affinity of two pixels is ``1 - max(boundary along the straight path between
them)``. A :class:`PathIndex` fixes which pairs exist on an ``(h, w)`` grid and in which order they are stored:

* search directions ``(dy, dx)`` with ``dy >= 0``, ``dy² + dx² < r²`` and ``dx > 0`` when ``dy = 0`` (half of the
  disc: every unordered pair appears once);
* the path of a direction: the lattice points of its bounding box within distance 1 of the segment, destination
  first; directions are stored grouped by path length (shortest first), in search order inside a group;
* sources: the grid cropped by ``r - 1`` at the bottom, left and right (so every destination stays inside), as
  flat indices ``src_indices [n_src]``; ``dst_indices [n_directions, n_src]`` are the destinations.

This is the layout of the reference (IRN's ``PathIndex``), so affinities and targets line up with it. Paths are
evaluated by slicing the boundary map, not by gathering precomputed index tensors, so nothing of size
``path points × n_src`` is stored; :meth:`PathIndex.path_indices` builds the reference's tensors when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from core.labels import IGNORE_INDEX

_CACHED_INDICES = 16  # (radius, size) pairs kept by path_index: an image of a new size just builds one more


def search_directions(radius: int) -> list[tuple[int, int]]:
    """The offsets ``(dy, dx)`` of half the disc of ``radius`` (origin excluded), in the reference's search order."""
    directions = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        directions += [(dy, dx) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius * radius]
    return directions


def direction_path(dy: int, dx: int) -> list[tuple[int, int]]:
    """Lattice points of the box spanned by ``(0, 0)`` and ``(dy, dx)`` within distance 1 of the segment between
    them, farthest first (the destination, then towards the origin; the origin is included)."""
    length_sq = dy * dy + dx * dx
    points = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq  # squared distance to the line, times length_sq, below 1
    ]
    return sorted(points, key=lambda p: -abs(p[0]) - abs(p[1]))  # stable: ties keep the reference's order


@dataclass(frozen=True)
class PathIndex:
    """The pairs and paths of ``radius`` on a grid of ``size = (h, w)`` (see the module docstring).

    Attributes:
        radius: pairs are closer than ``radius`` pixels (integer, >= 2).
        size: ``(h, w)`` of the grid the boundary map has.
    """

    radius: int
    size: tuple[int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.radius, int) or self.radius < 2:
            raise ValueError(f"PathIndex radius must be an integer >= 2, got {self.radius!r}")
        height, width = self.size
        if height - self.margin < 1 or width - 2 * self.margin < 1:
            raise ValueError(
                f"a {height}x{width} grid is too small for radius {self.radius}: it needs at least "
                f"{self.margin + 1}x{2 * self.margin + 1} cells (pad the boundary map first)"
            )

    @property
    def margin(self) -> int:
        """Cells cropped from the bottom, left and right to keep every destination inside (``radius - 1``)."""
        return self.radius - 1

    @property
    def cropped_size(self) -> tuple[int, int]:
        """``(h - margin, w - 2 margin)``: the grid of sources."""
        return self.size[0] - self.margin, self.size[1] - 2 * self.margin

    @property
    def n_src(self) -> int:
        return self.cropped_size[0] * self.cropped_size[1]

    @cached_property
    def paths(self) -> tuple[np.ndarray, ...]:
        """Per path length (ascending): int64 ``[n_paths, length, 2]`` offsets ``(dy, dx)``, destination first."""
        by_length: dict[int, list[list[tuple[int, int]]]] = {}
        for dy, dx in search_directions(self.radius):
            path = direction_path(dy, dx)
            by_length.setdefault(len(path), []).append(path)
        return tuple(np.asarray(by_length[n], dtype=np.int64) for n in sorted(by_length))

    @cached_property
    def directions(self) -> np.ndarray:
        """int64 ``[n_directions, 2]``: the offset ``(dy, dx)`` of every direction, in storage order."""
        return np.concatenate([group[:, 0] for group in self.paths])

    @property
    def n_directions(self) -> int:
        return len(self.directions)

    def _window(self, flat: np.ndarray, dy: int, dx: int) -> np.ndarray:
        """``flat[dy + y, margin + dx + x]`` for every source ``(y, x)`` of the cropped grid, flattened."""
        rows, cols = self.cropped_size
        start = self.margin + dx
        return flat[dy : dy + rows, start : start + cols].reshape(-1)

    @cached_property
    def src_indices(self) -> np.ndarray:
        """int64 ``[n_src]``: flat grid index of every source (row-major over the cropped grid)."""
        return self._window(self._grid(), 0, 0)

    @cached_property
    def dst_indices(self) -> np.ndarray:
        """int64 ``[n_directions, n_src]``: flat grid index of the destination of every (direction, source)."""
        grid = self._grid()
        return np.stack([self._window(grid, int(dy), int(dx)) for dy, dx in self.directions])

    def path_indices(self) -> list[np.ndarray]:
        """The reference's ``path_indices``: per length group int64 ``[n_paths, length, n_src]`` flat grid indices of
        every path point of every source (built on demand; large for radius 10)."""
        grid = self._grid()
        return [
            np.stack([np.stack([self._window(grid, int(dy), int(dx)) for dy, dx in path]) for path in group])
            for group in self.paths
        ]

    def _grid(self) -> np.ndarray:
        return np.arange(self.size[0] * self.size[1], dtype=np.int64).reshape(self.size)


@lru_cache(maxsize=_CACHED_INDICES)
def path_index(radius: int, size: tuple[int, int]) -> PathIndex:
    """The :class:`PathIndex` of ``radius`` on an ``(h, w)`` grid, built once per ``(radius, size)`` and cached."""
    return PathIndex(int(radius), (int(size[0]), int(size[1])))


def edge_to_affinity(edge: torch.Tensor, index: PathIndex) -> torch.Tensor:
    """Affinity of every (direction, source) pair: ``1 - max(edge)`` over the points of the direction's path.

    Args:
        edge: float ``[B, 1, h, w]`` boundary probabilities in ``[0, 1]``, ``(h, w) = index.size``.
        index: the pairs (e.g. ``path_index(10, (h, w))``).

    Returns:
        ``[B, n_directions, n_src]`` in ``[0, 1]``, the dtype and device of ``edge``; differentiable.
    """
    if edge.dim() != 4 or edge.shape[1] != 1 or tuple(edge.shape[2:]) != index.size:
        raise ValueError(f"edge must be [B, 1, {index.size[0]}, {index.size[1]}], got {list(edge.shape)}")
    rows, cols = index.cropped_size
    margin = index.margin
    maps = edge[:, 0]
    groups = []
    for group in index.paths:  # one stack per path length: [B, n_paths, length, rows, cols]
        points = [
            torch.stack([maps[:, dy : dy + rows, margin + dx : margin + dx + cols] for dy, dx in path.tolist()], 1)
            for path in group
        ]
        groups.append(torch.stack(points, 1).amax(dim=2))
    return 1 - torch.cat(groups, dim=1).flatten(2)


def affinity_targets(
    labels: torch.Tensor, index: PathIndex, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair targets of a label map (SPEC §9.2): a pair counts when neither end is ``ignore_index``.

    Args:
        labels: integer ``[B, h, w]`` (or ``[h, w]``) label map at the boundary map's resolution, ``(h, w) =
            index.size``; 0 = background, 1..C classes, ``ignore_index`` = unknown.
        index: the pairs.

    Returns:
        ``(bg_pos, fg_pos, neg)``, float32 ``[B, n_directions, n_src]`` in {0, 1} (no batch dim for ``[h, w]``):
        same label and background; same label and a class; different labels.
    """
    if tuple(labels.shape[-2:]) != index.size:
        raise ValueError(f"labels must be [..., {index.size[0]}, {index.size[1]}], got {list(labels.shape)}")
    flat = labels.flatten(-2).long()
    src = flat[..., torch.from_numpy(index.src_indices).to(flat.device)].unsqueeze(-2)  # [..., 1, n_src]
    dst = flat[..., torch.from_numpy(index.dst_indices).to(flat.device)]  # [..., n_directions, n_src]
    valid = (src != ignore_index) & (dst != ignore_index)
    equal = valid & (src == dst)
    return (equal & (src == 0)).float(), (equal & (src > 0)).float(), (valid & (src != dst)).float()


def feature_affinity(features: torch.Tensor, index: PathIndex) -> torch.Tensor:
    """PSA's affinity of every (direction, source) pair: ``exp(-mean_k |f_src,k - f_dst,k|)`` (METHODS §2).

    The pairs are those of ``index`` (half the disc, sources on the cropped grid), the same layout as
    :func:`edge_to_affinity`, so :func:`affinity_targets` and the loss apply unchanged.

    Args:
        features: float ``[B, D, h, w]`` pixel features, ``(h, w) = index.size``.
        index: the pairs (e.g. ``path_index(5, (h, w))``).

    Returns:
        ``[B, n_directions, n_src]`` in ``(0, 1]`` (1 for identical features), the dtype and device of
        ``features``; differentiable.
    """
    if features.dim() != 4 or tuple(features.shape[2:]) != index.size:
        raise ValueError(f"features must be [B, D, {index.size[0]}, {index.size[1]}], got {list(features.shape)}")
    rows, cols = index.cropped_size
    margin = index.margin
    sources = features[:, :, :rows, margin : margin + cols]
    affinities = [
        torch.exp(-(features[:, :, dy : dy + rows, margin + dx : margin + dx + cols] - sources).abs().mean(dim=1))
        for dy, dx in index.directions.tolist()
    ]  # one [B, rows, cols] per direction: memory of one difference map at a time, plus what backward keeps
    return torch.stack(affinities, dim=1).flatten(2)
