"""Sub-category exploration (SC-CAM, METHODS §10) and Sub-category Teaching (METHODS §11).

A round of SC-CAM: GAP features of every training image from the previous round's model
(``scripts/cam/extract_features.py``), clusters of each parent class's features
(``scripts/cam/cluster_subcategories.py``), then a fresh classifier with a parent head and a sub-category head
(``scripts/cam/train_subcategory.py``)::

    L = MLSM(z_parent, ỹ) + λ · MLSM(z_sub, y_sub)          (λ = 5 SC-CAM, 2 Sub-category Teaching)

where ``y_sub`` is multi-hot with one sub-class per present parent class. Sub-category Teaching clusters the
features of a ViT teacher with FINCH instead; ``--knowledge_distillation true`` also pulls the parent logits
towards the teacher's sigmoid outputs on the same batch, ``+ λ_kd · MLSM(z_parent / T, σ(z_teacher / T))``.

Files (``.npz``, no pickles; both carry the dataset and domain they were computed on):

* features: ``features`` float32 [N, D], ``ids`` str [N], ``labels`` float32 [N, C], ``dataset``, ``domain``;
* sub-categories: ``ids`` str [N], ``sub_labels`` uint8 [N, S], ``parents`` int64 [S] (0-based parent class of
  each sub-class), ``method``, ``dataset``, ``domain``. Sub-classes of class c are contiguous (c·K + k for
  k-means when no class is clamped).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.artifacts import atomic_write
from core.cam.methods import ClassLoss, classification_loss, to_floats
from core.cli import add_arg, add_bool_arg
from core.datasets.transforms import normalize, resize_image, to_chw
from core.engine import StepFn, TrainContext
from core.errors import WSSSError, first_ids
from core.inference import build_image_loader
from core.losses import multilabel_soft_margin
from core.models import BACKBONES, Classifier, describe_state_dict, load_classifier_weights, read_checkpoint
from core.models.compat import normalize_state_dict_keys, unwrap_state_dict

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.npz"
SUBCATEGORIES_FILE = "subcategories.npz"
CLUSTERINGS = ("kmeans", "finch")
DEFAULT_N_CLUSTERS = 10
KMEANS_MAX_ITER = 300


# -- files ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureFile:
    """GAP features of a domain. features: float32 [N, D]; labels: float32 [N, C] in {0, 1}."""

    ids: list[str]
    features: np.ndarray
    labels: np.ndarray
    dataset: str
    domain: str


@dataclass(frozen=True)
class SubLabels:
    """Sub-category labels. sub_labels: uint8 [N, S] in {0, 1}; parents: int64 [S], parent class of each sub-class."""

    ids: list[str]
    sub_labels: np.ndarray
    parents: np.ndarray
    method: str
    dataset: str
    domain: str

    @property
    def num_subclasses(self) -> int:
        return int(self.parents.shape[0])

    def cluster_sizes(self) -> dict[int, list[int]]:
        """parent class -> images in each of its sub-classes."""
        counts = self.sub_labels.sum(axis=0)
        return {int(c): [int(counts[s]) for s in np.flatnonzero(self.parents == c)] for c in np.unique(self.parents)}


def resolve_file(path: str | os.PathLike, name: str, flag: str) -> Path:
    """``path`` itself when it is a file, ``path/name`` when it is a folder (a stage's output folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise WSSSError(f"{flag} {path} not found; pass the {name} (or its folder) written by the previous step")
    return path


def save_features(path: str | os.PathLike, data: FeatureFile) -> Path:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            ids=np.asarray(data.ids, dtype=str),
            features=data.features.astype(np.float32),
            labels=data.labels.astype(np.float32),
            dataset=np.asarray(data.dataset),
            domain=np.asarray(data.domain),
        )
    return Path(path)


def load_features(path: str | os.PathLike) -> FeatureFile:
    """Read a feature file; WSSSError naming the file when it is not one."""
    values = _read_npz(path, ("ids", "features", "labels", "dataset", "domain"), "scripts/cam/extract_features.py")
    ids = [str(i) for i in values["ids"]]
    if values["features"].ndim != 2 or values["features"].shape[0] != len(ids) or len(values["labels"]) != len(ids):
        raise WSSSError(f"feature file {path} has inconsistent shapes; rerun scripts/cam/extract_features.py")
    return FeatureFile(ids, values["features"], values["labels"], str(values["dataset"]), str(values["domain"]))


def save_sub_labels(path: str | os.PathLike, data: SubLabels) -> Path:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            ids=np.asarray(data.ids, dtype=str),
            sub_labels=data.sub_labels.astype(np.uint8),
            parents=data.parents.astype(np.int64),
            method=np.asarray(data.method),
            dataset=np.asarray(data.dataset),
            domain=np.asarray(data.domain),
        )
    return Path(path)


def load_sub_labels(path: str | os.PathLike) -> SubLabels:
    """Read a sub-category file; WSSSError naming the file when it is not one."""
    keys = ("ids", "sub_labels", "parents", "method", "dataset", "domain")
    values = _read_npz(path, keys, "scripts/cam/cluster_subcategories.py")
    ids = [str(i) for i in values["ids"]]
    sub, parents = values["sub_labels"], values["parents"]
    if sub.ndim != 2 or sub.shape != (len(ids), parents.shape[0]):
        raise WSSSError(f"sub-category file {path} has inconsistent shapes; rerun scripts/cam/cluster_subcategories.py")
    return SubLabels(ids, sub, parents, str(values["method"]), str(values["dataset"]), str(values["domain"]))


def _read_npz(path: str | os.PathLike, keys: Sequence[str], writer: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise WSSSError(f"{path} lacks {', '.join(missing)}: it was not written by {writer}; rerun it")
            return {k: data[k] for k in keys}
    except (OSError, ValueError) as e:
        raise WSSSError(f"cannot read {path} ({e}); rerun {writer}") from e


def check_same_ids(
    file_ids: Sequence[str], domain_ids: Sequence[str], what: str, fix: str, allow_extra: bool = False
) -> None:
    """One-line WSSSError when a file's ids are not those of the dataset's domain (another dataset or domain).

    Args:
        allow_extra: accept a file that covers the domain and more (sub-labels of train_aug to train on train).
    """
    missing = sorted(set(domain_ids) - set(file_ids))
    extra = [] if allow_extra else sorted(set(file_ids) - set(domain_ids))
    if missing or extra:
        found = f"{len(missing)} of the domain's {len(set(domain_ids))} ids missing"
        if missing:
            found += f" (e.g. {first_ids(missing)})"
        if extra:
            found += f", {len(extra)} ids not in the domain (e.g. {first_ids(extra)})"
        raise WSSSError(f"{what} does not match the dataset: {found}; {fix}")


# -- clustering -----------------------------------------------------------------------------------------------------
def cluster_subcategories(
    features: np.ndarray,
    labels: np.ndarray,
    method: str = "kmeans",
    n_clusters: int = DEFAULT_N_CLUSTERS,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the images of each parent class into sub-classes.

    Args:
        features: float [N, D]; labels: float [N, C] in {0, 1}.
        method: ``kmeans`` (SC-CAM: K = ``n_clusters`` per class, ``random_state`` = ``seed``, max_iter 300) or
            ``finch`` (Sub-category Teaching: FINCH's coarsest partition, a data-driven K per class; cosine).
        n_clusters: k-means K. A class with fewer images gets one sub-class per image (a warning names it).
        class_names: names for the log and warnings (default ``class <c>``).

    Returns:
        (sub_labels uint8 [N, S], one 1 per present parent class; parents int64 [S]). A class without images
        gets no sub-class.
    """
    if method not in CLUSTERINGS:
        raise WSSSError(f"unknown clustering {method!r}; choose one of {', '.join(CLUSTERINGS)}")
    features = np.asarray(features, dtype=np.float32)
    num_images, num_classes = labels.shape
    columns: list[np.ndarray] = []
    parents: list[int] = []
    for c in range(num_classes):
        members = np.flatnonzero(labels[:, c] > 0.5)
        if members.size == 0:
            continue
        name = class_names[c] if class_names is not None else f"class {c}"
        assignment = _cluster_one_class(features[members], method, n_clusters, seed, name)
        for k in range(int(assignment.max()) + 1):
            column = np.zeros(num_images, dtype=np.uint8)
            column[members[assignment == k]] = 1
            columns.append(column)
            parents.append(c)
    sub_labels = np.stack(columns, axis=1) if columns else np.zeros((num_images, 0), dtype=np.uint8)
    return sub_labels, np.asarray(parents, dtype=np.int64)


def _cluster_one_class(features: np.ndarray, method: str, n_clusters: int, seed: int, name: str) -> np.ndarray:
    """Cluster ids 0..K-1 (every id used) of one class's images."""
    count = features.shape[0]
    if method == "kmeans":
        k = int(n_clusters)
        if k > count:
            logger.warning(
                "%s has %d images, fewer than --n_clusters %d: clamped to %d sub-classes", name, count, k, count
            )
            k = count
        if k == 1:
            return np.zeros(count, dtype=np.int64)
        from sklearn.cluster import KMeans

        assignment = KMeans(n_clusters=k, n_init=10, max_iter=KMEANS_MAX_ITER, random_state=seed).fit_predict(features)
    else:
        if count < 3:  # FINCH needs a first-neighbour graph of at least a few points
            return np.zeros(count, dtype=np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # finch warns when its optional pynndescent is missing
            from finch import FINCH

            partitions, _, _ = FINCH(features, distance="cosine", verbose=False, random_state=seed)
        assignment = partitions[:, -1]
    _, assignment = np.unique(assignment, return_inverse=True)  # ids 0..K-1, ordered, every one used
    return assignment.astype(np.int64)


# -- training -------------------------------------------------------------------------------------------------------
def positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def add_subcategory_args(parser: argparse.ArgumentParser, weight: float = 5.0) -> argparse._ArgumentGroup:
    """The sub-category head's flags and the teacher's (knowledge distillation)."""
    group = parser.add_argument_group("sub-categories (SC-CAM, Sub-category Teaching)")
    add_arg(
        group,
        "--subcategories",
        type=str,
        required=True,
        help=f"{SUBCATEGORIES_FILE} of scripts/cam/cluster_subcategories.py (or its folder)",
    )
    add_arg(
        group,
        "--subcategory_weight",
        type=float,
        default=weight,
        help=f"λ of the sub-category loss (default {weight}: SC-CAM 5, Sub-category Teaching 2; 0 = vanilla)",
    )
    add_bool_arg(
        group,
        "--knowledge_distillation",
        False,
        "also fit the parent logits to the teacher's sigmoid outputs (needs --teacher_weights)",
    )
    add_arg(group, "--teacher_weights", type=str, default=None, help="teacher classifier .pth (train_vanilla.py)")
    add_arg(
        group,
        "--teacher_architecture",
        type=str,
        default="vit_base_patch16_224",
        choices=list(BACKBONES),
        help="teacher backbone",
    )
    add_arg(group, "--kd_weight", type=float, default=1.0, help="λ_kd of the distillation loss")
    add_arg(group, "--kd_temperature", type=positive_float, default=1.0, help="temperature T of both logits")
    return group


def build_teacher(args: argparse.Namespace, num_classes: int) -> Classifier:
    """The frozen teacher classifier of ``--teacher_weights``, in eval mode.

    Raises:
        WSSSError: no or a missing file, weights of another class count or architecture (one line naming the file).
    """
    path = args.teacher_weights
    if not path:
        raise WSSSError("--knowledge_distillation true needs --teacher_weights (a classifier of train_vanilla.py)")
    if not Path(path).is_file():
        raise WSSSError(f"--teacher_weights {path} does not exist; train the teacher with train_vanilla.py first")
    model = Classifier(args.teacher_architecture, num_classes, backbone_weights="none")
    state = normalize_state_dict_keys(unwrap_state_dict(read_checkpoint(path), str(path)))
    held = state.get("classifier.weight")
    if held is not None and held.shape[0] != num_classes:
        raise WSSSError(
            f"--teacher_weights {path} is a {held.shape[0]}-class classifier but the dataset has {num_classes} "
            "classes: pass a teacher trained on this dataset (scripts/cam/train_vanilla.py)"
        )
    try:
        load_classifier_weights(model, state, weights_flag="--teacher_weights")
    except WSSSError as e:
        raise WSSSError(
            f"--teacher_weights {path} holds a {describe_state_dict(state)}, not a {args.teacher_architecture}: "
            "pass the matching --teacher_architecture"
        ) from e
    model.requires_grad_(False)
    return model.eval()


@dataclass(frozen=True)
class SubcategorySpec:
    """What the step needs: losses, λ, the id -> sub-label table, and the distillation settings."""

    class_loss: ClassLoss
    table: dict[str, np.ndarray]
    weight: float
    kd_weight: float = 0.0
    kd_temperature: float = 1.0


def subcategory_loss(
    logits: torch.Tensor,
    sub_logits: torch.Tensor,
    labels: torch.Tensor,
    sub_labels: torch.Tensor,
    weight: float,
    class_loss: ClassLoss = multilabel_soft_margin,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L = class_loss(z_parent, y) + weight · MLSM(z_sub, y_sub)``.

    Args:
        logits: float [B, C]; sub_logits: float [B, S]; labels: float [B, C]; sub_labels: float [B, S] in {0, 1}.

    Returns:
        (L, parent term, sub-category term), scalar float32 tensors.
    """
    c_loss = class_loss(logits, labels)
    s_loss = multilabel_soft_margin(sub_logits, sub_labels)
    return c_loss + weight * s_loss, c_loss, s_loss


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``MLSM(z / T, σ(z_teacher / T))``: the student's sigmoid outputs fitted to the teacher's soft targets."""
    targets = torch.sigmoid(teacher_logits.detach().float() / temperature)
    return multilabel_soft_margin(logits / temperature, targets)


def lookup_sub_labels(table: dict[str, np.ndarray], ids: Sequence[str]) -> torch.Tensor:
    """float32 [B, S] sub-labels of a batch's ids."""
    return torch.from_numpy(np.stack([table[i] for i in ids]).astype(np.float32))


def subcategory_step(ctx: TrainContext, batch: dict[str, Any], step: int, spec: SubcategorySpec) -> dict[str, float]:
    """The engine's step: parent + λ·sub-category loss (+ distillation) on ``cg``; ``teacher`` when registered."""
    images, labels = ctx.to_device(batch["image"]), ctx.to_device(batch["label"]).float()
    sub_labels = ctx.to_device(lookup_sub_labels(spec.table, batch["id"]))
    with ctx.autocast():
        logits, sub_logits = ctx.models["cg"](images, with_sub=True)
        loss, c_loss, s_loss = subcategory_loss(logits, sub_logits, labels, sub_labels, spec.weight, spec.class_loss)
        scalars: dict[str, torch.Tensor | float] = {"c_loss": c_loss.detach(), "sub_loss": s_loss.detach()}
        if "teacher" in ctx.members:
            with torch.no_grad():
                teacher_logits = ctx.models["teacher"](images)
            kd_loss = distillation_loss(logits, teacher_logits, spec.kd_temperature)
            loss = loss + spec.kd_weight * kd_loss
            scalars["kd_loss"] = kd_loss.detach()
    ctx.update("cg", loss)
    return to_floats({"loss": loss.detach(), **scalars})


def build_subcategory_step(
    args: argparse.Namespace, table: dict[str, np.ndarray], class_weight: torch.Tensor | None = None
) -> StepFn:
    spec = SubcategorySpec(
        classification_loss(float(args.label_smoothing), class_weight),
        table,
        float(args.subcategory_weight),
        float(args.kd_weight),
        float(args.kd_temperature),
    )
    return functools.partial(subcategory_step, spec=spec)


# -- features -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def gap_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """float32 [B, D]: the spatial mean of the backbone's last features (a ViT: the mean patch token)."""
    return model.backbone(images)[-1].float().mean(dim=(2, 3))


def extract_features(
    model: nn.Module,
    source: Any,
    ids: Sequence[str],
    device: torch.device,
    *,
    batch_size: int = 16,
    image_size: int | None = None,
    num_workers: int = 0,
    autocast: Any = None,
) -> np.ndarray:
    """GAP features of ``ids`` at scale 1 (unflipped), in id order.

    Images are batched by size (VOC has few distinct sizes), or all resized to ``image_size`` squared (the ViT
    teacher's 224). Features are float32 whatever the autocast.

    Args:
        model: a classifier with a ``backbone``, in eval mode on ``device``.
        source: the data source of ``ids``.
        autocast: a context-manager factory for the forward passes (None: fp32).

    Returns:
        float32 [len(ids), D].
    """
    rows: dict[str, np.ndarray] = {}
    buckets: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}

    def flush(key: tuple[int, int]) -> None:
        items = buckets.pop(key)
        images = torch.from_numpy(np.stack([image for _, image in items])).to(device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            features = gap_features(model, images)
        for (image_id, _), row in zip(items, features.cpu().numpy(), strict=True):
            rows[image_id] = row

    for item in build_image_loader(source, ids, num_workers):
        if "error" in item:
            raise WSSSError(item["error"])
        image = item["image"]
        if image_size:
            image = resize_image(image, image_size, image_size)
        key = tuple(image.shape[:2])
        buckets.setdefault(key, []).append((item["id"], to_chw(normalize(image))))
        if len(buckets[key]) >= batch_size:
            flush(key)
    for key in list(buckets):
        flush(key)
    return np.stack([rows[i] for i in ids]).astype(np.float32)
