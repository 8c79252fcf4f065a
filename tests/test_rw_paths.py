"""core/rw/paths.py: search directions, lattice paths, source/destination indices, affinities and pair targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.rw.paths import (
    PathIndex,
    affinity_targets,
    direction_path,
    edge_to_affinity,
    path_index,
    search_directions,
)

pytestmark = pytest.mark.torch_threads(1)


def disc(radius: int) -> set[tuple[int, int]]:
    """Every non-zero offset closer than ``radius``."""
    r = radius
    return {(y, x) for y in range(-r, r + 1) for x in range(-r, r + 1) if 0 < y * y + x * x < r * r}


@pytest.mark.parametrize("radius", [2, 5, 10])
def test_directions_cover_the_disc_once_each_way(radius):
    directions = search_directions(radius)
    assert len(set(directions)) == len(directions)  # no duplicates
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in directions)
    mirrored = {(-dy, -dx) for dy, dx in directions}
    assert not mirrored & set(directions)
    assert mirrored | set(directions) == disc(radius)  # symmetric coverage of the whole disc


def test_direction_counts_of_the_reference_radii():
    assert len(search_directions(5)) == 34  # (69 offsets of the disc - origin) / 2
    assert len(search_directions(10)) == (len(disc(10))) // 2
    assert path_index(5, (20, 20)).n_directions == 34


def test_hand_checked_paths():
    assert direction_path(0, 1) == [(0, 1), (0, 0)]
    assert direction_path(0, 3) == [(0, 3), (0, 2), (0, 1), (0, 0)]
    assert direction_path(1, 1) == [(1, 1), (0, 1), (1, 0), (0, 0)]
    assert direction_path(1, -1) == [(1, -1), (0, -1), (1, 0), (0, 0)]
    assert direction_path(2, 1) == [(2, 1), (1, 1), (2, 0), (0, 1), (1, 0), (0, 0)]
    # (3, 1): all 8 points of the box are within distance 1 of the segment ((0, 1) is at 3/sqrt(10)) ...
    assert direction_path(3, 1) == [(3, 1), (2, 1), (3, 0), (1, 1), (2, 0), (0, 1), (1, 0), (0, 0)]
    # ... and a long diagonal keeps its two neighbouring lines, nothing farther
    assert set(direction_path(3, 3)) == {(y, x) for y in range(4) for x in range(4) if abs(y - x) <= 1}


def test_paths_are_grouped_by_length_with_destination_first():
    index = path_index(5, (16, 16))
    lengths = [group.shape[1] for group in index.paths]
    assert lengths == sorted(set(lengths))
    assert sorted(map(tuple, index.directions.tolist())) == sorted(search_directions(5))
    for group in index.paths:
        for path in group.tolist():
            assert path[0] == list(max(path, key=lambda p: abs(p[0]) + abs(p[1])))
            assert [0, 0] in path and len(set(map(tuple, path))) == len(path)


def test_source_and_destination_indices():
    index = PathIndex(3, (7, 9))  # margin 2: sources are rows 0..4, columns 2..6
    assert index.cropped_size == (5, 5)
    grid = np.arange(63).reshape(7, 9)
    assert index.src_indices.tolist() == grid[:5, 2:7].reshape(-1).tolist()
    for (dy, dx), dst in zip(index.directions.tolist(), index.dst_indices, strict=True):
        assert dst.tolist() == (index.src_indices + dy * 9 + dx).tolist()
    with pytest.raises(ValueError, match="too small"):
        PathIndex(5, (4, 40))


def test_cache_builds_one_index_per_size():
    assert path_index(5, (30, 40)) is path_index(5, (30, 40))
    larger = path_index(5, (300, 400))  # a larger image than any cached one: a new index, no crash
    assert larger.size == (300, 400) and larger.dst_indices.shape == (34, 296 * 392)


def test_affinity_of_a_constant_edge_map():
    index = path_index(5, (12, 14))
    aff = edge_to_affinity(torch.full((2, 1, 12, 14), 0.25), index)
    assert aff.shape == (2, 34, index.n_src)
    torch.testing.assert_close(aff, torch.full_like(aff, 0.75))


def test_affinity_is_one_minus_the_max_edge_on_the_path():
    index = path_index(3, (6, 8))
    edge = torch.zeros(1, 1, 6, 8)
    edge[0, 0, 2, 4] = 0.9  # one boundary pixel
    aff = edge_to_affinity(edge, index)[0]
    flat_edge = edge.flatten()
    for d, (dy, dx) in enumerate(index.directions.tolist()):
        path = direction_path(dy, dx)
        for s, src in enumerate(index.src_indices.tolist()):
            y, x = divmod(src, 8)
            crossed = any((y + py, x + px) == (2, 4) for py, px in path)
            assert aff[d, s].item() == pytest.approx(0.1 if crossed else 1.0), (dy, dx, y, x)
    # the same as gathering the reference's path_indices
    gathered = [1 - flat_edge[torch.from_numpy(ind)].amax(dim=1) for ind in index.path_indices()]
    torch.testing.assert_close(aff, torch.cat(gathered))


def test_affinity_gradient_flows_to_the_edge():
    edge = torch.rand(1, 1, 10, 10, requires_grad=True)
    edge_to_affinity(edge, path_index(3, (10, 10))).sum().backward()
    assert edge.grad is not None and edge.grad.abs().sum() > 0


def test_affinity_targets_on_a_hand_made_label_map():
    labels = torch.zeros(4, 6, dtype=torch.long)
    labels[:, 3:] = 2  # class 2 on the right half
    labels[0, 0] = 255  # one unknown pixel
    index = PathIndex(2, (4, 6))  # directions (0, 1), (1, -1), (1, 0), (1, 1); sources rows 0..2, columns 1..4
    bg_pos, fg_pos, neg = affinity_targets(labels, index)
    assert bg_pos.shape == (index.n_directions, index.n_src)
    assert torch.all(bg_pos + fg_pos + neg <= 1)
    flat = labels.flatten()
    for d in range(index.n_directions):
        for s, (src, dst) in enumerate(zip(index.src_indices, index.dst_indices[d], strict=True)):
            a, b = flat[src].item(), flat[dst].item()
            expected = (0, 0, 0) if 255 in (a, b) else (a == b == 0, a == b != 0, a != b)
            assert (bg_pos[d, s], fg_pos[d, s], neg[d, s]) == tuple(map(float, expected))
    assert neg.sum() > 0 and fg_pos.sum() > 0 and bg_pos.sum() > 0
    batched = affinity_targets(labels[None].repeat(2, 1, 1), index)
    assert batched[2].shape == (2, index.n_directions, index.n_src) and torch.equal(batched[2][1], neg)
