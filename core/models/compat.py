"""Reading weight files and mapping every known checkpoint layout onto the current one.

Current layout (SPEC §2.4): ``backbone.<native torchvision/resnest key>`` plus the head keys
(``classifier.weight`` for the CAM classifier). Also accepted:

* our training checkpoints: ``{"model": state_dict, ...}`` or ``{"models": {"cg": state_dict, ...}}``;
* files wrapped as ``{"state_dict": ...}`` and keys prefixed by ``module.`` (DataParallel/DDP) or
  ``_orig_mod.`` (``torch.compile``);
* P-NOC reference layout until 2023-10: ``model.<native key>`` with every tensor duplicated under
  ``stage1..stage5``;
* P-NOC reference layout 2023-10 → 2024-02: ``stage1..stage5`` only (``stage1.0`` = stem conv,
  ``stage1.1`` = bn1, ``stage{2..5}.0`` = layer1..layer4).
* the ResNet-38 references (PSA, SEAM, EPS, PPC: ``conv1a.*``, ``b2.*`` .. ``b7.*``, ``bn7.*``, no prefix): the
  backbone keys gain ``backbone.``, ``fc8`` becomes ``classifier`` and SEAM's PCM convs ``f8_3``, ``f8_4``, ``f9``
  become ``pcm.low``, ``pcm.mid``, ``pcm.fuse`` (:mod:`core.cam.seam`).

Heads keep their keys in every layout; :data:`CLASS_HEADS` names the tensor that carries each network's class count
(the CAM classifier's ``classifier.weight``, DeepLabV3+'s ``decoder.classifier.8.weight``), so messages can say
which network and how many classes a file holds.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from core.errors import WSSSError

logger = logging.getLogger(__name__)

#: The block counts (layer1..layer4) of every supported architecture, for naming a state dict.
KNOWN_DEPTHS: dict[tuple[str, tuple[int, ...]], str] = {
    ("resnet-basic", (2, 2, 2, 2)): "resnet18",
    ("resnet-basic", (3, 4, 6, 3)): "resnet34",
    ("resnet", (3, 4, 6, 3)): "resnet50",
    ("resnet", (3, 4, 23, 3)): "resnet101",
    ("resnet", (3, 8, 36, 3)): "resnet152",
    ("resnest", (3, 4, 6, 3)): "resnest50",
    ("resnest", (3, 4, 23, 3)): "resnest101",
    ("resnest", (3, 24, 36, 3)): "resnest200",
    ("resnest", (3, 30, 48, 8)): "resnest269",
}

#: Blocks of the groups b2..b7 of the wide ResNet-38d.
RESNET38_BLOCKS = (3, 3, 6, 3, 1, 1)

#: class-head weight key -> (network name, what its first dimension counts).
CLASS_HEADS: dict[str, tuple[str, str]] = {
    "classifier.weight": ("classifier", "foreground classes"),
    "decoder.classifier.8.weight": ("DeepLabV3+", "classes (background included)"),
}

_WRAPPER_KEYS = ("state_dict", "model")
# Training-only heads a plain classifier drops when it loads such a checkpoint (SC-CAM's sub-category head, PPC's
# projection head): the CAMs come from ``classifier.weight``, so inference and --restore take those weights as they are.
AUXILIARY_HEADS = ("sub_classifier.", "projection.")
_PREFIXES_TO_STRIP = ("module.", "_orig_mod.")
_STAGE_TO_NATIVE = (
    (re.compile(r"^stage1\.0\."), "backbone.conv1."),
    (re.compile(r"^stage1\.1\."), "backbone.bn1."),
    (re.compile(r"^stage2\.0\."), "backbone.layer1."),
    (re.compile(r"^stage3\.0\."), "backbone.layer2."),
    (re.compile(r"^stage4\.0\."), "backbone.layer3."),
    (re.compile(r"^stage5\.0\."), "backbone.layer4."),
)
_STAGE_KEY = re.compile(r"^stage[1-5]\.")
# A ResNet-38 reference file: the backbone's own keys (core/models/resnet38.py) at the top level.
_RESNET38_BACKBONE_KEY = re.compile(r"^(conv1a|b[2-7](_\d)?|bn7)\.")
_RESNET38_BLOCK = re.compile(r"(?:^|\.)b([2-7])(?:_(\d))?\.")
_RESNET38_HEADS = (
    ("fc8.", "classifier."),
    ("f8_3.", "pcm.low."),
    ("f8_4.", "pcm.mid."),
    ("f9.", "pcm.fuse."),
    ("fc_proj.", "projection.conv."),  # PPC's projection head (SEAM branch; the EPS branch calls it proj_fc)
    ("proj_fc.", "projection.conv."),
)
_LAYER_BLOCK = re.compile(r"(?:^|\.)layer([1-4])\.(\d+)\.")


class KeyMismatch(NamedTuple):
    """How a state dict differs from a model's: key names only in one of them, and keys whose shapes differ."""

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]

    def is_empty(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def summary(self, examples: int = 2) -> str:
        """One-line summary such as ``3 missing keys (e.g. a, b), 1 with another shape (e.g. c)``."""
        parts = []
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("with another shape", self.wrong_shape),
        ):
            if keys:
                noun = "key" if len(keys) == 1 else "keys"
                shown = ", ".join(keys[:examples])
                parts.append(f"{len(keys)} {label} {noun} (e.g. {shown})")
        return ", ".join(parts) if parts else "no differences"


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> Any:
    """Load a ``.pth`` file onto the CPU without executing pickled code.

    Args:
        path: file written by ``torch.save``.
        trusted: allow full unpickling for legacy files that hold Python objects besides tensors
            (only for files from a source you trust).

    Returns:
        Whatever the file holds (usually a dict of tensors or a dict of such dicts).

    Raises:
        WSSSError: the file is missing, unreadable, or needs unpickling while ``trusted`` is False.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WSSSError(f"weights file {path} not found; check the path")
    if not _looks_like_torch_file(path):
        raise WSSSError(
            f"weights file {path} is not a PyTorch file (neither a torch.save zip archive nor a legacy torch pickle: "
            "corrupt, truncated or of another format); re-create or re-download it"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise WSSSError(f"cannot read weights file {path} ({_first_line(e)}); it is not a PyTorch file") from e
        if not trusted:
            raise WSSSError(
                f"weights file {path} holds pickled Python objects that safe loading refuses; re-save it as a plain "
                "state dict, or pass --trust_checkpoint true if you trust its source"
            ) from e
        logger.warning("loading %s with full unpickling (trusted legacy file)", path)
    except Exception as e:  # noqa: BLE001  (torch raises RuntimeError, EOFError, KeyError, ... for damaged files)
        raise WSSSError(
            f"cannot read weights file {path} ({type(e).__name__}: {_first_line(e)}); the file is truncated or not a "
            "PyTorch file; re-create or re-download it"
        ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # arbitrary unpickling errors of a legacy file
        raise WSSSError(f"cannot read weights file {path} ({_first_line(e)}); re-create or re-download it") from e


def _looks_like_torch_file(path: str) -> bool:
    """A zip archive (torch.save since 1.6, TorchScript) or a pickle of protocol 2-5 (legacy torch.save)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def unwrap_state_dict(obj: Any, source: str = "the state dict") -> dict[str, torch.Tensor]:
    """Return the model state dict held by a checkpoint object (see the module docstring for the wrappers).

    Raises:
        WSSSError: no state dict of tensors can be found in ``obj``.
    """
    while isinstance(obj, Mapping):
        if "models" in obj and isinstance(obj["models"], Mapping):
            models = obj["models"]
            if "cg" not in models and len(models) != 1:
                raise WSSSError(f"checkpoint {source} holds models {sorted(models)} but no 'cg' (CAM generator)")
            obj = models["cg"] if "cg" in models else next(iter(models.values()))  # a one-network run's state
            continue
        wrapper = next((k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WSSSError(f"checkpoint {source} holds no state dict of tensors; pass a model weights file")
    return dict(obj)


def normalize_state_dict_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of any known layout to the current ``backbone.*`` layout (heads are left unchanged).

    Args:
        state_dict: a flat state dict in any layout listed in the module docstring.

    Returns:
        A new dict with the same tensors; the duplicated ``stage*`` copies of the oldest layout are dropped.
    """
    renamed = {_strip_prefixes(key): value for key, value in state_dict.items()}
    if any(key.startswith("model.") for key in renamed):
        return {
            "backbone." + key[len("model.") :] if key.startswith("model.") else key: value
            for key, value in renamed.items()
            if not _STAGE_KEY.match(key)
        }
    if any(_STAGE_KEY.match(key) for key in renamed):
        return {_stage_to_native(key): value for key, value in renamed.items()}
    if any(key.startswith("conv1a.") for key in renamed):
        return {_resnet38_to_current(key): value for key, value in renamed.items()}
    return renamed


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Describe the network a state dict belongs to, e.g. ``21-class resnest269-like classifier (layers 3,30,48,8)``.

    The family comes from key names (split-attention convs → ResNeSt, ``conv3`` → Bottleneck ResNet, else
    BasicBlock ResNet), the depth from the block indices of ``layer1..layer4`` and the class count from
    ``classifier.weight`` (shape ``[C, D, 1, 1]``). Works on any layout (keys are normalised first).
    """
    keys = list(normalize_state_dict_keys(state_dict))
    depths = _block_counts(keys)
    if _is_resnet38(keys):
        net, depth_text = "resnet38-like", ",".join(str(d) for d in _resnet38_block_counts(keys))
        heads = {k: v for k, v in normalize_state_dict_keys(state_dict).items() if k in CLASS_HEADS}
        if not heads:
            return f"{net} network (blocks {depth_text})"
        key, head = next(iter(heads.items()))
        pcm = " with a PCM (SEAM)" if any(k.startswith("pcm.") for k in keys) else ""
        return f"{head.shape[0]}-channel {net} {CLASS_HEADS[key][0]}{pcm} (blocks {depth_text})"
    if not any(depths):
        shown = ", ".join(keys[:3])
        return f"state dict without ResNet layers (first keys: {shown})"
    family = _family(keys)
    depth_text = ",".join(str(d) for d in depths)
    name = KNOWN_DEPTHS.get((family, depths))
    net = (
        f"{name}-like"
        if name
        else {"resnet-basic": "BasicBlock resnet", "resnet": "Bottleneck resnet"}.get(family, family)
    )
    heads = {_strip_prefixes(k): v for k, v in state_dict.items() if _strip_prefixes(k) in CLASS_HEADS}
    if not heads:
        return f"{net} network (layers {depth_text})"
    key, head = next(iter(heads.items()))
    return f"{head.shape[0]}-class {net} {CLASS_HEADS[key][0]} (layers {depth_text})"


def architecture_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registry name of the backbone a state dict holds, from its key family and block counts (None: unknown).

    Works on any layout :func:`normalize_state_dict_keys` reads.
    """
    keys = list(normalize_state_dict_keys(state_dict))
    if _is_resnet38(keys):
        return "resnet38" if _resnet38_block_counts(keys) == RESNET38_BLOCKS else None
    return KNOWN_DEPTHS.get((_family(keys), _block_counts(keys)))


def with_batch_counters(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``given`` plus the BatchNorm ``num_batches_tracked`` counters it lacks (zero), so files saved before PyTorch
    0.4.1 or converted from MXNet (the ResNet-38 references') load strictly; the counters affect no output."""
    filled = dict(given)
    for key, value in expected.items():
        layer = key.removesuffix("num_batches_tracked")
        if layer != key and key not in filled and f"{layer}running_mean" in filled:
            filled[key] = torch.zeros_like(value, device="cpu")
    return filled


def compare_state_dicts(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> KeyMismatch:
    """List the keys of ``expected`` missing from ``given``, the extra keys, and the keys whose shapes differ."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [k for k in expected if k in given and tuple(expected[k].shape) != tuple(given[k].shape)]
    return KeyMismatch(missing, unexpected, wrong_shape)


def load_classifier_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    trusted: bool = False,
    weights_flag: str = "--weights",
    source_name: str | None = None,
) -> KeyMismatch:
    """Load a classifier checkpoint of any known layout into ``model`` (in place).

    Training-only heads (:data:`AUXILIARY_HEADS`) the model lacks are dropped, so a two-head SC-CAM checkpoint
    loads into a plain classifier.

    Args:
        model: a :class:`core.models.Classifier` (any module with the current key layout works).
        source: a file path, or an already loaded checkpoint / state dict.
        strict: require every key and shape to match; when False, load the matching tensors and log the rest.
        trusted: allow full unpickling of legacy files (see :func:`read_checkpoint`).
        weights_flag: the flag that chose ``source`` (``--weights``, ``--restore``), named in a mismatch message.
        source_name: how messages name an in-memory ``source`` (e.g. the file it was read from).

    Returns:
        The differences that were skipped (all empty when ``strict``).

    Raises:
        WSSSError: unreadable file, or (strict) a different architecture / class count / key set; the message
            names the checkpoint and the model.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source_name or "(in-memory state dict)"
    raw = read_checkpoint(source, trusted=trusted) if isinstance(source, (str, os.PathLike)) else source
    state_dict = normalize_state_dict_keys(unwrap_state_dict(raw, name))
    expected = model.state_dict()
    auxiliary = [k for k in state_dict if k.startswith(AUXILIARY_HEADS) and k not in expected]
    if auxiliary:
        logger.info("%s: training-only head %s not used by this model", name, ", ".join(auxiliary))
        state_dict = {k: v for k, v in state_dict.items() if k not in auxiliary}
    state_dict = with_batch_counters(expected, state_dict)
    mismatch = compare_state_dicts(expected, state_dict)
    if mismatch.is_empty():
        model.load_state_dict(state_dict, strict=True)
        logger.info("loaded weights from %s", name)
        return mismatch
    if strict:
        raise WSSSError(_mismatch_message(name, state_dict, model, mismatch, weights_flag))
    skipped = set(mismatch.wrong_shape)
    loadable = {k: v for k, v in state_dict.items() if k in expected and k not in skipped}
    model.load_state_dict(loadable, strict=False)
    logger.warning(
        "loaded %d of %d tensors from %s; skipped %s", len(loadable), len(expected), name, mismatch.summary()
    )
    return mismatch


def _mismatch_message(
    name: str, state_dict: Mapping[str, torch.Tensor], model: nn.Module, mismatch: KeyMismatch, weights_flag: str
) -> str:
    held = describe_state_dict(state_dict)
    wanted = _describe_model(model)
    head = _class_head_key(model.state_dict())
    head_keys = {head, head.rsplit(".", 1)[0] + ".bias"} if head else set()
    if (
        not mismatch.missing
        and not mismatch.unexpected
        and mismatch.wrong_shape
        and set(mismatch.wrong_shape) <= head_keys
    ):
        # Same network, another head: the model's class count comes from the dataset, not from a flag of its own.
        classes = int(model.state_dict()[head].shape[0])
        return (
            f"checkpoint {name} holds a {held} but the dataset has {classes} {CLASS_HEADS[head][1]}; pass the "
            f"--dataset (or --class_names) the weights were trained on, or {weights_flag} of a model trained on this "
            "dataset"
        )
    if held != describe_state_dict(model.state_dict()):
        return (
            f"checkpoint {name} holds a {held} but the model is a {wanted}; pass the matching --architecture "
            f"(and --mode/--dilated), or {weights_flag} of a model of this architecture"
        )
    return f"checkpoint {name} does not fit the {wanted}: {mismatch.summary()}; pass a checkpoint saved from this model"


def _class_head_key(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    return next((key for key in CLASS_HEADS if key in state_dict), None)


def _describe_model(model: nn.Module) -> str:
    kwargs = getattr(model, "model_kwargs", None)
    state_dict = model.state_dict()
    if isinstance(kwargs, Mapping) and "architecture" in kwargs and "num_classes" in kwargs:
        keys = list(state_dict)
        counts, unit = (
            (_resnet38_block_counts(keys), "blocks") if _is_resnet38(keys) else (_block_counts(keys), "layers")
        )
        depths = ",".join(str(d) for d in counts)
        head = _class_head_key(state_dict)
        kind = CLASS_HEADS[head][0] if head else "network"
        return f"{kwargs['num_classes']}-class {kwargs['architecture']} {kind} ({unit} {depths})"
    return describe_state_dict(state_dict)


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES_TO_STRIP:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _stage_to_native(key: str) -> str:
    for pattern, replacement in _STAGE_TO_NATIVE:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key


def _resnet38_to_current(key: str) -> str:
    if _RESNET38_BACKBONE_KEY.match(key):
        return "backbone." + key
    for old, new in _RESNET38_HEADS:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _is_resnet38(keys: list[str]) -> bool:
    return any(key.startswith("backbone.conv1a.") or key.startswith("conv1a.") for key in keys)


def _resnet38_block_counts(keys: list[str]) -> tuple[int, ...]:
    """Blocks of the groups b2..b7 (the published network: 3, 3, 6, 3, 1, 1)."""
    counts = [0] * 6
    for key in keys:
        match = _RESNET38_BLOCK.search(key)
        if match:
            group, index = int(match.group(1)) - 2, int(match.group(2) or 0)
            counts[group] = max(counts[group], index + 1)
    return tuple(counts)


def _block_counts(keys: list[str]) -> tuple[int, int, int, int]:
    counts = [0, 0, 0, 0]
    for key in keys:
        match = _LAYER_BLOCK.search(key)
        if match:
            layer, block = int(match.group(1)) - 1, int(match.group(2))
            counts[layer] = max(counts[layer], block + 1)
    return tuple(counts)  # type: ignore[return-value]


def _family(keys: list[str]) -> str:
    if any(".conv2.fc1." in key or ".conv2.conv." in key for key in keys):
        return "resnest"
    if any(re.search(r"layer\d\.\d+\.conv3\.", key) for key in keys):
        return "resnet"
    return "resnet-basic"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
