"""OC-CSE pieces: choosing the class to erase per image (label splitting) and erasing it (soft and hard masks).

The label splitter replaces the reference's per-sample Python loops by one vectorised draw per batch: every class gets
a random sort key and the ``k`` smallest keys win. Keys ``E_c / w_c`` with ``E_c ~ Exp(1)`` pick classes with
probability proportional to ``w_c`` without replacement, the same distribution as ``torch.multinomial(w, k)``.
One deliberate difference: the ``balanced`` and ``least_chosen`` strategies read the choice counters as they were at
the start of the batch (the reference updates them between the samples of a batch); ``least_chosen`` breaks ties at
random instead of by class index.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from core.errors import WSSSError

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "balanced", "focal", "least_chosen")
MASK_EPS = 1e-5


class LabelSplitter:
    """Chooses, per image, ``k`` present classes to erase, and keeps the statistics the strategies need.

    State (saved with :meth:`state_dict` for resuming): ``choices`` float32 [C], how many times each class was
    chosen, starting at 1 as in the reference; ``focal_factor`` float32 [C], a running mean of the ordinary
    classifier's focal weight per class, starting at 1.

    Args:
        num_classes: C, number of foreground classes.
        strategy: ``random`` (uniform over present classes), ``balanced`` (probability ``1 / choices^gamma``),
            ``focal`` (probability ``focal_factor``) or ``least_chosen`` (the least chosen present class).
        focal_momentum: momentum ``mu`` of the focal-factor running mean.
        focal_gamma: exponent ``gamma`` of the focal weight ``(1 - p_t)^gamma``.
        balanced_gamma: exponent of the ``balanced`` strategy's inverse-count weights.
    """

    def __init__(
        self,
        num_classes: int,
        strategy: str = "random",
        focal_momentum: float = 0.9,
        focal_gamma: float = 2.0,
        balanced_gamma: float = 1.0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown label-split strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.strategy = strategy
        self.focal_momentum = focal_momentum
        self.focal_gamma = focal_gamma
        self.balanced_gamma = balanced_gamma
        self.choices = torch.ones(num_classes)
        self.focal_factor = torch.ones(num_classes)
        self._last_chosen: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> LabelSplitter:
        """Move the state tensors to ``device`` (done automatically on the first :meth:`split`)."""
        self.choices = self.choices.to(device)
        self.focal_factor = self.focal_factor.to(device)
        return self

    def split(
        self, labels: torch.Tensor, k: int = 1, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose up to ``k`` classes per sample among those with ``labels > 0.5`` and update ``choices``.

        Args:
            labels: float [B, C] in [0, 1] (unsmoothed; soft values from mixing allowed).
            k: classes to choose per sample; a sample with fewer present classes gets all of them, a sample with
                none (possible after MixUp/CutMix) gets an all-zero row.
            generator: optional torch generator on ``labels.device`` for reproducible draws.

        Returns:
            ``chosen``: one-hot float [B, C] (dtype of ``labels``), at most ``k`` ones per row, only on present
            classes; ``remaining``: ``max(labels - chosen, 0)``, float [B, C].
        """
        if labels.dim() != 2 or labels.shape[1] != self.num_classes:
            raise ValueError(f"labels must be [B, {self.num_classes}], got {tuple(labels.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.to(labels.device)
        present = labels > 0.5
        keys = self._sort_keys(present, generator)  # [B, C], +inf for classes that must not be chosen
        order = keys.topk(min(k, self.num_classes), dim=1, largest=False).indices  # [B, k]
        valid = torch.gather(keys, 1, order).isfinite()
        chosen = torch.zeros_like(labels).scatter_(1, order, valid.to(labels.dtype))
        self.choices += chosen.sum(dim=0).to(self.choices)
        self._last_chosen = chosen
        remaining = (labels - chosen).clamp(min=0)
        return chosen, remaining

    def _sort_keys(self, present: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random keys [B, C]: the k smallest finite keys of a row are its chosen classes."""
        if self.strategy == "least_chosen":
            jitter = torch.rand(present.shape, device=present.device, generator=generator)
            # counts are integers, so a jitter in [0, 1) only reorders classes chosen equally often
            keys = self.choices.unsqueeze(0) + jitter
        else:
            weights = self._class_weights().unsqueeze(0).expand(present.shape)
            arrivals = torch.empty(present.shape, device=present.device).exponential_(generator=generator)
            keys = arrivals / weights
            present = present & (weights > 0)
        return torch.where(present, keys, torch.full_like(keys, float("inf")))

    def _class_weights(self) -> torch.Tensor:
        """Unnormalised choice probability per class, float [C] >= 0."""
        if self.strategy == "balanced":
            return 1.0 / self.choices.clamp(min=1.0).pow(self.balanced_gamma)
        if self.strategy == "focal":
            return self.focal_factor.clamp(min=0.0)
        return torch.ones_like(self.choices)

    @torch.no_grad()
    def update_focal(
        self, oc_logits: torch.Tensor, remaining: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Update the focal factor from the ordinary classifier's logits on the masked images (SPEC §4.4).

        For every class present in the batch, ``f_c <- mu * f_c + (1 - mu) * sum_b (1 - p_t)^gamma / n_c`` with
        ``p_t = sigmoid(z)`` where the remaining label is 1 and ``1 - sigmoid(z)`` where it is 0 (soft labels
        interpolate), and ``n_c = sum_b labels[b, c]``. Always called, whatever the strategy, as in the reference.

        Args:
            oc_logits: float [B, C], the ordinary classifier's logits on the masked images.
            remaining: float [B, C] in [0, 1], the labels left after :meth:`split`.
            labels: float [B, C], the labels given to :meth:`split`; if omitted, ``remaining + chosen`` of the last
                split is used (exact for binary labels).

        Returns:
            The updated focal factor, float32 [C].
        """
        if labels is None:
            if self._last_chosen is None:
                raise ValueError("update_focal needs the labels, or a previous call to split()")
            labels = remaining + self._last_chosen
        self.to(oc_logits.device)
        probs = torch.sigmoid(oc_logits.detach().float())
        target = remaining.float()
        p_t = target * probs + (1.0 - target) * (1.0 - probs)
        batch_factor = (1.0 - p_t).pow(self.focal_gamma).sum(dim=0)  # [C]
        counts = labels.float().sum(dim=0)
        in_batch = (labels != 0).any(dim=0)
        updated = self.focal_momentum * self.focal_factor + (1.0 - self.focal_momentum) * (
            batch_factor / counts.clamp(min=1e-12)
        )
        self.focal_factor = torch.where(in_batch, updated, self.focal_factor)
        return self.focal_factor

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The splitter's state as CPU tensors: ``choices`` and ``focal_factor``, float32 [C] each."""
        return {name: getattr(self, name).detach().cpu().clone() for name in ("choices", "focal_factor")}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the state saved by :meth:`state_dict` (keeps the current device)."""
        for name in ("choices", "focal_factor"):
            if name not in state:
                raise WSSSError(f"label-splitter state lacks {name!r}: resume from a checkpoint of an OC-CSE/P-NOC run")
            value = torch.as_tensor(state[name], dtype=torch.float32)
            if value.shape != (self.num_classes,):
                raise WSSSError(
                    f"label-splitter state {name!r} has shape {tuple(value.shape)}, expected ({self.num_classes},): "
                    "resume from a checkpoint of the same dataset"
                )
            setattr(self, name, value.to(getattr(self, name).device))


def chosen_class_maps(maps: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """ReLU'd map of the chosen class per sample (the max over chosen classes when several are chosen).

    Args:
        maps: float [B, C, h, w], raw class maps.
        chosen: [B, C] one-hot (0/1) rows; an all-zero row gives an all-zero map.

    Returns:
        float [B, 1, h, w], >= 0.
    """
    if chosen.shape != maps.shape[:2]:
        raise ValueError(f"chosen {tuple(chosen.shape)} does not match maps {tuple(maps.shape)} in [B, C]")
    weighted = F.relu(maps) * chosen[:, :, None, None].to(maps.dtype)
    return weighted.amax(dim=1, keepdim=True)


def soft_mask_images(
    images: torch.Tensor, maps: torch.Tensor, chosen: torch.Tensor, global_norm: bool = True
) -> torch.Tensor:
    """OC-CSE's soft erasing ``x * (1 - M)``, differentiable w.r.t. ``maps``.

    ``M`` is the ReLU'd chosen-class map, bilinearly upsampled to the image size (``align_corners=False``) and
    divided by its maximum + 1e-5, taken over the whole batch (``global_norm=True``, OC-CSE's policy and the
    reference default: a sample's mask strength depends on the other samples) or per sample.

    Args:
        images: float [B, 3, H, W], normalised images.
        maps: float [B, C, h, w], raw class maps of the CAM generator.
        chosen: [B, C] one-hot rows from :meth:`LabelSplitter.split`; all-zero rows leave their image unchanged.
        global_norm: normalise by the batch maximum (True) or by each sample's maximum (False).

    Returns:
        float [B, 3, H, W], the images with the chosen class's region faded towards 0 (the mean colour).
    """
    mask = F.interpolate(chosen_class_maps(maps, chosen), size=images.shape[2:], mode="bilinear", align_corners=False)
    peak = mask.amax() if global_norm else mask.amax(dim=(2, 3), keepdim=True)
    mask = mask / (peak + MASK_EPS)
    return images * (1.0 - mask)


@torch.no_grad()
def hard_mask_images(
    images: torch.Tensor, maps: torch.Tensor, chosen: torch.Tensor, threshold: float = 0.2
) -> torch.Tensor:
    """P-NOC's hard erasing for the adversary step: ``x * 1[M_hat <= threshold]``, detached.

    ``M_hat`` is the ReLU'd chosen-class map (detached), bilinearly upsampled to the image size
    (``align_corners=False``) and divided by its own per-sample maximum + 1e-5.

    Args:
        images: float [B, 3, H, W], normalised images.
        maps: float [B, C, h, w], raw class maps.
        chosen: [B, C] one-hot rows; all-zero rows leave their image unchanged.
        threshold: pixels with normalised map above it are set to 0 (the reference's ``--oc_train_mask_t`` 0.2).

    Returns:
        float [B, 3, H, W], no gradient.
    """
    mask = F.interpolate(
        chosen_class_maps(maps.detach(), chosen), size=images.shape[2:], mode="bilinear", align_corners=False
    )
    mask = mask / (mask.amax(dim=(2, 3), keepdim=True) + MASK_EPS)
    return (images * (mask <= threshold).to(images.dtype)).detach()
