"""Run logging: console + per-run log file, ``metrics.jsonl``, ``args.json`` and optional Weights & Biases.

Only rank 0 prints INFO to the console; every rank writes its own file (``log.txt``, ``log.txt.rank<N>``), so a
failure on rank 3 is not lost. W&B is used only when asked for (``--wandb true`` or ``WANDB_PROJECT`` set), is
imported lazily, and a failing ``wandb.init`` only logs a warning: training never depends on it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.artifacts import atomic_write, write_json

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
_HANDLER_MARK = "_wsss_runlog"


def setup_logging(log_dir: Path | None, rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the root logger for one run; safe to call again (the handlers of an earlier call are replaced).

    Args:
        log_dir: folder for ``log.txt`` (rank 0) or ``log.txt.rank<N>``; None for console only.
        rank: global rank; ranks other than 0 print only warnings and errors to the console.
        level: level of the run's own messages.
    """
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter(LOG_FORMAT, datefmt=DATE_FORMAT)
    console_level = level if rank == 0 else logging.WARNING
    foreign_console = [
        h
        for h in root.handlers
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
    ]
    if not foreign_console:
        _add(root, logging.StreamHandler(sys.stdout), formatter, console_level)
    elif rank != 0:
        # cli.run's basicConfig already prints: keep it, but only warnings and errors from ranks other than 0.
        for handler in foreign_console:
            handler.setLevel(console_level)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        _add(root, logging.FileHandler(log_dir / name, encoding="utf-8"), formatter, level)


def _add(root: logging.Logger, handler: logging.Handler, formatter: logging.Formatter, level: int) -> None:
    handler.setFormatter(formatter)
    handler.setLevel(level)
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)


def close_logging() -> None:
    """Detach and close the file handlers added by :func:`setup_logging` (end of a run, tests)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as text
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _json_safe(value.item())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (on rank 0; other ranks hold a disabled writer).

    An append-only log rather than an atomically replaced file: each line is flushed as one write, so an
    interrupted run leaves complete lines, and a resumed run continues the same file.
    """

    def __init__(self, path: Path | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled and path is not None
        if self.enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(_json_safe(dict(record)), sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def drop_after(self, step: int) -> int:
        """Remove the records of steps after ``step`` (a resumed run replays them) and any torn last line.

        Called when a run resumes from a checkpoint taken at ``step``: the rows the killed run logged after that
        checkpoint would otherwise appear twice. Returns the number of lines removed.
        """
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = None  # a line cut short by the kill
            if record is None or (isinstance(record.get("step"), int) and record["step"] > step):
                dropped += bool(line.strip())
                continue
            kept.append(line)
        if dropped:
            with atomic_write(self.path) as tmp:
                tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            logger.info("%s: dropped %d line(s) logged after the checkpoint of step %d", self.path, dropped, step)
        return dropped


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_args(path: Path, args: Mapping[str, Any]) -> Path:
    """Write the resolved arguments as pretty JSON, atomically."""
    return write_json(path, dict(sorted(args.items())))


def wandb_requested(flag: bool | None) -> bool:
    """``--wandb true``, or ``WANDB_PROJECT`` set and ``--wandb`` unset; never with ``WANDB_MODE=disabled``."""
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return False
    if flag is not None:
        return bool(flag)
    return bool(os.environ.get("WANDB_PROJECT"))


class WandbLogger:
    """Thin optional W&B run: every method is a no-op when disabled or when ``wandb`` failed to start."""

    def __init__(self, enabled: bool, name: str, job_type: str, config: Mapping[str, Any]) -> None:
        self.run = None
        if not enabled:
            return
        try:
            import wandb  # optional dependency, imported only when asked for

            mode = "offline" if os.environ.get("WANDB_MODE", "").lower() == "offline" else None
            self.run = wandb.init(
                name=name,
                job_type=job_type,
                config=_json_safe(dict(config)),
                project=os.environ.get("WANDB_PROJECT"),
                group=os.environ.get("WANDB_RUN_GROUP"),
                tags=[t for t in os.environ.get("WANDB_TAGS", "").split(",") if t] or None,
                mode=mode,
            )
        except Exception as e:  # noqa: BLE001  (no login, no network, not installed: all non-fatal)
            logger.warning("W&B disabled: wandb.init failed (%s: %s)", type(e).__name__, e)
            self.run = None

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(_json_safe(dict(values)), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = _json_safe(value)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
