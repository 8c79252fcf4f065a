"""The experiments folder: where every stage reads and writes, and the naming rules of its folders.

Layout (relative to the working directory; runners set it with ``WORK_DIR``)::

    experiments/models/<tag>.pth                     final weights of a training run (what later stages load)
    experiments/models/<tag>/                        its run folder: last.pth, args.json, log.txt, metrics.jsonl,
                                                     manifest.json
    experiments/predictions/<tag>@<domain>@...       per-image outputs of a stage (CAMs, saliency maps, masks),
                                                     with their manifest.json
    experiments/results/                             tables and reports (runners, tools/summarize_results.py)

A tag may contain ``/`` (``pnoc/voc12-rs269``): it names a path below ``models/`` and ``predictions/``. The
reference re-derived these rules in every stage; here they live once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from core.errors import WSSSError

EXPERIMENTS_DIR = Path("experiments")
MODELS_DIR = EXPERIMENTS_DIR / "models"
PREDICTIONS_DIR = EXPERIMENTS_DIR / "predictions"
RESULTS_DIR = EXPERIMENTS_DIR / "results"
CHECKPOINT_NAME = "last.pth"
WEIGHTS_SUFFIX = ".pth"


def check_tag(tag: str | None) -> str:
    """The tag itself if it can name a folder below ``experiments/``, else a WSSSError saying why not."""
    if not tag or not str(tag).strip():
        raise WSSSError("--tag is required: it names the run folder experiments/models/<tag>/")
    parts = Path(tag).parts
    if tag.startswith("/") or ".." in parts or tag.endswith(WEIGHTS_SUFFIX):
        raise WSSSError(
            f"--tag {tag!r} must be a relative name such as pnoc/voc12-rs269 (no leading '/', no '..', no .pth)"
        )
    if tag.endswith("/") or any(part.startswith(".") for part in parts):
        raise WSSSError(
            f"--tag {tag!r} must not end with '/' or have a part starting with '.' (it would name a hidden file)"
        )
    return tag


def run_dir(tag: str, root: str | Path = MODELS_DIR) -> Path:
    """Folder of a training run's state and logs: ``<root>/<tag>/``."""
    return Path(root) / check_tag(tag)


def final_weights_path(tag: str, root: str | Path = MODELS_DIR) -> Path:
    """Final weights of a run: ``<root>/<tag>.pth`` (the only place the extension is added)."""
    return Path(root) / f"{check_tag(tag)}{WEIGHTS_SUFFIX}"


def checkpoint_path(tag: str, root: str | Path = MODELS_DIR) -> Path:
    """Full resumable state of a run: ``<root>/<tag>/last.pth``."""
    return run_dir(tag, root) / CHECKPOINT_NAME


def weights_path(name: str, root: str | Path = MODELS_DIR) -> Path:
    """A ``.pth`` path as given, else the final weights of the run tagged ``name``."""
    return Path(name) if str(name).endswith(WEIGHTS_SUFFIX) else final_weights_path(name, root)


def existing_weights_path(name: str, train_hint: str) -> Path:
    """:func:`weights_path` that must exist; the error says ``train_hint`` (how to train them) or to fix --weights."""
    path = weights_path(name)
    if not path.is_file():
        raise WSSSError(f"weights {path} not found; {train_hint} or pass --weights TAG_OR_PTH")
    return path


def format_scales(scales: Sequence[float]) -> str:
    """``[0.5, 1, 1.5, 2]`` -> ``"0.5,1.0,1.5,2.0"`` (the spelling of the reference's folder names)."""
    return ",".join(str(float(s)) for s in scales)


def domain_name(domain: str) -> str:
    """The domain as it appears in folder names: the list's stem when ``--domain`` is a ``.txt`` path."""
    return Path(domain).stem if domain.endswith(".txt") else domain


def predictions_dir(tag: str, domain: str, scales: Sequence[float], root: str | Path = PREDICTIONS_DIR) -> Path:
    """``<root>/<tag>@<domain>@scale=<scales>/``, e.g. ``experiments/predictions/pnoc@train_aug@scale=0.5,1.0``.

    The full domain name is used, so ``train`` and ``train_aug`` (or ``val`` and ``test``) never share a folder
    (the reference folded every domain into ``train``/``val``, SPEC §13.2.12).
    """
    return Path(root) / f"{check_tag(tag)}@{domain_name(domain)}@scale={format_scales(scales)}"


def derived_dir(folder: str | Path, *settings: str) -> Path:
    """``<folder>@<setting>@...`` next to ``folder``: a stage's output made from a predictions folder, with the
    settings that decide it in its name (the reference's ``<experiment_name>@t=0.2@crf=10``), e.g.
    ``derived_dir("p/ccamh@train@scale=1.0", "t=0.2", "crf=10")`` -> ``p/ccamh@train@scale=1.0@t=0.2@crf=10``.
    """
    folder = Path(folder)
    if not folder.name:
        raise WSSSError(f"cannot name an output next to {folder}; give the predictions folder itself")
    return folder.with_name("@".join([folder.name, *settings]))


def named_predictions_dir(experiment_name: str | None, pred_dir: str | None, what: str = "predictions") -> Path:
    """``pred_dir`` if given, else ``experiments/predictions/<experiment_name>``; WSSSError when neither is."""
    if pred_dir:
        return Path(pred_dir)
    if experiment_name:
        return PREDICTIONS_DIR / experiment_name
    raise WSSSError(f"no {what} given; pass --experiment_name NAME or --pred_dir DIR")


def existing_predictions_dir(experiment_name: str | None, pred_dir: str | None, what: str, producer: str) -> Path:
    """:func:`named_predictions_dir` that must exist; the error names ``producer``, the script that writes it."""
    folder = named_predictions_dir(experiment_name, pred_dir, what=what)
    if not folder.is_dir():
        raise WSSSError(f"{what} {folder} does not exist; run {producer} first or fix --pred_dir")
    return folder


def evaluation_dir(pred_dir: str | Path, root: str | Path = RESULTS_DIR) -> Path:
    """Where ``scripts/evaluate.py`` logs its reports of ``pred_dir``: ``<root>/eval/<pred_dir below predictions/>``
    (or the folder's name when it lies elsewhere)."""
    pred_dir = Path(pred_dir)
    try:
        name = pred_dir.resolve().relative_to(PREDICTIONS_DIR.resolve())
    except ValueError:
        name = Path(pred_dir.resolve().name)
    return Path(root) / "eval" / name
