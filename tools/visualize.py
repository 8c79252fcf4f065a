"""Draw a grid PNG to inspect CAMs and pseudo masks: one row per image, one column per view.

Columns: the image; the ground truth (palette colours, 255 = white, grey when the id has none); the CAM overlay (max
over the file's class maps, i.e. the GT classes, as a jet heatmap blended on the image); the pseudo mask from
``--mask_dir`` (repeat it for several label folders side by side, e.g. pseudo masks and a segmentation model's
predictions, titled by ``--mask_title``), or else the CAMs thresholded at ``--threshold``; with ``--per_class true``
one more overlay per class.
Every cell is ``--cell_size`` pixels square (image letterboxed); a header row names the columns.

Reads:  the images and GT masks of --domain; <cam_dir>/<id>.npz (legacy .npy with --allow_pickle); <mask_dir>/<id>.png
Writes: --out (default experiments/images/<cam or mask folder name>@<domain>.png), written atomically
Example:
    python tools/visualize.py --dataset voc12 --data_dir $WSSS_DATA_DIR --domain train --num 8 \\
        --cam_dir "experiments/predictions/pnoc@train@scale=0.5,1.0,1.5,2.0" --per_class true
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core import cli
from core.artifacts import (
    CAM_SUFFIX,
    LEGACY_CAM_SUFFIX,
    PNG_SUFFIX,
    atomic_write,
    check_writable,
    load_cam,
    load_label_map,
)
from core.datasets import source_from_args
from core.errors import WSSSError
from core.labels import IGNORE_INDEX, cams_to_label_map

logger = logging.getLogger(__name__)

IMAGES_DIR = Path("experiments") / "images"
HEADER_HEIGHT = 20
BACKGROUND = 255  # white padding around letterboxed cells
MISSING_GREY = 200


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("visualize", description=__doc__.splitlines()[0], add_help=add_help)
    cli.add_dataset_args(parser, domain="train")
    group = parser.add_argument_group("what to draw")
    cli.add_arg(
        group, "--ids", type=cli.str_list, default=None, help="comma-separated image ids (default: --num first)"
    )
    cli.add_arg(group, "--num", type=int, default=8, help="number of first ids of --domain when --ids is not given")
    cli.add_arg(group, "--cam_dir", type=str, default=None, help="folder of <id>.npz CAM files")
    cli.add_arg(
        group,
        "--mask_dir",
        type=str,
        action="append",
        default=None,
        help="folder of <id>.png label maps (optional; repeat for more columns)",
    )
    cli.add_arg(
        group,
        "--mask_title",
        type=str,
        action="append",
        default=None,
        help="column title of each --mask_dir, in order (default: 'pseudo mask', or the folder names when several)",
    )
    cli.add_arg(group, "--threshold", type=cli.unit_float, default=0.25, help="background threshold without --mask_dir")
    cli.add_bool_arg(group, "--per_class", False, "add one CAM overlay column per class of the image")
    cli.add_bool_arg(group, "--allow_pickle", False, "read legacy pickled .npy CAM files (trusted files only)")
    group = parser.add_argument_group("output")
    cli.add_arg(group, "--cell_size", type=int, default=192, help="side of every grid cell in pixels (default 192)")
    cli.add_arg(group, "--alpha", type=float, default=0.5, help="heatmap weight in the CAM overlay (default 0.5)")
    cli.add_arg(group, "--out", type=str, default=None, help="output PNG (default experiments/images/<name>.png)")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------------


def colorize_labels(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 [H, W] class ids -> uint8 [H, W, 3] RGB palette colours, with 255 (ignore) drawn white."""
    colours = np.asarray(palette, dtype=np.uint8).copy()
    colours[IGNORE_INDEX] = 255
    return colours[labels]


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet heatmap of ``cam`` (float [H, W] in [0, 1]) on ``image`` (uint8 [H, W, 3]): uint8 [H, W, 3]."""
    levels = np.clip(np.rint(cam * 255.0), 0, 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)


def fit_cell(rgb: np.ndarray, cell: int, nearest: bool = False) -> np.ndarray:
    """Letterbox uint8 [H, W, 3] into a white ``cell x cell`` square (aspect kept, centred)."""
    height, width = rgb.shape[:2]
    scale = cell / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    canvas = np.full((cell, cell, 3), BACKGROUND, dtype=np.uint8)
    top, left = (cell - new_h) // 2, (cell - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def put_text(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.4) -> np.ndarray:
    """Write ``text`` in white with a black outline (readable on any colour), in place; returns ``canvas``."""
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return canvas


def placeholder(cell: int, text: str) -> np.ndarray:
    """A grey cell saying why there is nothing to show."""
    return put_text(np.full((cell, cell, 3), MISSING_GREY, dtype=np.uint8), text, (6, cell // 2))


def header_row(titles: list[str], cell: int) -> np.ndarray:
    """uint8 [HEADER_HEIGHT, len(titles) * cell, 3] with one title per column."""
    row = np.full((HEADER_HEIGHT, len(titles) * cell, 3), 40, dtype=np.uint8)
    for index, title in enumerate(titles):
        put_text(row, title, (index * cell + 4, HEADER_HEIGHT - 6))
    return row


# --------------------------------------------------------------------------------------------------------------------
# One row per image
# --------------------------------------------------------------------------------------------------------------------


def find_cam_file(cam_dir: Path, image_id: str) -> Path | None:
    for suffix in (CAM_SUFFIX, LEGACY_CAM_SUFFIX):
        if (cam_dir / f"{image_id}{suffix}").is_file():
            return cam_dir / f"{image_id}{suffix}"
    return None


def image_row(args: argparse.Namespace, source: Any, image_id: str, class_columns: int) -> list[np.ndarray]:
    """The cells of one image, in column order (see the module docstring)."""
    cell, palette = args.cell_size, source.palette
    image = source.read_image(image_id)
    cells = [put_text(fit_cell(image, cell), image_id, (4, cell - 6))]
    if source.mask_path(image_id) is None:
        cells.append(placeholder(cell, "no ground truth"))
    else:
        cells.append(fit_cell(colorize_labels(source.read_mask(image_id), palette), cell, nearest=True))
    cams = None
    if args.cam_dir:
        path = find_cam_file(Path(args.cam_dir), image_id)
        cams = None
        if path is not None:
            cams = load_cam(
                path,
                allow_pickle=args.allow_pickle,
                with_cam=False,
                size=image.shape[:2],
                num_classes=source.num_classes,
                size_of=f"image {image_id}",
            )
        if cams is None:
            cells.append(placeholder(cell, "no CAM file"))
        else:
            peak = cams.hr_cam.max(axis=0) if cams.keys.size else np.zeros(image.shape[:2], np.float32)
            cells.append(fit_cell(cam_overlay(image, peak, args.alpha), cell))
    for mask_dir in args.mask_dir or []:
        mask_path = Path(mask_dir) / f"{image_id}{PNG_SUFFIX}"
        mask = load_label_map(mask_path) if mask_path.is_file() else None
        cells.append(
            placeholder(cell, "no mask file")
            if mask is None
            else fit_cell(colorize_labels(mask, palette), cell, nearest=True)
        )
    if not args.mask_dir and cams is not None:
        labels = cams_to_label_map(cams.hr_cam, cams.keys, args.threshold)
        cells.append(fit_cell(colorize_labels(labels, palette), cell, nearest=True))
    elif not args.mask_dir and args.cam_dir:
        cells.append(placeholder(cell, "no CAM file"))
    for index in range(class_columns):
        if cams is None or index >= cams.keys.size:
            cells.append(np.full((cell, cell, 3), BACKGROUND, dtype=np.uint8))
            continue
        overlay = fit_cell(cam_overlay(image, cams.hr_cam[index], args.alpha), cell)
        cells.append(put_text(overlay, source.classes[int(cams.keys[index])], (4, cell - 6)))
    return cells


def column_titles(args: argparse.Namespace, class_columns: int) -> list[str]:
    titles = ["image", "ground truth"]
    if args.cam_dir:
        titles.append("CAM (max)")
    titles += mask_titles(args) if args.mask_dir else [f"CAM > {args.threshold:g}"]
    return titles + [f"class CAM {i + 1}" for i in range(class_columns)]


def mask_titles(args: argparse.Namespace) -> list[str]:
    """One title per ``--mask_dir``: ``--mask_title`` when given, else 'pseudo mask' for one folder or the names."""
    if args.mask_title:
        return list(args.mask_title)
    return ["pseudo mask"] if len(args.mask_dir) == 1 else [Path(folder).name[:24] for folder in args.mask_dir]


def count_class_columns(args: argparse.Namespace, ids: list[str]) -> int:
    """Most classes of any drawn image (per-class columns), 0 without ``--per_class``."""
    if not (args.per_class and args.cam_dir):
        return 0
    paths = [find_cam_file(Path(args.cam_dir), i) for i in ids]
    return max([load_cam(p, allow_pickle=args.allow_pickle, with_cam=False).keys.size for p in paths if p] + [0])


def select_ids(args: argparse.Namespace, source: Any) -> list[str]:
    if args.ids:
        known = set(source.ids)
        unknown = [i for i in args.ids if i not in known]
        if unknown:
            raise WSSSError(f"ids {', '.join(unknown[:3])} are not in the id list of --domain {args.domain}")
        return list(args.ids)
    if args.num < 1:
        raise WSSSError(f"--num must be at least 1, got {args.num}")
    return list(source.ids[: args.num])


def default_out(args: argparse.Namespace) -> Path:
    folder = Path(args.cam_dir or args.mask_dir[0])
    return IMAGES_DIR / f"{folder.name}@{Path(args.domain).stem}.png"


def main(args: argparse.Namespace) -> dict[str, Any]:
    if not args.cam_dir and not args.mask_dir:
        raise WSSSError("nothing to draw; pass --cam_dir (CAM files) and/or --mask_dir (label PNGs)")
    for flag, folder in [("--cam_dir", args.cam_dir), *(("--mask_dir", m) for m in args.mask_dir or [])]:
        if folder and not Path(folder).is_dir():
            raise WSSSError(f"{flag} {folder} does not exist")
    if args.mask_title and len(args.mask_title) != len(args.mask_dir or []):
        titles, folders = len(args.mask_title), len(args.mask_dir or [])
        raise WSSSError(f"{titles} --mask_title for {folders} --mask_dir; give one title per folder")
    if args.cell_size < 32:
        raise WSSSError(f"--cell_size {args.cell_size} is too small; use at least 32")
    check_writable(Path(args.out) if args.out else default_out(args), "--out")
    source = source_from_args(args)
    ids = select_ids(args, source)
    class_columns = count_class_columns(args, ids)
    rows = [np.concatenate(image_row(args, source, i, class_columns), axis=1) for i in ids]
    grid = np.concatenate([header_row(column_titles(args, class_columns), args.cell_size), *rows], axis=0)
    out = Path(args.out) if args.out else default_out(args)
    with atomic_write(out) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
            raise WSSSError(f"cannot write {out}; use a .png or .jpg file name in a writable folder")
    logger.info("wrote a %dx%d grid of %d images to %s", grid.shape[1], grid.shape[0], len(ids), out)
    return {"out": str(out), "rows": len(ids), "columns": grid.shape[1] // args.cell_size, "size": list(grid.shape[:2])}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
