"""core/rw/walk.py: the sparse random walk against the reference's dense route, how it spreads, its memory, and the
maps it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import WSSSError
from core.labels import cams_to_label_map
from core.metrics import confusion_matrix, scores_from_confusion
from core.rw.walk import (
    affinity_pairs,
    check_walk_params,
    dense_affinity,
    normalize_maps,
    random_walk,
    random_walk_dense,
    rw_maps,
)

pytestmark = pytest.mark.torch_threads(1)


def random_inputs(n: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    cams = torch.rand(n, height, width, generator=generator)
    edge = torch.rand(height, width, generator=generator) ** 3  # mostly low, some boundaries
    return cams, edge


def test_pairs_are_the_nonzero_off_diagonal_entries_of_the_dense_affinity():
    _, edge = random_inputs(1, 9, 13)
    src, dst, affinity = affinity_pairs(edge)
    sparse = torch.eye(9 * 13)
    sparse[src, dst] = affinity
    sparse[dst, src] = affinity
    torch.testing.assert_close(sparse, dense_affinity(edge), rtol=0, atol=0)


@pytest.mark.parametrize(("n", "height", "width"), [(1, 11, 16), (3, 17, 9)])
def test_sparse_walk_equals_the_dense_reference(n, height, width):
    cams, edge = random_inputs(n, height, width)
    # the same algorithm: float64 agrees to rounding
    exact = random_walk_dense(cams, edge, dtype=torch.float64)
    torch.testing.assert_close(random_walk(cams, edge, dtype=torch.float64), exact, rtol=1e-10, atol=1e-10)
    # float32, as run: the 256 float32 steps (and the reference's 8 squarings) stay within 1e-4 of exact
    sparse = random_walk(cams, edge)
    assert sparse.dtype == torch.float32
    torch.testing.assert_close(sparse.double(), exact, rtol=1e-4, atol=1e-5)
    # a shorter walk in float32 matches the dense float32 reference to 1e-5
    short = random_walk(cams, edge, beta=8, exp_times=3)
    torch.testing.assert_close(short, random_walk_dense(cams, edge, beta=8, exp_times=3), rtol=1e-5, atol=1e-5)


def test_torch_sparse_products_equal_scipy_ones():
    cams, edge = random_inputs(2, 9, 8)
    on_torch = random_walk(cams, edge, exp_times=5, backend="torch")
    torch.testing.assert_close(on_torch, random_walk(cams, edge, exp_times=5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        random_walk(cams, edge, backend="dense")


def test_one_region_spreads_a_seed_uniformly():
    cams = torch.zeros(1, 12, 12)
    cams[0, 2, 3] = 1.0
    rw = random_walk(cams, torch.zeros(12, 12))
    torch.testing.assert_close(rw, torch.full_like(rw, rw.mean().item()), rtol=1e-4, atol=0)
    assert rw.min() > 0


def test_a_boundary_line_stops_the_spread():
    edge = torch.zeros(12, 14)
    edge[:, 6] = 1.0  # a full-height boundary
    cams = torch.zeros(2, 12, 14)
    cams[0, 5, 2] = 1.0  # class 0 seeded on the left
    cams[1, 5, 10] = 0.5  # class 1 on the right
    rw = random_walk(cams, edge)
    assert torch.all(rw[0, :, 6:] == 0) and torch.all(rw[1, :, :7] == 0)
    left, right = rw[0, :, :6], rw[1, :, 7:]
    assert left.min() > 0.9 * left.max() and right.min() > 0.9 * right.max()  # uniform within each side


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_memory_stays_far_below_a_dense_matrix():
    height, width = 120, 120  # N = 14400: one dense N x N float32 matrix would take 830 MB
    cams, edge = random_inputs(2, height, width)
    random_walk(cams[:, :16, :16], edge[:16, :16], exp_times=0)  # warm-up: lazy imports, thread pools
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    before = peak_rss_bytes()
    rw = random_walk(cams, edge, exp_times=2)
    grown = peak_rss_bytes() - before
    assert rw.shape == (2, height, width)
    assert grown < 120e6, f"the walk of a {height}x{width} map grew the peak RSS by {grown / 1e6:.0f} MB"


@pytest.mark.parametrize(
    ("beta", "exp_times", "flag"),
    [(0, 8, "--beta"), (-1.0, 8, "--beta"), (101, 8, "--beta"), (10, -1, "--exp_times"), (10, 13, "--exp_times")],
)
def test_walk_parameters_out_of_range(beta, exp_times, flag):
    with pytest.raises(WSSSError, match=flag):
        check_walk_params(beta, exp_times)
    with pytest.raises(WSSSError, match=flag):
        random_walk(torch.rand(1, 6, 6), torch.rand(6, 6), beta=beta, exp_times=exp_times)


def test_rw_maps_upsample_crop_and_normalise():
    rw = torch.tensor([[[1.0, 2.0], [0.0, 4.0]], [[0.5, 0.5], [0.5, 1.0]]])
    cam, hr_cam = rw_maps(rw, (7, 6))  # stride-4 grid of a 7 x 6 image is 2 x 2
    assert cam.dtype == hr_cam.dtype == np.float32 and cam.shape == (2, 2, 2) and hr_cam.shape == (2, 7, 6)
    np.testing.assert_allclose(cam, rw.numpy() / 4)  # one global maximum
    assert hr_cam.max() == pytest.approx(1.0) and hr_cam[1].max() < 0.5
    cam, hr_cam = rw_maps(rw, (7, 6), normalize="per_class")
    np.testing.assert_allclose(cam.max(axis=(1, 2)), [1.0, 1.0])
    np.testing.assert_allclose(hr_cam.max(axis=(1, 2)), [1.0, 1.0])
    zeros, _ = rw_maps(torch.zeros(1, 2, 2), (8, 8))
    assert not zeros.any()
    empty_cam, empty_hr = rw_maps(torch.zeros(0, 2, 2), (8, 8))
    assert empty_cam.shape == (0, 2, 2) and empty_hr.shape == (0, 8, 8)
    with pytest.raises(ValueError, match="per_class"):
        normalize_maps(rw, "max")


def test_no_class_walks_to_nothing():
    assert random_walk(torch.zeros(0, 5, 7), torch.rand(5, 7)).shape == (0, 5, 7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_walk_equals_the_cpu_walk():
    cams, edge = random_inputs(2, 30, 41)
    on_cuda = random_walk(cams.cuda(), edge.cuda())
    assert on_cuda.is_cuda
    torch.testing.assert_close(on_cuda.cpu(), random_walk(cams, edge), rtol=1e-4, atol=1e-6)


def test_benchmark_rw_reports_sparse_and_dense(capsys):
    from tools import benchmark

    argv = ["rw", "--sizes", "32x40,64x48", "--images", "1", "--exp_times", "3", "--dense_max_n", "100"]
    result = benchmark.main(benchmark.get_args_parser().parse_args([*argv, "--device", "cpu"]))
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    small, large = result["sizes"]
    assert small["n"] == 80 and small["sparse"]["seconds"] > 0 and small["dense"]["seconds"] > 0
    assert small["max_abs_diff"] < 1e-4
    assert large["dense"]["gb_needed"] >= 0 and large["dense"]["seconds_estimate"] > 0


def test_boundaries_at_the_objects_edges_spread_sparse_seeds_over_the_objects(voc_source):
    """Seeds on 10% of each object's stride-4 cells (as CAMs that fire on an emblem, not on the body) with the GT
    boundaries as edge map: the walk fills the objects, and the masks beat the seeds' by far."""
    rng = np.random.default_rng(0)
    seeds_conf, walk_conf = np.zeros((6, 6), np.int64), np.zeros((6, 6), np.int64)
    for image_id in voc_source.ids:
        gt = voc_source.read_mask(image_id)
        keys = np.array([k for k in np.unique(gt) if 0 < k < 255])
        grid = gt[2::4, 2::4]  # the label at each stride-4 cell's centre
        edge = np.zeros(grid.shape, np.float32)
        edge[:, :-1][grid[:, :-1] != grid[:, 1:]] = 0.9
        edge[:-1][grid[:-1] != grid[1:]] = 0.9
        seeds = np.stack([(grid == k) & (rng.random(grid.shape) < 0.1) for k in keys]).astype(np.float32)
        _, seed_maps = rw_maps(torch.from_numpy(seeds), gt.shape)
        _, walk_maps = rw_maps(random_walk(torch.from_numpy(seeds), torch.from_numpy(edge)), gt.shape)
        seeds_conf += confusion_matrix(gt, cams_to_label_map(seed_maps, keys, 0.25), 6)
        walk_conf += confusion_matrix(gt, cams_to_label_map(walk_maps, keys, 0.25), 6)
    seeds_miou, walk_miou = (
        scores_from_confusion(c, [str(k) for k in range(6)])["miou"] for c in (seeds_conf, walk_conf)
    )
    assert walk_miou > seeds_miou + 30, (seeds_miou, walk_miou)  # about 26 -> 71
