"""Training checkpoints: where they live, what they hold, atomic writes, safe loads.

Where they live (``experiments/models/<tag>.pth`` and ``<tag>/last.pth``) is :mod:`core.paths`' rule.

Files are saved with plain Python containers and tensors only, so they load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.artifacts import atomic_write, check_writable
from core.errors import WSSSError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def plain_args(args: Any) -> dict[str, Any]:
    """``vars(args)`` reduced to JSON/pickle-safe builtins (paths and other objects become strings)."""
    source = args if isinstance(args, Mapping) else vars(args)
    return {str(k): _plain(v) for k, v in source.items()}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and every CUDA device, as tensors and builtins only."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": _plain_python_state(random.getstate()),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _plain_python_state(state: tuple) -> list:
    version, internal, gauss = state
    return [int(version), list(internal), gauss]


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only for devices that exist."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": int(np_state["pos"])},
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    cuda_states = list(state.get("cuda", []))
    if cuda_states and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def save(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (a crash never leaves a half-written file). Call on rank 0 only."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, **state}
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    logger.debug("saved %s", path)
    return path


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write a bare state dict (tensors moved to CPU) atomically: the format inference scripts load."""
    path = Path(path)
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    with atomic_write(path) as tmp:
        torch.save(cpu_state, tmp)
    logger.info("saved weights to %s", path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint on CPU with ``weights_only=True`` and check its format version.

    Raises:
        WSSSError: missing, unreadable or incompatible file.
    """
    path = Path(path)
    if not path.is_file():
        raise WSSSError(f"checkpoint {path} does not exist: check --tag, or start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise WSSSError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): delete it or start with --overwrite true"
        ) from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise WSSSError(
            f"checkpoint {path} has format {found!r}, expected {FORMAT_VERSION}: it is not a training state of this "
            "toolkit; start with --overwrite true"
        )
    return state


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path, what: str
) -> None:
    """``module.load_state_dict(strict=True)`` that reports a mismatch as a one-line WSSSError."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise WSSSError(
            f"{path}: {what} does not match the model built from the flags ({first}); use the same "
            "--architecture/--mode/--dilated as the run that wrote it"
        ) from e


def check_outputs(final_path: Path, last_path: Path, overwrite: bool, resume: bool) -> bool:
    """Refuse to clobber a finished or interrupted run; tell whether a checkpoint will be resumed.

    Returns:
        True when ``last_path`` exists and ``resume`` is set (the caller loads it), else False.

    Raises:
        WSSSError: outputs exist and neither ``--overwrite true`` nor a resumable ``--resume`` was given.
    """
    check_writable(final_path.parent, folder=True)
    if final_path.exists() and not overwrite:
        # The final file is written last, so it means the run finished: a resume has nothing left to do, and
        # continuing would only rewrite a result that later stages may already have used.
        if resume:
            raise WSSSError(
                f"{final_path} already exists: this run finished, there is nothing to resume; pass --overwrite true "
                "to train it again, or pick another --tag"
            )
        raise WSSSError(f"{final_path} already exists: pass --overwrite true to replace it, or pick another --tag")
    if resume and last_path.is_file():
        return True
    if overwrite:
        return False
    if last_path.exists() and not resume:
        raise WSSSError(
            f"{last_path} exists from an earlier run: pass --resume true to continue it, or --overwrite true"
        )
    if resume:
        logger.info("--resume: no checkpoint at %s yet, starting from scratch", last_path)
    return False
