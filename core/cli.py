"""Command-line pieces shared by every script: flag spellings, strict booleans, the dataset flags, the entry point.

Flag names follow the P-NOC reference (``--batch_size``, ``--data_dir``, ``--oc-pretrained``) so its published
command lines run unchanged; :func:`add_arg` also accepts the other spelling (``--batch-size``).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from core.errors import WSSSError
from core.parallel import default_num_workers
from core.paths import PREDICTIONS_DIR

DATASETS = ("voc12", "coco14", "custom")


def str2bool(value: str | bool) -> bool:
    """Parse ``true``/``false`` (also ``1/0``, ``yes/no``) strictly, as the reference's boolean flags do."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _number(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return number


def _items(value: str, what: str) -> list[str]:
    items = [v.strip() for v in str(value).split(",")]
    if not any(items) or not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what} without empty items, got {value!r}")
    return items


def float_list(value: str) -> list[float]:
    """Parse a comma-separated list of finite numbers such as ``0.5,1.0,1.5,2.0``; an empty item is an error."""
    try:
        return [_number(v) for v in _items(value, "numbers")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {value!r}") from e


def str_list(value: str) -> list[str]:
    """Parse a comma-separated list of words such as ``a,b``; an empty item (``a,,b``) is an error."""
    return _items(value, "words")


def positive_int(value: str) -> int:
    """Parse a whole number >= 1 (epochs, image sizes)."""
    try:
        number = int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from e
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return number


def positive_float(value: str) -> float:
    """Parse a finite number > 0 (a Beta parameter, a spectrum decay)."""
    try:
        number = _number(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}") from e
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value!r}")
    return number


def nonnegative_float(value: str) -> float:
    """Parse a finite number >= 0 (a loss weight)."""
    try:
        number = _number(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from e
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return number


def unit_float(value: str) -> float:
    """Parse a CAM threshold: a number in [0, 1] (CAMs are normalised to [0, 1]; NaN is refused)."""
    try:
        number = float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a CAM threshold in [0, 1], got {value!r}") from e
    if not 0.0 <= number <= 1.0:  # also false for NaN
        raise argparse.ArgumentTypeError(f"CAM thresholds lie in [0, 1] (CAMs are normalised), got {value!r}")
    return number


def open_unit_float(value: str) -> float:
    """Parse a threshold strictly between 0 and 1 (e.g. C²AM-H's ``--fg_threshold``: 0 or 1 would make every pixel,
    or none, a hint)."""
    try:
        number = float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}") from e
    if not 0.0 < number < 1.0:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value!r}")
    return number


def unit_float_list(value: str) -> list[float]:
    """Parse a comma-separated list of CAM thresholds, each in [0, 1]."""
    return [unit_float(v) for v in _items(value, "thresholds")]


def optional_float(value: str) -> float | None:
    """Parse a number, or ``none`` / ``0`` / empty as None (an off switch, e.g. ``--max_grad_norm none``)."""
    if str(value).strip().lower() in ("none", "", "0", "0.0"):
        return None
    try:
        return float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {value!r}") from e


def optional_int(value: str) -> int | None:
    """Parse an integer, or ``none`` / ``all`` / empty as None (no limit)."""
    if str(value).strip().lower() in ("none", "", "all"):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {value!r}") from e


def add_arg(parser: argparse.ArgumentParser | Any, name: str, *aliases: str, **kwargs: Any) -> argparse.Action:
    """Add a flag under its reference spelling and its twin with ``_``/``-`` swapped.

    ``add_arg(p, "--batch_size", type=int, default=32, help=...)`` accepts ``--batch_size`` and
    ``--batch-size`` and stores ``args.batch_size``.
    """
    twin = name.replace("_", "-") if "_" in name else name[:2] + name[2:].replace("-", "_")
    names = [name] + ([twin] if twin != name else []) + list(aliases)
    kwargs.setdefault("dest", name.lstrip("-").replace("-", "_"))
    return parser.add_argument(*names, **kwargs)


def add_bool_arg(parser: argparse.ArgumentParser | Any, name: str, default: bool, help: str) -> argparse.Action:
    """A ``--flag true|false`` option (the reference's style); a bare ``--flag`` means true."""
    return add_arg(parser, name, type=str2bool, nargs="?", const=True, default=default, metavar="true|false", help=help)


def add_overwrite_arg(parser: argparse.ArgumentParser | Any) -> argparse.Action:
    """``--overwrite true``: empty the output folder's files and start again, when its manifest records other
    flags or inputs (without it such a rerun refuses; with the same ones it resumes)."""
    return add_bool_arg(
        parser,
        "--overwrite",
        False,
        "empty the output folder first; needed when its manifest.json records other flags or inputs "
        "(a rerun with the same ones resumes)",
    )


def add_dataset_args(parser: argparse.ArgumentParser, domain: str = "train") -> argparse._ArgumentGroup:
    """``--dataset``, ``--data_dir``, ``--domain`` and the custom-dataset overrides, in one group."""
    group = parser.add_argument_group("dataset")
    add_arg(group, "--dataset", type=str, default="voc12", choices=DATASETS, help="dataset layout to read")
    add_arg(
        group,
        "--data_dir",
        type=str,
        default=os.environ.get("WSSS_DATA_DIR"),
        help="dataset root: .../VOCdevkit/VOC2012, .../coco14 or a custom root (default: $WSSS_DATA_DIR)",
    )
    add_arg(
        group,
        "--domain",
        type=str,
        default=domain,
        help=f"id list to use, e.g. train, train_aug, val (default {domain})",
    )
    add_arg(
        group, "--images_dir", type=str, default=None, help="custom dataset: images folder (default <data_dir>/images)"
    )
    add_arg(
        group, "--masks_dir", type=str, default=None, help="custom dataset: masks folder (default <data_dir>/masks)"
    )
    add_arg(
        group,
        "--class_names",
        type=str,
        default=None,
        help="custom dataset: class-names file (default <data_dir>/classes.txt)",
    )
    return group


def add_run_weights_args(group: Any, weights_help: str, *weights_aliases: str) -> None:
    """``--tag`` (names the output folder), ``--weights`` (default: the tag's) and ``--trust_checkpoint``."""
    add_arg(group, "--tag", type=str, required=True, help="run name; names the output folder")
    add_arg(group, "--weights", *weights_aliases, type=str, default=None, help=weights_help)
    add_bool_arg(group, "--trust_checkpoint", False, "allow full unpickling of legacy .pth files (trusted only)")


def add_cam_folder_args(parser: argparse.ArgumentParser, what: str, producer: str) -> argparse._ArgumentGroup:
    """The "cams" group of a stage reading a CAM folder: ``--experiment_name``, ``--pred_dir``, ``--allow_pickle``."""
    group = parser.add_argument_group("cams")
    add_arg(
        group,
        "--experiment_name",
        type=str,
        default=None,
        help=f"{what} {PREDICTIONS_DIR}/<name> (as written by {producer})",
    )
    add_arg(group, "--pred_dir", type=str, default=None, help="CAM folder (overrides --experiment_name)")
    add_bool_arg(group, "--allow_pickle", False, "read legacy pickled .npy CAM files (trusted files only)")
    return group


def add_pool_output_args(parser: argparse.ArgumentParser, output_help: str) -> argparse._ArgumentGroup:
    """The "output" group of a stage that writes in a worker pool: ``--output``, ``--overwrite``, ``--num_workers``."""
    group = parser.add_argument_group("output")
    add_arg(group, "--output", type=str, default=None, help=output_help)
    add_overwrite_arg(group)
    add_arg(group, "--num_workers", type=int, default=default_num_workers(), help="processes (default min(8, CPUs))")
    return group


def run(
    main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> Any:
    """Parse arguments, run ``main`` and turn a :class:`WSSSError` into one ``error:`` line and exit status 2."""
    args = parser.parse_args(argv)
    skip_the_collection_at_exit()
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    try:
        return main(args)
    except WSSSError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished files are kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


def skip_the_collection_at_exit() -> None:
    """Freeze the garbage collector's objects at interpreter exit (an exit hook, registered once).

    At shutdown Python runs full collections over every object still alive; with torch and torchvision loaded that
    is about 0.9 s per process (a process holding two ResNet-50s exits in 0.24 s instead of 1.13 s), and it frees
    nothing the operating system does not reclaim anyway. Objects keep being freed by reference counting; only
    finalizers of reference cycles still alive at exit are skipped, and the toolkit closes its files, loggers and
    W&B run explicitly before that.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
