"""The semantic random walk (SPEC §9.3, IRN): spread CAM seeds over the regions a boundary map encloses.

For an image with stride-4 CAMs ``cams [n, h, w]`` and boundary probabilities ``edge [h, w]``:

* the affinity of two pixels closer than ``radius`` is ``a = 1 - max(edge on the lattice path between them)``
  (:mod:`core.rw.paths`); ``A`` holds ``a^beta`` for these pairs, both ways, and 1 on the diagonal;
* ``T = A / colsum(A)`` (every column sums to 1), and ``rw = (cams * (1 - edge)) @ T^(2^exp_times)``.

The reference (``propagate_to_edge``) builds ``A`` as a dense ``N x N`` matrix (``N = h w``, about 12k for a VOC
image) and squares it ``exp_times`` times: O(N³) time and 0.5-1.5 GB per image. Here ``T`` stays sparse (``N`` times
at most ``2 * n_directions + 1`` = 69 entries for radius 5) and is applied ``2^exp_times`` times to the ``n`` seed
rows, in float32: memory O(N * 69), time O(2^exp_times * N * 69 * n). On CPU the products run in scipy.sparse (much
faster than torch's CPU CSR kernels), on CUDA in torch's sparse CSR. :func:`random_walk_dense` is the reference's
dense route, kept for tests and the benchmark.

:func:`rw_maps` turns the stride-4 result into the CAM file's planes: ``cam`` at stride 4 and ``hr_cam`` bilinearly
upsampled x4 and cropped to the image, each divided by its global maximum (the reference; SPEC §13.2.13) or by the
maximum of each class.

PSA (``--method psa``, METHODS §2) walks the same way on other affinities: ``a = exp(-mean_k |f_ik - f_jk|)`` of the
PSA AffinityNet's stride-8 features for pixels closer than 5 cells (:func:`feature_affinity_pairs`), ``T`` from
``A^beta`` (beta 8) as above, ``2^logt`` steps (6 SEAM/PPC, 8 PSA), and seeds that carry a background channel:
``[bg, cams]`` at full size (bg = ``(1 - max cams)^alpha``, or a constant, 0.27 in PPC), zero-padded to a multiple
of 8 and average-pooled x8 (:func:`psa_seeds`), without IRN's ``1 - edge`` factor. Every pair of grid cells closer
than 5 is linked; the reference's dense matrix misses the pairs whose first cell lies in the last 4 rows or the
first/last 4 columns (it enumerates sources on a cropped grid), a border effect this route does not copy.
:func:`psa_rw_maps` writes the walked maps as an ordinary CAM file (see there).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from core.errors import WSSSError
from core.rw.paths import PathIndex, edge_to_affinity, feature_affinity, path_index

RADIUS = 5
MAX_BETA = 100.0  # affinities below 1 vanish in float32 long before this
MAX_EXP_TIMES = 12  # T^4096: 16 times the reference's walk; longer walks only flatten every map
NORMALIZATIONS = ("global", "per_class")
BACKENDS = ("scipy", "torch")


def check_walk_params(beta: float, exp_times: int, method: str = "irn") -> None:
    """WSSSError (one line, naming the flag) unless ``0 < beta <= 100`` and ``exp_times`` is an integer in 0..12;
    ``method`` names the flag and the reference's values (``irn``: --exp_times, beta 10; ``psa``: --logt, beta 8)."""
    flag, reference, steps = ("--logt", "8 (PSA) or 6 (SEAM, PPC)", 8) if method == "psa" else ("--exp_times", 8, 10)
    if not (isinstance(beta, int | float) and 0 < beta <= MAX_BETA):
        raise WSSSError(f"--beta {beta}: must lie in (0, {MAX_BETA:g}] (the reference uses {steps})")
    if isinstance(exp_times, bool) or not isinstance(exp_times, int) or not 0 <= exp_times <= MAX_EXP_TIMES:
        raise WSSSError(
            f"{flag} {exp_times}: must be an integer in 0..{MAX_EXP_TIMES} (the walk takes 2^{flag[2:]} steps; "
            f"the reference uses {reference})"
        )


# --------------------------------------------------------------------------------------------------------------------
# Affinities
# --------------------------------------------------------------------------------------------------------------------


def _padded_affinity(edge: torch.Tensor, radius: int) -> tuple[torch.Tensor, PathIndex]:
    """The reference's first step: ``edge`` padded with 1.0 left, right and bottom by ``radius``, then the affinity of
    every (direction, source) pair of its path index: ``([n_directions, n_src], index)``."""
    height, width = edge.shape
    padded = F.pad(edge[None, None].float(), (radius, radius, 0, radius), value=1.0)
    index = path_index(radius, (height + radius, width + 2 * radius))
    return edge_to_affinity(padded, index)[0], index


def affinity_pairs(edge: torch.Tensor, radius: int = RADIUS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every unordered pair of image pixels closer than ``radius``, with its affinity.

    A path between two image pixels never leaves their bounding box, so the padding of the reference never changes
    an affinity; it only decides which pairs exist, and the pairs kept here are exactly those inside the image.

    Args:
        edge: float ``[h, w]`` boundary probabilities in [0, 1].

    Returns:
        ``(src, dst, affinity)``: int64 flat indices ``y * w + x`` and float32 ``1 - max(edge on the path)``, each
        ``[n_pairs]`` (``src != dst``; each pair once).
    """
    height, width = edge.shape
    affinity, index = _padded_affinity(edge, radius)
    return _pairs_inside(affinity, index, height, width, radius)


def feature_affinity_pairs(
    features: torch.Tensor, radius: int = RADIUS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PSA's :func:`affinity_pairs`: every unordered pair of grid cells closer than ``radius``, with the affinity
    ``exp(-mean_k |f_ik - f_jk|)`` of its features.

    Args:
        features: float ``[D, h, w]`` (the PSA AffinityNet's stride-8 features).

    Returns:
        ``(src, dst, affinity)`` as :func:`affinity_pairs`, affinity in (0, 1].
    """
    _, height, width = features.shape
    padded = F.pad(features[None].float(), (radius, radius, 0, radius))  # only decides which pairs exist
    index = path_index(radius, (height + radius, width + 2 * radius))
    return _pairs_inside(feature_affinity(padded, index)[0], index, height, width, radius)


def _pairs_inside(
    affinity: torch.Tensor, index: PathIndex, height: int, width: int, radius: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs of a grid padded by ``radius`` left, right and bottom whose two cells lie inside the ``(height,
    width)`` grid: flat image indices and their affinities (``affinity [n_directions, n_src]`` of ``index``)."""
    rows, cols = index.cropped_size
    device = affinity.device
    src_y = torch.arange(rows, device=device).view(1, rows, 1)
    src_x = (torch.arange(cols, device=device) + index.margin - radius).view(1, 1, cols)  # padded -> image columns
    offsets = torch.from_numpy(index.directions).to(device)
    dst_y, dst_x = src_y + offsets[:, 0].view(-1, 1, 1), src_x + offsets[:, 1].view(-1, 1, 1)
    inside = (src_y < height) & (src_x >= 0) & (src_x < width) & (dst_y < height) & (dst_x >= 0) & (dst_x < width)
    src = (src_y * width + src_x).expand_as(inside)[inside]
    dst = (dst_y * width + dst_x)[inside]
    return src, dst, affinity.view(-1, rows, cols)[inside]


def walk_operator(
    edge: torch.Tensor,
    beta: float = 10.0,
    radius: int = RADIUS,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor | scipy.sparse.csr_array:
    """``M = T^T`` as a sparse ``[N, N]`` float32 matrix, so that one step of the walk ``x @ T`` is ``(M @ x^T)^T``.

    ``A`` is symmetric, so ``T^T = D^-1 A`` with ``D`` the column (= row) sums: every row of ``M`` sums to 1.

    Args:
        edge: float ``[h, w]`` boundary probabilities in [0, 1]; ``N = h w``.
        backend: ``"scipy"`` (CPU only) or ``"torch"``; default scipy for a CPU ``edge``, else torch.

    Returns:
        scipy CSR, or torch sparse CSR on ``edge``'s device.
    """
    backend = backend or ("scipy" if edge.device.type == "cpu" else "torch")
    if backend not in BACKENDS or (backend == "scipy" and edge.device.type != "cpu"):
        raise ValueError(f"walk_operator: backend must be one of {BACKENDS} (scipy on the CPU), got {backend!r}")
    with _one_cpu_thread(edge.device):
        return _walk_operator(edge, beta, radius, dtype, backend)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops on one thread: the operator is ~200 small ops, and on a busy machine OpenMP threads that
    wait for each other make them 10-50x slower (the walk itself runs in scipy, single-threaded, anyway)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _walk_operator(
    edge: torch.Tensor, beta: float, radius: int, dtype: torch.dtype, backend: str
) -> torch.Tensor | scipy.sparse.csr_array:
    return transition_operator(*affinity_pairs(edge, radius), edge.numel(), beta, dtype, backend)


def transition_operator(
    src: torch.Tensor,
    dst: torch.Tensor,
    affinity: torch.Tensor,
    n: int,
    beta: float,
    dtype: torch.dtype = torch.float32,
    backend: str = "scipy",
) -> torch.Tensor | scipy.sparse.csr_array:
    """``M = T^T`` of the pairs ``(src, dst, affinity)`` (each unordered pair once, no diagonal) of an ``n``-cell grid:
    ``A`` = ``affinity^beta`` both ways plus a unit diagonal, ``T = A / colsum(A)``; scipy CSR or torch sparse CSR
    (on the pairs' device), as :func:`walk_operator`."""
    diagonal = torch.arange(n, device=src.device)
    weight = affinity.double().pow(beta)  # float64 until the division: rows of M sum to 1 to float32 rounding
    rows = torch.cat([src, dst, diagonal])
    cols = torch.cat([dst, src, diagonal])
    values = torch.cat([weight, weight, torch.ones(n, dtype=weight.dtype, device=src.device)])
    degree = torch.zeros_like(values[:n]).index_add_(0, rows, values)  # >= 1: the diagonal
    values = (values / degree[rows]).to(dtype)
    if backend == "scipy":
        coo = scipy.sparse.coo_array((values.numpy(), (rows.numpy(), cols.numpy())), shape=(n, n))
        return coo.tocsr()
    with torch.sparse.check_sparse_tensor_invariants(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # once per process, noise
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n)).coalesce().to_sparse_csr()


# --------------------------------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------------------------------


def random_walk(
    cams: torch.Tensor,
    edge: torch.Tensor,
    beta: float = 10.0,
    exp_times: int = 8,
    radius: int = RADIUS,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """The reference's ``propagate_to_edge`` without an ``N x N`` matrix (see the module docstring).

    Args:
        cams: float ``[n, h, w]`` stride-4 class maps in [0, 1] (foreground classes only).
        edge: float ``[h, w]`` boundary probabilities in [0, 1] on the same device.
        beta: affinity exponent, in (0, 100].
        exp_times: the walk takes ``2^exp_times`` steps, 0..12.
        radius: pairs closer than this many pixels are linked (the reference uses 5).
        dtype: of the operator and the walked maps (float64 only to check the algorithm against the dense route).
        backend: of the sparse products (see :func:`walk_operator`).

    Returns:
        ``[n, h, w]`` in ``dtype``, non-negative, not normalised (:func:`rw_maps` does that), on ``cams``' device.
    """
    check_walk_params(beta, exp_times)
    if cams.dim() != 3 or tuple(cams.shape[1:]) != tuple(edge.shape):
        raise ValueError(f"random_walk: cams {list(cams.shape)} must be [n, *edge.shape] with edge {list(edge.shape)}")
    n, height, width = cams.shape
    edge = edge.float()
    if n == 0:
        return torch.zeros(cams.shape, dtype=dtype, device=cams.device)
    seeds = (cams.to(dtype) * (1 - edge.to(dtype))).reshape(n, -1).T  # [N, n]: one column per class
    operator = walk_operator(edge, beta, radius, dtype, backend)
    return _apply_walk(seeds, operator, 2**exp_times).T.reshape(n, height, width).to(cams.device)


def psa_random_walk(
    seeds: torch.Tensor,
    features: torch.Tensor,
    beta: float = 8.0,
    logt: int = 6,
    radius: int = RADIUS,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """PSA's random walk (METHODS §2) without an ``N x N`` matrix: ``seeds @ T^(2^logt)`` with ``T`` from the feature
    affinities of every pair closer than ``radius`` cells (see the module docstring).

    Args:
        seeds: float ``[n, h, w]`` >= 0, background channel included (:func:`psa_seeds`).
        features: float ``[D, h, w]`` on the same device (``PsaAffinityNet.feature_map``).
        beta: affinity exponent, in (0, 100] (PSA, SEAM, PPC: 8).
        logt: the walk takes ``2^logt`` steps, 0..12 (SEAM, PPC: 6; PSA: 8).
        backend: of the sparse products (see :func:`walk_operator`).

    Returns:
        ``[n, h, w]`` in ``dtype``, non-negative, on ``seeds``' device.
    """
    check_walk_params(beta, logt, "psa")
    if seeds.dim() != 3 or tuple(seeds.shape[1:]) != tuple(features.shape[1:]):
        raise ValueError(
            f"psa_random_walk: seeds {list(seeds.shape)} must be [n, h, w] of features {list(features.shape)}"
        )
    n, height, width = seeds.shape
    backend = backend or ("scipy" if features.device.type == "cpu" else "torch")
    if backend not in BACKENDS or (backend == "scipy" and features.device.type != "cpu"):
        raise ValueError(f"psa_random_walk: backend must be one of {BACKENDS} (scipy on the CPU), got {backend!r}")
    with _one_cpu_thread(features.device):
        pairs = feature_affinity_pairs(features, radius)
        operator = transition_operator(*pairs, height * width, beta, dtype, backend)
    walked = _apply_walk(seeds.to(features.device, dtype).reshape(n, -1).T, operator, 2**logt)
    return walked.T.reshape(n, height, width).to(seeds.device)


def _apply_walk(seeds: torch.Tensor, operator: torch.Tensor | scipy.sparse.csr_array, steps: int) -> torch.Tensor:
    """``steps`` products ``M @ x`` of ``seeds [N, n]`` (one column per map): ``(seeds^T T^steps)^T``."""
    if isinstance(operator, torch.Tensor):
        walked = seeds.contiguous()
        for _ in range(steps):
            walked = operator @ walked
        return walked
    columns = []  # one vector per class: scipy's matrix-vector product is 2-3x faster than its matrix-matrix product
    for column in seeds.cpu().numpy().T:
        for _ in range(steps):
            column = operator @ column
        columns.append(column)
    return torch.from_numpy(np.stack(columns, axis=1))


def dense_affinity(edge: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    """The reference's dense affinity: pairs of the padded grid both ways plus a unit diagonal, as a dense
    ``[N_pad, N_pad]`` matrix, then the padding cropped away: float32 ``[h w, h w]``. Memory O(N²): tests only."""
    height, width = edge.shape
    affinity, index = _padded_affinity(edge, radius)
    n_pad = index.size[0] * index.size[1]
    src = torch.from_numpy(index.src_indices).repeat(index.n_directions)
    dst = torch.from_numpy(index.dst_indices).reshape(-1)
    dense = torch.eye(n_pad)
    dense[src, dst] = affinity.reshape(-1).cpu()
    dense[dst, src] = affinity.reshape(-1).cpu()
    dense = dense.view(height + radius, width + 2 * radius, height + radius, width + 2 * radius)
    dense = dense[:-radius, radius:-radius, :-radius, radius:-radius]
    return dense.reshape(height * width, height * width)


def random_walk_dense(
    cams: torch.Tensor,
    edge: torch.Tensor,
    beta: float = 10.0,
    exp_times: int = 8,
    radius: int = RADIUS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`random_walk` the reference's way: dense ``T``, squared ``exp_times`` times (O(N²) memory, O(N³) time).

    Returns:
        ``[n, h, w]`` in ``dtype`` on the CPU.
    """
    check_walk_params(beta, exp_times)
    n, height, width = cams.shape
    transition = dense_affinity(edge.float().cpu(), radius).to(dtype).pow(beta)
    transition = transition / transition.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        transition = transition @ transition
    seeds = (cams.cpu().to(dtype) * (1 - edge.cpu().to(dtype))).reshape(n, -1)
    return (seeds @ transition).reshape(n, height, width)


# --------------------------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------------------------


def normalize_maps(maps: torch.Tensor, mode: str = "global") -> torch.Tensor:
    """``maps [n, h, w] >= 0`` divided by their global maximum (``"global"``) or each by its own (``"per_class"``);
    an all-zero map stays zero. Values in [0, 1]."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize_maps: mode must be one of {NORMALIZATIONS}, got {mode!r}")
    if maps.numel() == 0:
        return maps
    peak = maps.amax() if mode == "global" else maps.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def rw_maps(rw: torch.Tensor, image_size: tuple[int, int], normalize: str = "global") -> tuple[np.ndarray, np.ndarray]:
    """The CAM file planes of a random walk.

    Args:
        rw: float ``[n, h, w]`` output of :func:`random_walk`, ``(h, w) = ceil(image_size / 4)``.
        image_size: ``(H, W)`` of the image.
        normalize: ``"global"`` (the reference) or ``"per_class"``.

    Returns:
        ``(cam, hr_cam)``: float32 numpy ``[n, h, w]`` and ``[n, H, W]`` in [0, 1]; ``hr_cam`` is ``rw`` bilinearly
        upsampled x4 (``align_corners=False``) and cropped to ``(H, W)``; each is normalised by its own maximum.
    """
    height, width = image_size
    rw = rw.float()
    if rw.shape[0] == 0:
        return np.zeros((0, *rw.shape[1:]), np.float32), np.zeros((0, height, width), np.float32)
    upsampled = F.interpolate(rw[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :height, :width]
    cam, hr_cam = normalize_maps(rw, normalize), normalize_maps(upsampled, normalize)
    return cam.cpu().numpy(), hr_cam.cpu().numpy()


PSA_STRIDE = 8  # PSA walks on the stride-8 grid of its features
PSA_BG_SCORE = 0.27  # PPC's constant background of the walk


def psa_seeds(hr_cam: torch.Tensor, bg_alpha: float | None = None, bg_score: float = PSA_BG_SCORE) -> torch.Tensor:
    """PSA's walk seeds: ``[bg, cams]`` at full size, zero-padded at the bottom/right to a multiple of 8 and
    average-pooled x8 (METHODS §2).

    Args:
        hr_cam: float ``[n, H, W]`` in [0, 1] (the CAM file's planes).
        bg_alpha: background by the power rule ``(1 - max_c cam_c)^bg_alpha`` (PSA 16, SEAM 6); None: the constant
            ``bg_score`` (PPC 0.27).

    Returns:
        ``[n + 1, ceil(H/8), ceil(W/8)]`` float32 >= 0, background first, on ``hr_cam``'s device.
    """
    hr_cam = hr_cam.float()
    height, width = hr_cam.shape[1:]
    if bg_alpha is None:
        background = torch.full((1, height, width), float(bg_score), device=hr_cam.device)
    else:
        peak = hr_cam.amax(dim=0, keepdim=True) if len(hr_cam) else torch.zeros(1, height, width, device=hr_cam.device)
        background = (1 - peak).clamp_min(0).pow(bg_alpha)
    volume = torch.cat([background, hr_cam])
    grid_h, grid_w = -(-height // PSA_STRIDE), -(-width // PSA_STRIDE)
    volume = F.pad(volume, (0, grid_w * PSA_STRIDE - width, 0, grid_h * PSA_STRIDE - height))
    return F.avg_pool2d(volume[None], PSA_STRIDE)[0]


def psa_rw_maps(walked: torch.Tensor, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The CAM file planes of a PSA walk: each class against the walked background, ``rw_c / (rw_c + rw_bg)``.

    PSA labels a pixel ``argmax([rw_bg, rw_1, ..., rw_n])`` after bilinear upsampling. These ratios keep that rule in
    an ordinary CAM file (foreground planes, no background): the classes keep their order at every pixel, and a
    class beats the background exactly where its ratio exceeds 0.5, so ``make_pseudo_labels.py --threshold 0.5``
    gives PSA's labels and ``scripts/evaluate.py``'s sweep moves the background (threshold t weights it by
    ``t / (1 - t)``).

    Args:
        walked: float ``[n + 1, h, w]`` >= 0 output of :func:`psa_random_walk`, background first, on the stride-8
            grid of the padded image.
        image_size: ``(H, W)``.

    Returns:
        ``(cam, hr_cam)``: float32 numpy ``[n, ceil(H/4), ceil(W/4)]`` and ``[n, H, W]`` in [0, 1]: ``walked``
        upsampled bilinearly x2 and x8 (``align_corners=False``), cropped, then the ratios (0 where both are 0).
    """
    height, width = image_size
    walked = walked.float()
    planes = []
    stride4 = (-(-height // 4), -(-width // 4))  # the CAM file's strided size
    for factor, (rows, cols) in ((2, stride4), (PSA_STRIDE, (height, width))):
        maps = F.interpolate(walked[None], scale_factor=factor, mode="bilinear", align_corners=False)[0]
        maps = maps[:, :rows, :cols].clamp_min(0)
        total = maps[1:] + maps[:1]
        ratio = torch.where(total > 0, maps[1:] / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
        planes.append(ratio.clamp(0, 1).cpu().numpy())
    return planes[0], planes[1]
