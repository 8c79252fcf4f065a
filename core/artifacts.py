"""The files exchanged between stages: CAM files, label maps, saliency maps, JSON, and how they are written.

Every writer goes through :func:`atomic_write`, so a file that exists is complete; a stage resumes by skipping the
ids whose output already exists (:func:`pending_ids`).

CAM files are ``<id>.npz`` written with ``np.savez`` (no pickled objects):

* ``format_version``: int64 scalar, :data:`CAM_FORMAT_VERSION` (a file converted from other code without it is
  read as the current version);
* ``keys``: int64 ``[n]``, the image's foreground classes as label-map indices ``1..C`` (no background);
* ``cam``: float32 ``[n, ceil(H/4), ceil(W/4)]`` in ``[0, 1]`` (the stride-4 maps the random walk starts from);
* ``hr_cam``: float32 ``[n, H, W]`` in ``[0, 1]`` (full resolution, what evaluation and label making read).

float32 is kept (not float16) so that evaluation of a CAM file gives exactly the numbers of the in-memory maps.
The background is never stored: it is a constant threshold or ``1 - saliency`` chosen when the file is read.
Legacy pickled ``.npy`` files of IRN and Puzzle-CAM/P-NOC are read behind ``allow_pickle=True`` and converted to
the same convention. Every reader checks what it loads against this contract (:func:`check_cam`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import re
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import WSSSError

logger = logging.getLogger(__name__)

CAM_FORMAT_VERSION = 1
CAM_SUFFIX = ".npz"
LEGACY_CAM_SUFFIX = ".npy"
PNG_SUFFIX = ".png"

# CAM values may overshoot [0, 1] by rounding in the producer (resizing, normalising); beyond this they are a bug.
_RANGE_TOLERANCE = 1e-3
# CAM files without format_version (converted from other code bases) are read as the current version; noted once.
_UNVERSIONED_NOTED = False


# --------------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------------


_TEMP_INFIX = ".tmp-"
# .<name>.tmp-<pid>-<8 hex><suffix of name>: the temporary names atomic_write makes, and nothing else.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>.*)$")

# Why writing a file failed, by errno, and what fixes it.
_WRITE_ERRORS = {
    errno.ENOSPC: ("disk full (no space left on the device)", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk full for this user (quota exceeded)", "free some space or write elsewhere"),
    errno.EFBIG: ("the file is too large for this file system", "write elsewhere"),
    errno.EROFS: ("the file system is read-only", "choose a writable output location"),
    errno.EACCES: ("permission denied", "choose a writable output location or fix the folder's permissions"),
    errno.EPERM: ("permission denied (operation not permitted)", "choose a writable output location"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another output location"),
    errno.EIO: ("input/output error of the device", "check the disk, or write elsewhere"),
}
# torch.save reports a short write (full disk, quota) as a RuntimeError of its zip writer, without an errno.
_TORCH_WRITE_FAILURES = ("inline_container", "unexpected pos", "PytorchStreamWriter", "file write failed")


def _write_failure(path: Path, error: BaseException) -> WSSSError | None:
    """A one-line WSSSError for a failed write of ``path`` (file system or torch.save), None for other errors."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRORS:
        reason, fix = _WRITE_ERRORS[error.errno]
        return WSSSError(f"cannot write {path}: {reason}; {fix}")
    if isinstance(error, RuntimeError) and any(mark in str(error) for mark in _TORCH_WRITE_FAILURES):
        return WSSSError(
            f"cannot write {path}: the write stopped short, the disk is probably full "
            f"({_free_space(path.parent)} free); free some space or write elsewhere"
        )
    return None


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    return f"{free / 2**20:.0f} MiB"


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error remove it.

    The temporary name ``.<name>.tmp-<pid>-<random><suffix>`` keeps the extension, so writers that dispatch on it
    (``np.savez``, ``PIL.Image.save``) behave as for the final name. Parent folders are created.

    Example:
        with atomic_write("out/2007_000032.png") as tmp:
            Image.fromarray(labels).save(tmp)

    Raises:
        WSSSError: the file system refused the write (full disk, read-only, permission), including a ``torch.save``
            that stopped short; the message names ``path``. Other errors of the writer pass through unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        failure = _write_failure(path, e)
        if failure is None:
            raise
        raise failure from e
    tmp = path.with_name(f".{path.name}{_TEMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic_write: nothing was written to the temporary file for {path}")
        os.replace(tmp, path)
    except BaseException as e:
        # BaseException too: an interrupted write must not leave a half file under a name a resume would trust.
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        failure = _write_failure(path, e)
        if failure is None:
            raise
        raise failure from e


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a temporary file of this process found at start-up is left from an earlier run in it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user (or cannot tell): keep its file
    return True


def remove_stale_temp_files(folder: str | os.PathLike, accept: Callable[[str], bool] | None = None) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left in ``folder`` when its process was killed.

    Only names of the form ``.<name>.tmp-<pid>-<8 hex><suffix>`` whose process no longer runs are removed; with
    ``accept``, only those whose final ``<name>`` it accepts (a folder shared by several runs).

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["suffix"] != Path(match["name"]).suffix or not entry.is_file():
            continue
        if (accept is not None and not accept(match["name"])) or _process_alive(int(match["pid"])):
            continue
        with suppress(FileNotFoundError):
            entry.unlink()
        removed.append(entry)
        logger.info("removed %s, left by an interrupted write", entry)
    return removed


def check_writable(path: str | os.PathLike, flag: str | None = None, folder: bool = False) -> None:
    """Raise a one-line WSSSError unless ``path`` (a file, or a folder with ``folder=True``) can be written.

    Nothing is created: the nearest existing folder on the way to ``path`` gets a probe file, removed at once.
    Call it before the work starts, so a read-only or full disk is reported before hours of computing.

    Args:
        path: the output file or folder (it need not exist yet).
        flag: the flag that chose it (e.g. ``--json``), named in the message.
        folder: ``path`` is meant to be a folder (an existing file there is an error).
    """
    path = Path(path)
    what = f"{flag} {path}" if flag else str(path)
    if folder and path.exists() and not path.is_dir():
        raise WSSSError(f"{what} is a file, not a folder; choose another output folder")
    probe = path if path.is_dir() else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise WSSSError(f"{what} cannot be written: {probe} is a file, not a folder; choose another location")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".wsss-write-test-"):
            pass
    except OSError as e:
        failure = _write_failure(probe, e)
        reason = str(failure).split(": ", 1)[1] if failure is not None else f"{e.strerror or e}"
        raise WSSSError(f"{what} cannot be written ({probe}: {reason})") from e
    if shutil.disk_usage(probe).free == 0:
        raise WSSSError(f"{what} cannot be written: disk full at {probe}; free some space or write elsewhere")


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays to Python, NaN/inf to None (strict JSON has no NaN), Paths to str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; numpy values become Python, NaN becomes null."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def pending_ids(ids: Iterable[str], out_dir: str | os.PathLike, suffix: str) -> list[str]:
    """The ids whose ``<out_dir>/<id><suffix>`` does not exist yet, in input order.

    Writes are atomic, so an existing file is complete and the id is done; this is how every stage resumes.
    """
    out_dir = Path(out_dir)
    return [i for i in ids if not (out_dir / f"{i}{suffix}").is_file()]


# --------------------------------------------------------------------------------------------------------------------
# CAM files
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CamFile:
    """The content of one CAM file, in the toolkit's convention.

    Attributes:
        keys: int64 [n], label-map indices 1..C of the planes (no background plane).
        cam: float32 [n, ceil(H/4), ceil(W/4)] in [0, 1], or None when not loaded (``with_cam=False``) or absent.
        hr_cam: float32 [n, H, W] in [0, 1].
    """

    keys: np.ndarray
    cam: np.ndarray | None
    hr_cam: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image the maps belong to."""
        return int(self.hr_cam.shape[1]), int(self.hr_cam.shape[2])


def strided_size(height: int, width: int, stride: int = 4) -> tuple[int, int]:
    """The stride-``stride`` map size ``(ceil(H/stride), ceil(W/stride))`` that ``cam`` has."""
    return -(-height // stride), -(-width // stride)


def cam_path(out_dir: str | os.PathLike, image_id: str) -> Path:
    """``<out_dir>/<image_id>.npz``."""
    return Path(out_dir) / f"{image_id}{CAM_SUFFIX}"


def find_cam_file(folder: str | os.PathLike, image_id: str) -> Path | None:
    """``<folder>/<image_id>.npz``, else a legacy ``<image_id>.npy``, else None."""
    for suffix in (CAM_SUFFIX, LEGACY_CAM_SUFFIX):
        path = Path(folder) / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def save_cam(path: str | os.PathLike, keys: Any, cam: Any, hr_cam: Any) -> Path:
    """Write a CAM file atomically (see the module docstring for the layout).

    Args:
        path: destination, normally ``cam_path(out_dir, image_id)``; must end with ``.npz``.
        keys: int [n], distinct foreground label-map indices >= 1 (n = 0 for an image without foreground).
        cam: float [n, ceil(H/4), ceil(W/4)] in [0, 1].
        hr_cam: float [n, H, W] in [0, 1].

    Raises:
        ValueError: shapes, key values or map values break the convention (a bug in the producer).
    """
    path = Path(path)
    if path.suffix != CAM_SUFFIX:
        raise ValueError(f"save_cam: CAM files end with {CAM_SUFFIX}, got {path}")
    maps = CamFile(keys=np.asarray(keys), cam=np.asarray(cam, np.float32), hr_cam=np.asarray(hr_cam, np.float32))
    try:
        checked = check_cam(maps, path)  # the readers' contract, checked before anything is written
    except WSSSError as e:
        raise ValueError(f"save_cam: {e}") from e
    keys, cam, hr_cam = checked.keys, checked.cam, checked.hr_cam
    with atomic_write(path) as tmp:
        np.savez(tmp, format_version=np.int64(CAM_FORMAT_VERSION), keys=keys, cam=cam, hr_cam=hr_cam)
    return path


def load_cam(
    path: str | os.PathLike,
    allow_pickle: bool = False,
    with_cam: bool = True,
    *,
    size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    size_of: str = "the image",
) -> CamFile:
    """Read and check a CAM file: the toolkit's ``.npz``, or a legacy pickled ``.npy`` when ``allow_pickle`` is set.

    Every reader (evaluation, pseudo masks, visualisation) goes through here, so every one of them refuses the same
    broken files (see :func:`check_cam`).

    Args:
        path: ``<id>.npz`` or (legacy) ``<id>.npy``.
        allow_pickle: accept the pickled ``.npy`` dicts of IRN and Puzzle-CAM/P-NOC; only for files you trust,
            since unpickling can run code.
        with_cam: also read the stride-4 ``cam`` (evaluation only needs ``hr_cam`` and skips it).
        size: (H, W) the maps must have, when the reader knows the image (or its ground truth).
        num_classes: number of foreground classes C of the dataset; keys must lie in 1..C.
        size_of: what ``size`` comes from, for the message (e.g. ``"the ground truth <path>"``).

    Returns:
        A :class:`CamFile` with keys 1..C and no background plane, whatever layout the file had.

    Raises:
        WSSSError: missing, unreadable, pickled without ``allow_pickle``, wrong format version, or contents that
            break the contract (keys, shapes, values outside [0, 1], another image's size).
    """
    path = Path(path)
    if not path.is_file():
        raise WSSSError(f"CAM file not found: {path}; run CAM inference for this id first")
    if path.suffix == LEGACY_CAM_SUFFIX:
        if not allow_pickle:
            raise WSSSError(
                f"{path} is a legacy pickled .npy CAM file; pass --allow_pickle to read it (only for files you trust)"
            )
        cam_file = _load_legacy_cam(path, with_cam)
    else:
        try:
            with np.load(path, allow_pickle=False) as data:
                cam_file = _cam_from_npz(data, path, with_cam)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise WSSSError(f"cannot read CAM file {path} ({e}); delete it and run CAM inference again") from e
    return check_cam(cam_file, path, size=size, num_classes=num_classes, size_of=size_of)


def check_cam(
    cam_file: CamFile,
    path: str | os.PathLike,
    *,
    size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    size_of: str = "the image",
) -> CamFile:
    """The one check of a loaded CAM file against the contract of the module docstring.

    Keys: 1-D integers, distinct, in 1..C (``num_classes`` when given); ``hr_cam`` [n, H, W] with n = len(keys);
    ``cam`` (when loaded) [n, ceil(H/4), ceil(W/4)]; values finite and within [0, 1] up to the writer's tolerance
    (tiny overshoots are clipped); (H, W) equal to ``size`` when given.

    Returns:
        ``cam_file``, with overshoots within the tolerance clipped.

    Raises:
        WSSSError: naming ``path`` and what is wrong.
    """
    again = "fix the code that wrote it, or run CAM inference again"
    keys = np.asarray(cam_file.keys)
    if keys.ndim != 1 or (keys.size and not np.issubdtype(keys.dtype, np.integer)):
        raise WSSSError(f"{path}: keys must be a 1-D integer array, got {keys.dtype} {keys.shape}; {again}")
    if keys.size and (keys.min() < 1 or len(np.unique(keys)) != len(keys)):
        raise WSSSError(f"{path}: keys {keys.tolist()} must be distinct class indices >= 1 (no background 0); {again}")
    if num_classes is not None and keys.size and keys.max() > num_classes:
        raise WSSSError(
            f"{path}: keys {keys.tolist()} name classes beyond the {num_classes} classes of the dataset; "
            "check --dataset and the CAM folder"
        )
    hr_cam, cam = cam_file.hr_cam, cam_file.cam
    if hr_cam.ndim != 3 or hr_cam.shape[0] != len(keys):
        raise WSSSError(f"{path}: hr_cam {hr_cam.shape} must be [len(keys)={len(keys)}, H, W]; {again}")
    if cam is not None and (cam.ndim != 3 or cam.shape != (len(keys), *strided_size(*hr_cam.shape[1:]))):
        expected = (len(keys), *strided_size(*hr_cam.shape[1:]))
        raise WSSSError(f"{path}: cam {cam.shape} must be {expected} (ceil of hr_cam's size / 4); {again}")
    if size is not None and tuple(hr_cam.shape[1:]) != tuple(size):
        raise WSSSError(
            f"{path}: hr_cam is {hr_cam.shape[1]}x{hr_cam.shape[2]} but {size_of} is {size[0]}x{size[1]}; "
            "the CAMs belong to other images (check --dataset, --domain and the CAM folder)"
        )
    hr_cam = _checked_values(path, "hr_cam", hr_cam)
    cam = None if cam is None else _checked_values(path, "cam", cam)
    return CamFile(keys=keys.astype(np.int64, copy=False), cam=cam, hr_cam=hr_cam)


def _checked_values(path: str | os.PathLike, name: str, maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    if not maps.size:
        return maps
    low, high = float(maps.min()), float(maps.max())  # NaN propagates into min/max
    if not (math.isfinite(low) and math.isfinite(high)):
        raise WSSSError(
            f"{path}: {name} holds NaN or infinite values; CAM values must be finite numbers in [0, 1]; "
            "fix the code that wrote it, or run CAM inference again"
        )
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise WSSSError(
            f"{path}: {name} values lie in [{low:.4g}, {high:.4g}] but CAM values must lie in [0, 1] "
            "(divide each class map by its maximum); fix the code that wrote it, or run CAM inference again"
        )
    return np.clip(maps, 0.0, 1.0) if low < 0 or high > 1 else maps


def _cam_from_npz(data: Any, path: Path, with_cam: bool) -> CamFile:
    global _UNVERSIONED_NOTED
    missing = {"keys", "hr_cam"} - set(data.files)
    if missing:
        raise WSSSError(
            f"{path} is not a CAM file: it has no {' and no '.join(sorted(missing))} "
            f"(a CAM .npz holds keys, cam and hr_cam; see core/artifacts.py); write it again"
        )
    if "format_version" in data.files:
        version = int(data["format_version"])
        if version != CAM_FORMAT_VERSION:
            raise WSSSError(
                f"{path} has CAM format version {version}, this toolkit reads version {CAM_FORMAT_VERSION}; "
                "run CAM inference again with this version"
            )
    elif not _UNVERSIONED_NOTED:
        _UNVERSIONED_NOTED = True  # once per process: a converted folder has thousands of such files
        logger.info(
            "%s has no format_version (written by other code); reading it, and any like it, as CAM format version %d",
            path,
            CAM_FORMAT_VERSION,
        )
    keys = data["keys"]
    hr_cam = data["hr_cam"].astype(np.float32, copy=False)
    cam = data["cam"].astype(np.float32, copy=False) if with_cam and "cam" in data.files else None
    return CamFile(keys=keys, cam=cam, hr_cam=hr_cam)


def _to_numpy(value: Any) -> np.ndarray:
    """numpy array from an array or a (possibly CUDA) torch tensor pickled by the reference code."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _load_legacy_cam(path: Path, with_cam: bool) -> CamFile:
    """Read an IRN (``keys`` 0-based, ``high_res``) or Puzzle-CAM/P-NOC (``keys`` = [0] + fg + 1, ``hr_cam``/``rw``)
    pickled dict."""
    try:
        content = np.load(path, allow_pickle=True)
        data = content.item() if content.dtype == object else None
    except ModuleNotFoundError as e:
        raise WSSSError(f"{path} holds a pickled {e.name} object; install {e.name} to read it") from e
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError) as e:
        raise WSSSError(f"cannot read legacy CAM file {path} ({e}); delete it and produce it again") from e
    if not isinstance(data, dict) or "keys" not in data:
        raise WSSSError(f"{path} is not a CAM dict with 'keys' (PSA-style {{class: map}} files are not supported)")
    irn_layout = "high_res" in data
    full_key = next((k for k in ("hr_cam", "high_res", "rw") if k in data), None)
    if full_key is None:
        raise WSSSError(f"{path} has none of 'hr_cam', 'high_res', 'rw'; it is not a CAM file")
    keys = _to_numpy(data["keys"]).astype(np.int64).reshape(-1)
    hr_cam = _to_numpy(data[full_key]).astype(np.float32)
    cam = _to_numpy(data["cam"]).astype(np.float32) if with_cam and "cam" in data else None
    n = hr_cam.shape[0]
    if len(keys) == n + 1 and keys[0] == 0:
        keys = keys[1:]  # Puzzle-CAM/P-NOC: keys padded with the background slot, no background plane
    elif len(keys) == n and irn_layout:
        keys = keys + 1  # IRN: 0-based foreground indices
    elif len(keys) == n and len(keys) and keys[0] == 0:
        logger.warning("%s carries a background plane; it is dropped (the background is chosen at read time)", path)
        keys, hr_cam = keys[1:], hr_cam[1:]
        if cam is not None and cam.shape[0] == n:
            cam = cam[1:]
    elif len(keys) != n:
        raise WSSSError(
            f"{path}: {len(keys)} keys for {n} maps in '{full_key}'; the file does not follow a known layout"
        )
    return CamFile(keys=keys, cam=cam, hr_cam=hr_cam)


# --------------------------------------------------------------------------------------------------------------------
# Label maps and saliency maps (PNG)
# --------------------------------------------------------------------------------------------------------------------


def _read_png(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise WSSSError(f"{what} not found: {path}")
    try:
        image = Image.open(path)
        image.load()
        return image
    except OSError as e:
        raise WSSSError(f"cannot decode {what} {path} ({e}); delete it and produce it again") from e


def save_label_map(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray | None = None) -> Path:
    """Write a class-index map as a single-channel palette ("P") PNG, atomically.

    Args:
        path: destination ``.png``.
        labels: uint8 [H, W]; 0 = background, 1..C = classes, 255 = ignore/uncertain.
        palette: uint8 [256, 3] colours for viewers (default: the VOC palette of ``core.datasets``); the stored values
            are the indices.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"save_label_map: labels must be [H, W], got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"save_label_map: values must fit uint8, got [{labels.min()}, {labels.max()}]")
        labels = labels.astype(np.uint8)
    if palette is None:
        from core.datasets.base import voc_palette  # lazy: keeps this leaf module free of dataset imports

        palette = voc_palette()
    palette = np.asarray(palette, dtype=np.uint8)
    image = Image.fromarray(np.ascontiguousarray(labels))
    image.putpalette(palette.reshape(-1).tobytes())  # makes the "L" image a "P" image with the same indices
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def load_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel class-index PNG ("P" or "L"): uint8 [H, W], values 0..C and 255."""
    path = Path(path)
    image = _read_png(path, "label map")
    if image.mode not in ("P", "L"):
        if image.mode in ("I", "I;16") and np.asarray(image).max() <= 255:
            return np.asarray(image).astype(np.uint8)
        raise WSSSError(f"{path} is a {image.mode} image; label maps must be single-channel class-index PNGs")
    return np.asarray(image, dtype=np.uint8)


def save_saliency(path: str | os.PathLike, saliency: np.ndarray) -> Path:
    """Write a saliency map as an 8-bit grey PNG (255 = foreground), atomically.

    Args:
        path: destination ``.png``.
        saliency: float [H, W] in [0, 1] (scaled by 255 and rounded) or uint8 [H, W].
    """
    saliency = np.asarray(saliency)
    if saliency.ndim != 2:
        raise ValueError(f"save_saliency: saliency must be [H, W], got shape {saliency.shape}")
    if saliency.dtype != np.uint8:
        if saliency.size and (saliency.min() < 0 or saliency.max() > 1):
            low, high = saliency.min(), saliency.max()
            raise ValueError(f"save_saliency: float saliency must lie in [0, 1], got [{low}, {high}]")
        saliency = np.rint(saliency.astype(np.float64) * 255).astype(np.uint8)
    with atomic_write(path) as tmp:
        Image.fromarray(np.ascontiguousarray(saliency)).save(tmp, format="PNG")
    return Path(path)


SALIENCY_KINDS = ("saliency", "segmentation")


def load_saliency(path: str | os.PathLike, kind: str = "saliency") -> np.ndarray:
    """Read a saliency PNG as float32 [H, W] in [0, 1].

    Args:
        path: the PNG.
        kind: ``saliency``: an 8-bit grey PNG (mode "L", or bilevel "1"), read as ``value / 255``; ``segmentation``:
            a single-channel label map ("P" or "L"), read as 1 where the class is 1..254 and 0 on background (0) and
            ignore (255) (the reference's ``--sal_mode segmentation``).

    Raises:
        WSSSError: missing or undecodable file, or not a single-channel 8-bit image (e.g. RGB); the message names
            the file and says how to convert it.
    """
    path = Path(path)
    if kind not in SALIENCY_KINDS:
        raise ValueError(f"load_saliency: kind must be one of {SALIENCY_KINDS}, got {kind!r}")
    image = _read_png(path, "saliency map")
    if kind == "segmentation":
        if image.mode not in ("P", "L"):
            raise WSSSError(
                f"{path} is a {image.mode} image; read as a segmentation, a saliency map must be a single-channel "
                "label PNG (P or L)"
            )
        labels = np.asarray(image)
        return ((labels != 0) & (labels != 255)).astype(np.float32)
    if image.mode not in ("L", "1"):
        hint = " (a label map: read it with --sal_mode segmentation)" if image.mode == "P" else ""
        raise WSSSError(
            f"{path} is a {image.mode} image, but saliency maps must be single-channel 8-bit grey PNGs (mode L, "
            f"255 = foreground){hint}; convert it, e.g. PIL Image.open(p).convert('L').save(p)"
        )
    values = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float32)
    return values / np.float32(255.0)
