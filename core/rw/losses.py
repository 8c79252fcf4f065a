"""AffinityNet's loss (SPEC §9.2, METHODS §2, §3): pairs within a radius should have affinity 1 when their labels agree
and 0 when they differ. IRN (``--method irn``): pairs closer than 10 cells of the stride-4 grid, affinity ``1 -
max(boundary on the path between them)`` (:func:`core.rw.paths.edge_to_affinity`). PSA (``--method psa``): pairs
closer than 5 cells of the stride-8 grid, affinity ``exp(-mean_k |f_ik - f_jk|)`` of the network's features
(:func:`core.rw.paths.feature_affinity`). Both use the same pairs layout, targets and terms.

With ``a`` the affinities and the pair targets of :func:`core.rw.paths.affinity_targets`::

    L_bg  = Σ bg_pos · -log(a + ε)      / (Σ bg_pos + ε)
    L_fg  = Σ fg_pos · -log(a + ε)      / (Σ fg_pos + ε)
    L_neg = Σ neg    · -log(1 + ε - a)  / (Σ neg + ε)         ε = 1e-5
    L     = ((L_bg + L_fg) / 2 + L_neg) / 2

Sums run over the whole batch. :func:`pair_loss_sums` returns the numerators and counts separately, so a training
step can divide by counts summed over every process and reproduce the single-process loss under DDP.
"""

from __future__ import annotations

import torch

from core.labels import IGNORE_INDEX
from core.rw.paths import PathIndex, affinity_targets, edge_to_affinity, feature_affinity, path_index

TRAIN_RADIUS = 10  # pairs closer than 10 cells of the stride-4 grid (SPEC §9.2)
PSA_RADIUS = 5  # pairs closer than 5 cells of the stride-8 grid (PSA, METHODS §2)
EPS = 1e-5
TERMS = ("bg", "fg", "neg")


def pair_loss_sums(
    edge_logits: torch.Tensor, labels: torch.Tensor, radius: int = TRAIN_RADIUS, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """Numerators and pair counts of the three loss terms.

    Args:
        edge_logits: float [B, 1, h, w] boundary logits (AffinityNet's output).
        labels: integer [B, h, w] affinity labels at the same resolution: 0 background, 1..C classes,
            ``ignore_index`` unknown.
        radius: pairs are closer than this many cells.

    Returns:
        float32 scalars ``bg``, ``fg``, ``neg`` (sums of the per-pair losses, with a graph to ``edge_logits``) and
        ``bg_count``, ``fg_count``, ``neg_count`` (pair counts, no graph).
    """
    index = path_index(radius, tuple(edge_logits.shape[-2:]))
    affinity = edge_to_affinity(torch.sigmoid(edge_logits.float()), index)  # [B, n_directions, n_src]
    return affinity_loss_sums(affinity, labels, index, ignore_index)


def feature_pair_loss_sums(
    features: torch.Tensor, labels: torch.Tensor, radius: int = PSA_RADIUS, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """:func:`pair_loss_sums` of PSA: the affinities of ``features`` (float [B, D, h, w], the PSA AffinityNet's
    stride-8 output) against ``labels`` (integer [B, h, w]) for pairs closer than ``radius`` cells."""
    index = path_index(radius, tuple(features.shape[-2:]))
    return affinity_loss_sums(feature_affinity(features.float(), index), labels, index, ignore_index)


def affinity_loss_sums(
    affinity: torch.Tensor, labels: torch.Tensor, index: PathIndex, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """The sums and counts of :func:`pair_loss_sums` from affinities ``[B, n_directions, n_src]`` in [0, 1] of the
    pairs of ``index`` and the label map ``[B, h, w]`` on ``index``'s grid."""
    bg_pos, fg_pos, neg = affinity_targets(labels, index, ignore_index)
    pos_loss = -torch.log(affinity + EPS)
    neg_loss = -torch.log(1 + EPS - affinity)
    return {
        "bg": (bg_pos * pos_loss).sum(),
        "fg": (fg_pos * pos_loss).sum(),
        "neg": (neg * neg_loss).sum(),
        "bg_count": bg_pos.sum(),
        "fg_count": fg_pos.sum(),
        "neg_count": neg.sum(),
    }


def combine_terms(sums: dict[str, torch.Tensor], counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three normalised terms and ``loss`` from :func:`pair_loss_sums`.

    Args:
        counts: float [3] pair counts (bg, fg, neg) to divide by, e.g. summed over processes; default the
            counts in ``sums``.

    Returns:
        ``bg``, ``fg``, ``neg`` and ``loss = ((bg + fg) / 2 + neg) / 2``, float32 scalars.
    """
    if counts is None:
        counts = torch.stack([sums[f"{term}_count"] for term in TERMS])
    terms = {term: sums[term] / (counts[i] + EPS) for i, term in enumerate(TERMS)}
    return terms | {"loss": ((terms["bg"] + terms["fg"]) / 2 + terms["neg"]) / 2}


def affinity_loss(
    edge_logits: torch.Tensor, labels: torch.Tensor, radius: int = TRAIN_RADIUS, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """The loss of one batch on one process: :func:`combine_terms` of :func:`pair_loss_sums` (same arguments)."""
    return combine_terms(pair_loss_sums(edge_logits, labels, radius, ignore_index))
