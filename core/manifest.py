"""Provenance manifests: every output folder records which script, code, flags and inputs made it.

``<folder>/manifest.json`` (JSON, written atomically by rank 0)::

    {
      "manifest_version": 1,
      "id": "3f2a9c0d4e1b7a65",             # hash of script + identity flags + input identities
      "stage": "cam", "script": "scripts/cam/inference.py", "git_commit": "6f9bf7b...[+dirty]",
      "flags": {...},                        # every flag, as parsed
      "identity_flags": [...],               # the flags that decide the content (compared on a rerun)
      "inputs": {"weights": {"path", "bytes", "sha256"}, "cams": {"path", "manifest_id", "complete"}, ...},
      "counts": {"written": 1464, "skipped": 0},
      "started": "2026-12-02T04:41:07Z", "finished": "2026-12-02T04:59:30Z" | null, "complete": true | false
    }

A rerun into the same folder computes the same record: when its ``id`` matches, the stage resumes; when it
differs, :func:`check_folder` refuses with one line saying what changed, and ``--overwrite true`` empties the
folder's own files first (sub-folders, e.g. pseudo masks derived from a CAM folder, keep their own manifests,
which then no longer match their input and refuse in turn). A downstream stage records its input folder's ``id``,
so a chain of folders tells which weights made every file.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.artifacts import write_json
from core.errors import WSSSError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Flags that change how a stage runs, not what it writes: never compared on a rerun.
OPERATIONAL_FLAGS = frozenset(
    {
        "num_workers",
        "device",
        "overwrite",
        "resume",
        "print_ratio",
        "wandb",
        "json",
        "validate",
        "validate_max_steps",
        "validate_thresholds",
        "validate_priors",
        "trust_checkpoint",
        "allow_pickle",
    }
)
_HASH_CHUNK = 1 << 22
_SHOWN_CHANGES = 3


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string, to the second."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the code that runs (``<sha>+dirty`` with uncommitted changes to tracked files), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file (weights, lists); the content hash is what identifies it."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def folder_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "manifest_id", "complete"}`` of an input folder; the id is None for a folder without manifest
    (e.g. CAMs converted from another code base), which is then identified by its path."""
    path = Path(path)
    manifest = read_manifest(path)
    return {
        "path": str(path),
        "manifest_id": manifest.get("id") if manifest else None,
        "complete": manifest.get("complete") if manifest else None,
    }


def _identity_of(value: Any) -> Any:
    # What decides an input's content: a hash for files, the upstream manifest id (else the path) for folders.
    if isinstance(value, Mapping):
        if "sha256" in value:
            return value["sha256"]
        if "manifest_id" in value:
            return value["manifest_id"] or value["path"]
        return {k: _identity_of(v) for k, v in sorted(value.items())}
    return value


@dataclass
class Provenance:
    """What made (or is about to make) an output folder.

    Attributes:
        stage: ``cam``, ``ccam``, ``rw``, ``seg`` or ``eval``.
        script: path of the script relative to the repository, e.g. ``scripts/cam/inference.py``.
        flags: every parsed flag (plain JSON values).
        inputs: name -> :func:`file_fingerprint`, :func:`folder_fingerprint` or a plain JSON description; they
            decide the content (part of the id).
        context: recorded but not compared (e.g. the dataset folder and how many ids it lists).
        ignore: flags besides :data:`OPERATIONAL_FLAGS` that do not decide the content (e.g. the output path).
    """

    stage: str
    script: str
    flags: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    ignore: frozenset[str] = frozenset()

    @property
    def identity_flags(self) -> dict[str, Any]:
        skip = OPERATIONAL_FLAGS | self.ignore
        return {k: v for k, v in sorted(self.flags.items()) if k not in skip}

    @property
    def id(self) -> str:
        """16 hex digits identifying the content: same script, identity flags and inputs -> same id."""
        identity = {
            "script": self.script,
            "flags": self.identity_flags,
            "inputs": {k: _identity_of(v) for k, v in sorted(self.inputs.items())},
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def record(
        self,
        started: str,
        counts: Mapping[str, Any] | None = None,
        finished: str | None = None,
        outputs: Mapping[str, Any] | None = None,
    ) -> dict:
        """The manifest dict of this provenance (``finished`` None while the stage runs)."""
        return {
            "manifest_version": MANIFEST_VERSION,
            "id": self.id,
            "stage": self.stage,
            "script": self.script,
            "git_commit": git_commit(),
            "flags": self.flags,
            "identity_flags": sorted(self.identity_flags),
            "inputs": self.inputs,
            "context": self.context,
            "counts": dict(counts or {}),
            "outputs": dict(outputs or {}),
            "started": started,
            "finished": finished,
            "complete": finished is not None,
        }


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none; WSSSError when it cannot be read."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WSSSError(f"cannot read {path} ({e}); delete the folder's outputs or rerun with --overwrite true") from e
    if not isinstance(manifest, dict) or "id" not in manifest:
        raise WSSSError(f"{path} is not a manifest of this toolkit; rerun with --overwrite true to rebuild the folder")
    return manifest


def describe_changes(old: Mapping[str, Any], new: Provenance) -> str:
    """``"--scales 0.5,1.0 -> 1.0; input weights changed"``: what differs between a manifest and a provenance."""
    changes = []
    old_flags = old.get("flags", {})
    for name, value in new.identity_flags.items():
        if name in old_flags and old_flags[name] != value:
            changes.append(f"--{name} {_short(old_flags[name])} -> {_short(value)}")
    if old.get("script") != new.script:
        changes.append(f"script {old.get('script')} -> {new.script}")
    old_inputs = old.get("inputs", {})
    for name in sorted(set(old_inputs) | set(new.inputs)):
        if _identity_of(old_inputs.get(name)) != _identity_of(new.inputs.get(name)):
            changes.append(f"input {name} changed")
    if not changes:
        changes.append("flags added or removed")
    shown = changes[:_SHOWN_CHANGES] + (
        [f"{len(changes) - _SHOWN_CHANGES} more"] if len(changes) > _SHOWN_CHANGES else []
    )
    return "; ".join(shown)


def _short(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_folder(
    folder: Path, provenance: Provenance, overwrite: bool, outputs: Iterable[Path] = (), remove: bool = True
) -> bool:
    """Decide what to do with an output folder before a stage writes into it.

    Args:
        folder: the stage's output folder (may not exist).
        provenance: what this run would record.
        overwrite: ``--overwrite true``: empty the folder's own files and start again.
        outputs: files already in the folder that belong to the stage (checked when there is no manifest).
        remove: whether this process deletes the files on ``overwrite`` (rank 0 only under torchrun).

    Returns:
        True when earlier outputs of the same provenance are kept and the stage resumes.

    Raises:
        WSSSError: the folder holds outputs of other flags or inputs (or of unknown origin) and
            ``overwrite`` is off.
    """
    if overwrite:
        if remove:
            empty_folder_files(folder)
        return False
    manifest = read_manifest(folder)
    if manifest is None:
        existing = [p for p in outputs if p.is_file()]
        if existing:
            raise WSSSError(
                f"{folder} holds {len(existing)} outputs but no {MANIFEST_NAME}, so where they came from is unknown; "
                "rerun with --overwrite true to rebuild it, or choose another output folder"
            )
        return False
    if manifest["id"] == provenance.id:
        return True
    raise WSSSError(
        f"{folder} was made with other settings ({describe_changes(manifest, provenance)}); "
        "rerun with --overwrite true to empty it and start again, or choose another output folder"
    )


def empty_folder_files(folder: Path) -> int:
    """Delete the files directly in ``folder`` (not its sub-folders); returns how many were removed."""
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        if entry.is_file() or entry.is_symlink():
            entry.unlink()
            removed += 1
    if removed:
        logger.info("--overwrite: removed %d files from %s", removed, folder)
    return removed


def write_manifest(folder: Path, record: Mapping[str, Any]) -> Path:
    """Write ``<folder>/manifest.json`` atomically (call on rank 0)."""
    return write_json(Path(folder) / MANIFEST_NAME, dict(record))


def summary_line(manifest: Mapping[str, Any]) -> str:
    """One line for reports: which script and weights made a folder, with which flags, finished or not."""
    inputs = manifest.get("inputs", {})
    weights = inputs.get("weights")
    source = ""
    if isinstance(weights, Mapping):
        source = f" from {weights.get('path')} (sha256 {str(weights.get('sha256', ''))[:12]})"
    upstream = [
        f"{name} {value.get('manifest_id')}"
        for name, value in inputs.items()
        if isinstance(value, Mapping) and value.get("manifest_id")
    ]
    counts = manifest.get("counts", {})
    state = "complete" if manifest.get("complete") else "INCOMPLETE"
    return (
        f"{manifest.get('script')}{source}"
        + (f", inputs {', '.join(upstream)}" if upstream else "")
        + f", commit {str(manifest.get('git_commit'))[:12]}, {counts.get('written', 0)} written, {state} "
        f"(manifest {manifest.get('id')})"
    )
