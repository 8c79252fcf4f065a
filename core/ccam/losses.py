"""C²AM losses (SPEC §7.1-7.2, METHODS §9): SimMax, SimMin and the CAM-hint loss of C²AM-H.

The contrastive losses compare every pair of the batch. Under torchrun each process sees part of the batch, so
:func:`gather_batch` assembles the global batch (the other processes' rows as constants) and the scripts scale the
loss by the number of processes, which DDP's gradient average cancels: the update equals one process's with the
whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

SIM_CLAMP = (5e-4, 0.9995)
DEFAULT_ALPHA = 0.25


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of float [N, D] and [M, D], clamped to [5e-4, 0.9995]: [N, M]."""
    sim = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T
    return sim.clamp(*SIM_CLAMP)


def rank_weights(sim: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """``exp(-alpha (r_ij - 1))`` with ``r_ij`` the 0-based descending rank of ``sim_ij`` in row i (no gradient).

    The most similar entry (the sample itself for a self-similarity matrix) has rank 0 and weight ``e^alpha``; far
    neighbours weigh less. Ties keep the column order.
    """
    order = torch.argsort(sim.detach(), dim=1, descending=True, stable=True)
    ranks = torch.argsort(order, dim=1, stable=True)
    return torch.exp(-alpha * (ranks.float() - 1.0))


def sim_max(embeddings: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """SimMax: pull embeddings of the same kind together, ``mean_ij w_ij · -log s_ij`` over all B x B pairs.

    Args:
        embeddings: float [B, D] (foreground or background embeddings of a batch).
        alpha: rank-weight decay (:func:`rank_weights`).

    Returns:
        Scalar float32 >= 0.
    """
    sim = cosine_similarity_matrix(embeddings, embeddings)
    return (-torch.log(sim) * rank_weights(sim, alpha)).mean()


def sim_min(bg: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """SimMin: push background from foreground, ``mean_ij -log(1 - s(bg_i, fg_j))`` over all B x B pairs.

    Args:
        bg, fg: float [B, D].

    Returns:
        Scalar float32 >= 0.
    """
    return -torch.log(1.0 - cosine_similarity_matrix(bg, fg)).mean()


def contrastive_losses(fg: torch.Tensor, bg: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> dict[str, torch.Tensor]:
    """``sim_max_fg``, ``sim_min`` and ``sim_max_bg`` of a batch; C²AM minimises their sum."""
    return {"sim_max_fg": sim_max(fg, alpha), "sim_min": sim_min(bg, fg), "sim_max_bg": sim_max(bg, alpha)}


def gather_batch(local: torch.Tensor) -> torch.Tensor:
    """The global batch of float [b, D] rows: every process's rows in rank order, this process's own rows live
    (with gradient) and the others' as constants. Single-process: ``local`` itself."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def hint_masks(
    hints: torch.Tensor, fg_threshold: float, bg_threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixels with a foreground hint (``hint >= fg_threshold``) and, when asked, a background hint (``< bg``)."""
    fg = hints >= fg_threshold
    return fg, (hints < bg_threshold) if bg_threshold is not None else None


def resize_hints(hints: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of hints float [B, 1, H, W] in [0, 1] to the map size (the reference's choice): [B, 1, *size]."""
    if tuple(hints.shape[-2:]) == tuple(size):
        return hints
    return F.interpolate(hints.float(), size=size, mode="bicubic", align_corners=False)


def hint_loss_terms(
    logits: torch.Tensor,
    hints: torch.Tensor,
    fg_threshold: float,
    bg_threshold: float | None = None,
    label_smoothing: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Summed BCE-with-logits of the hinted pixels and their counts, the parts of :func:`hint_loss`.

    Foreground-hinted pixels are pulled towards ``1 - ε/2`` and (with ``bg_threshold``) background-hinted ones
    towards ``ε/2``. Sums over no pixel are exactly 0.

    Args:
        logits: float [B, 1, h, w], the raw map.
        hints: float [B, 1, h, w] in [0, 1], already at the map size (:func:`resize_hints`).

    Returns:
        ``fg_sum``, ``fg_count``, ``bg_sum``, ``bg_count`` (float32 scalars; the bg ones 0 without ``bg_threshold``).
    """
    logits = logits.float()
    fg_mask, bg_mask = hint_masks(hints, fg_threshold, bg_threshold)
    high = torch.full_like(logits, 1.0 - label_smoothing / 2)
    terms = {
        "fg_sum": (F.binary_cross_entropy_with_logits(logits, high, reduction="none") * fg_mask).sum(),
        "fg_count": fg_mask.sum().float(),
    }
    if bg_mask is None:
        zero = logits.new_zeros(())
        return terms | {"bg_sum": zero, "bg_count": zero}
    low = torch.full_like(logits, label_smoothing / 2)
    bce = F.binary_cross_entropy_with_logits(logits, low, reduction="none")
    return terms | {"bg_sum": (bce * bg_mask).sum(), "bg_count": bg_mask.sum().float()}


def combine_hint_terms(terms: dict[str, torch.Tensor], fg_count: torch.Tensor, bg_count: torch.Tensor) -> torch.Tensor:
    """``fg_sum / fg_count + bg_sum / bg_count``, a term without pixels contributing exactly 0 (never NaN).

    The counts are passed separately so that a distributed step can divide by the global counts.
    """
    return terms["fg_sum"] / fg_count.clamp_min(1.0) + terms["bg_sum"] / bg_count.clamp_min(1.0)


def hint_loss(
    logits: torch.Tensor,
    hints: torch.Tensor,
    fg_threshold: float,
    bg_threshold: float | None = None,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """The C²AM-H hint loss: mean BCE-with-logits over the foreground-hinted pixels towards a smoothed 1 (plus,
    with ``bg_threshold``, the mean over background-hinted pixels towards a smoothed 0).

    Args:
        logits: float [B, 1, h, w], the raw map.
        hints: float [B, 1, h, w] in [0, 1] at the map size (max over the image's CAM classes).
        fg_threshold: a pixel is a foreground hint when its hint is at least this, in (0, 1).
        bg_threshold: a pixel is a background hint below this (None: no background hints, the reference's default).
        label_smoothing: ε; targets ``1 - ε/2`` and ``ε/2``.

    Returns:
        Scalar float32, exactly 0 when no pixel qualifies.
    """
    terms = hint_loss_terms(logits, hints, fg_threshold, bg_threshold, label_smoothing)
    return combine_hint_terms(terms, terms["fg_count"], terms["bg_count"])
