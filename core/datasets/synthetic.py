"""A synthetic Pascal-VOC-shaped benchmark that exhibits the problem WSSS methods address.

Every object is a *body* -- an ellipse, rotated rectangle or blob painted with black/white stripes that are the
same for all classes and unlike the natural-photo backgrounds -- carrying one small class *emblem* (10-18 % of
the object's pixels). A class is told apart only by its emblem, which differs in colour and in shape. A
classifier's CAM therefore fires on the emblem, while the segmentation ground truth is the whole object: methods
that expand CAMs towards the body (Puzzle-CAM, OC-CSE, P-NOC, random walk, saliency) should measurably win.

Scenes hold 1-3 objects (classes drawn independently, so repeats happen) of varied scale, aspect and position
on random crops of scikit-image's bundled photos; a later object may occlude an earlier one (its pixels belong
to the front object) but never hides more than a quarter of an earlier emblem or half of an earlier body.

The tree written by :func:`make_synthetic_voc` is a plain VOC 2012 layout read by :class:`VOCSource` unchanged:
``JPEGImages``, ``Annotations`` (VOC XML), ``SegmentationClass`` (palette PNG with a 255 band at object borders,
for train+val), ``SegmentationClassAug`` (index PNG without band, like SBD, for train_aug) and
``ImageSets/Segmentation/{train,val,train_aug,trainval}.txt``. Output is byte-identical for a given seed.

``body_tint`` > 0 gives a control variant: the stripes are mixed with the class's emblem colour in that proportion,
so every body pixel shows its class (the scene layout and every random draw stay those of the untinted set).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np
from PIL import Image

from core.artifacts import atomic_write
from core.datasets.base import voc_palette
from core.datasets.voc import VOC_CLASSES
from core.errors import WSSSError
from core.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

MARKER_FILE = "synthetic.json"
GENERATED_FOLDERS = ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug", "ImageSets")
BACKGROUND_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "grass",
    "gravel",
    "brick",
    "retina",
    "moon",
    "clock",
    "cell",
)
# Ten well-separated saturated colours (none grey, so none looks like the black/white body stripes).
EMBLEM_COLORS = np.array(
    [
        (220, 30, 40),
        (40, 170, 60),
        (250, 220, 30),
        (30, 90, 220),
        (250, 130, 20),
        (130, 40, 170),
        (40, 210, 220),
        (230, 60, 200),
        (130, 75, 25),
        (250, 160, 180),
    ],
    dtype=np.uint8,
)
EMBLEM_SHAPES = ("disk", "square", "triangle", "plus", "diamond", "ring", "bars", "cross", "star", "half_disk")
STRIPE_COLORS = np.array([(235, 235, 235), (35, 35, 35)], dtype=np.float32)
MAX_CLASSES = len(VOC_CLASSES) - 1


def emblem_style(class_index: int) -> tuple[np.ndarray, str]:
    """Colour (uint8 [3]) and shape name of a class's emblem.

    Classes 0-9 use colour i and shape i; classes 10-19 reuse colour i - 10 with a shape shifted by three, so
    any two classes differ in colour or, when they share it, in shape (and vice versa).
    """
    color = EMBLEM_COLORS[class_index % 10]
    shape = EMBLEM_SHAPES[(class_index + 3 * (class_index // 10)) % 10]
    return color, shape


@dataclass
class Scene:
    """One rendered image with its annotations.

    Attributes:
        image: uint8 [S, S, 3] RGB.
        mask: uint8 [S, S]; 0 background, 1..K class of the visible object (no ignore band).
        instances: uint8 [S, S]; 0 background, n = n-th object (back to front).
        emblem: bool [S, S]; visible emblem pixels.
        classes: class index (0-based, foreground) of each object, in the order of ``instances``.
    """

    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray
    emblem: np.ndarray
    classes: list[int] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def background_photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photos as uint8 RGB, shorter side at most 256 px (loaded once, no network)."""
    from skimage import data  # only the generator needs scikit-image

    photos = []
    for name in BACKGROUND_PHOTOS:
        photo = np.asarray(getattr(data, name)())
        if photo.dtype != np.uint8:
            photo = (photo > 0).astype(np.uint8) * 255 if photo.dtype == bool else photo.astype(np.uint8)
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        scale = 256 / min(photo.shape[:2])
        if scale < 1:
            photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        photos.append(np.ascontiguousarray(photo))
    return tuple(photos)


def random_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop (25-90 % of the shorter side) of a random photo, maybe mirrored, resized to uint8 [S, S, 3]."""
    photos = background_photos()
    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = max(8, int(min(height, width) * rng.uniform(0.25, 0.9)))
    y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = photo[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    background = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interpolation)
    return np.clip(background.astype(np.float32) * rng.uniform(0.75, 1.15), 0, 255).astype(np.uint8)


def body_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random object body: ellipse, rotated rectangle or smooth blob; bool [S, S]."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    semi_major = rng.uniform(0.17, 0.32) * size
    semi_minor = semi_major * rng.uniform(0.55, 1.0)
    margin = 0.6 * semi_major
    center = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(0, 180)
    kind = int(rng.integers(3))
    if kind == 0:
        # shift=4: OpenCV takes the centre and axes in 1/16 pixel, so small ellipses keep their sub-pixel shape.
        center_q4 = tuple(int(v) for v in np.round(center * 16))
        axes_q4 = (int(semi_major * 16), int(semi_minor * 16))
        cv2.ellipse(canvas, center_q4, axes_q4, angle, 0, 360, 1, -1, cv2.LINE_8, 4)
    elif kind == 1:
        box = cv2.boxPoints(((float(center[0]), float(center[1])), (1.7 * semi_major, 1.7 * semi_minor), angle))
        cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=9))
        radii = rng.uniform(0.75, 1.0, size=9)
        theta = np.deg2rad(angle)
        xs, ys = semi_major * radii * np.cos(angles), semi_minor * radii * np.sin(angles)
        points = np.stack(
            [center[0] + xs * np.cos(theta) - ys * np.sin(theta), center[1] + xs * np.sin(theta) + ys * np.cos(theta)],
            1,
        )
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def _regular_polygon(cx: float, cy: float, radius: float, corners: int, phase: float) -> np.ndarray:
    angles = phase + np.arange(corners) * 2 * np.pi / corners
    return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)


def draw_emblem(size: int, shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Rasterise an emblem shape of half-extent ``radius`` centred at (cx, cy); bool [S, S]."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    r = max(radius, 1.0)
    center = (int(round(cx)), int(round(cy)))
    thick = max(1, int(round(r / 2.5)))
    polygons: list[np.ndarray] = []
    if shape == "disk":
        cv2.circle(canvas, center, int(round(r)), 1, -1)
    elif shape == "ring":
        cv2.circle(canvas, center, max(1, int(round(r - thick / 2))), 1, thick)
    elif shape == "half_disk":
        cv2.ellipse(canvas, center, (int(round(r)), int(round(r))), 0, 180, 360, 1, -1)
        cv2.rectangle(canvas, (center[0] - int(r), center[1]), (center[0] + int(r), center[1] + int(r / 3)), 1, -1)
    elif shape == "square":
        polygons.append(_regular_polygon(cx, cy, r * np.sqrt(2), 4, np.pi / 4))
    elif shape == "diamond":
        polygons.append(_regular_polygon(cx, cy, r * 1.2, 4, 0.0))
    elif shape == "triangle":
        polygons.append(_regular_polygon(cx, cy + r * 0.25, r * 1.3, 3, -np.pi / 2))
    elif shape == "star":
        outer = _regular_polygon(cx, cy, r * 1.25, 5, -np.pi / 2)
        inner = _regular_polygon(cx, cy, r * 0.5, 5, -np.pi / 2 + np.pi / 5)
        polygons.append(np.stack([outer, inner], 1).reshape(-1, 2))
    elif shape == "plus":
        cv2.rectangle(canvas, (int(cx - r), int(cy - thick / 2)), (int(cx + r), int(cy + thick / 2)), 1, -1)
        cv2.rectangle(canvas, (int(cx - thick / 2), int(cy - r)), (int(cx + thick / 2), int(cy + r)), 1, -1)
    elif shape == "cross":
        d = r * 0.8
        cv2.line(canvas, (int(cx - d), int(cy - d)), (int(cx + d), int(cy + d)), 1, thick + 1)
        cv2.line(canvas, (int(cx - d), int(cy + d)), (int(cx + d), int(cy - d)), 1, thick + 1)
    elif shape == "bars":
        bar = max(1, int(round(2 * r / 5)))
        for offset in (-2 * bar, 0, 2 * bar):
            top = int(round(cy + offset - bar / 2))
            cv2.rectangle(canvas, (int(cx - r), top), (int(cx + r), top + bar - 1), 1, -1)
    else:
        raise ValueError(f"unknown emblem shape {shape!r}")
    for polygon in polygons:
        cv2.fillPoly(canvas, [np.round(polygon).astype(np.int32)], 1)
    return canvas.astype(bool)


def place_emblem(body: np.ndarray, shape: str, fraction: float, rng: np.random.Generator) -> np.ndarray | None:
    """An emblem covering about ``fraction`` of ``body``'s pixels, entirely inside it; None if it cannot fit."""
    size = body.shape[0]
    target = fraction * body.sum()
    radius = np.sqrt(target / 3.0)  # first guess; corrected below by the shape's measured fill
    probe = draw_emblem(4 * int(radius + 4), shape, 2 * int(radius + 4), 2 * int(radius + 4), radius)
    radius *= np.sqrt(target / max(int(probe.sum()), 1))
    half = int(np.ceil(radius * 1.35)) + 1
    kernel = np.ones((2 * half + 1, 2 * half + 1), np.uint8)
    # Zero border: the emblem must lie inside the frame too, or its visible share would shrink.
    inner = cv2.erode(body.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    candidates = np.flatnonzero(inner)
    if candidates.size == 0:
        return None
    cy, cx = divmod(int(candidates[rng.integers(candidates.size)]), size)
    emblem = draw_emblem(size, shape, cx, cy, radius) & body
    return emblem if emblem.any() else None


def striped_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Black/white stripes with a random direction and phase (the class-agnostic body look): float32 [S, S, 3]."""
    period = max(4.0, size / 16)
    theta = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (xs * np.cos(theta) + ys * np.sin(theta)) / period + rng.uniform(0, 1)
    texture = STRIPE_COLORS[(np.floor(phase).astype(np.int64) & 1)]
    return texture * rng.uniform(0.85, 1.1)


def _occlusion_ok(body: np.ndarray, instances: np.ndarray, emblem_owner: np.ndarray, areas: list[int]) -> bool:
    # A new front object may hide at most 1/4 of an earlier emblem and 1/2 of an earlier body.
    for n, area in enumerate(areas, start=1):
        visible = instances == n
        if (visible & ~body).sum() < 0.5 * area:
            return False
        emblem = emblem_owner == n
        if emblem.any() and (emblem & body).sum() > 0.25 * emblem.sum():
            return False
    return True


def render_scene(
    size: int, num_classes: int, rng: np.random.Generator, max_objects: int = 3, body_tint: float = 0.0
) -> Scene:
    """Render one synthetic image with 1..max_objects objects of classes ``0..num_classes-1``; ``body_tint`` in
    [0, 1] mixes each body's stripes with its class's emblem colour (0 = the class-agnostic benchmark)."""
    image = random_background(size, rng).astype(np.float32)
    instances = np.zeros((size, size), dtype=np.uint8)
    emblem_owner = np.zeros((size, size), dtype=np.uint8)
    wanted = int(rng.choice(np.arange(1, max_objects + 1), p=_object_count_probabilities(max_objects)))
    classes: list[int] = []
    areas: list[int] = []
    for _ in range(wanted):
        for _attempt in range(8 if classes else 64):  # the first object must succeed: no empty scenes
            body = body_mask(size, rng)
            class_index = int(rng.integers(num_classes))
            color, shape = emblem_style(class_index)
            emblem = place_emblem(body, shape, rng.uniform(0.10, 0.18), rng)
            if emblem is not None and _occlusion_ok(body, instances, emblem_owner, areas):
                break
        else:
            continue
        n = len(classes) + 1
        texture = striped_texture(size, rng)
        if body_tint:
            texture = (1 - body_tint) * texture + body_tint * color.astype(np.float32)
        image = np.where(body[..., None], texture, image)
        jitter = rng.integers(-12, 13, size=3)
        image[emblem] = np.clip(color.astype(np.int64) + jitter, 0, 255)
        instances[body] = n
        emblem_owner[body] = 0
        emblem_owner[emblem] = n
        classes.append(class_index)
        areas.append(int(body.sum()))
    if not classes:
        raise RuntimeError("could not place any object; the image size is too small")
    lut = np.array([0] + [c + 1 for c in classes], dtype=np.uint8)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(pixels, lut[instances], instances, emblem_owner > 0, classes)


def _object_count_probabilities(max_objects: int) -> np.ndarray:
    weights = np.array([0.5, 0.3, 0.2, 0.1, 0.05][:max_objects])
    return weights / weights.sum()


def boundary_band(instances: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width // 2`` of a change of instance (object/object or object/background): bool [S, S]."""
    kernel = np.ones((width, width), np.uint8)
    return cv2.dilate(instances, kernel) != cv2.erode(instances, kernel)


def voc_xml(image_id: str, scene: Scene, class_names: list[str]) -> str:
    """VOC annotation text: one <object> with <name> and 1-based <bndbox> per visible object."""
    size = scene.image.shape[0]
    objects = []
    for n, class_index in enumerate(scene.classes, start=1):
        ys, xs = np.nonzero(scene.instances == n)
        if xs.size == 0:
            continue
        objects.append(
            "  <object>\n"
            f"    <name>{escape(class_names[class_index])}</name>\n"
            "    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
            f"    <bndbox><xmin>{xs.min() + 1}</xmin><ymin>{ys.min() + 1}</ymin>"
            f"<xmax>{xs.max() + 1}</xmax><ymax>{ys.max() + 1}</ymax></bndbox>\n"
            "  </object>\n"
        )
    return (
        "<annotation>\n  <folder>VOC2012</folder>\n"
        f"  <filename>{image_id}.jpg</filename>\n"
        f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>\n"
        "  <segmented>1</segmented>\n" + "".join(objects) + "</annotation>\n"
    )


def _png_bytes(mask: np.ndarray, palette: np.ndarray | None) -> bytes:
    pil = Image.fromarray(mask, mode="L")
    if palette is not None:
        pil = pil.convert("P")
        pil.putpalette(palette.ravel().tolist())
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes | str) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER_FILE).is_file():
            raise WSSSError(f"{out} is not empty and holds no {MARKER_FILE}; choose an empty or new --out folder")
        if not overwrite:
            raise WSSSError(f"{out} already holds a synthetic dataset; pass --overwrite to regenerate it")
        for name in GENERATED_FOLDERS:
            shutil.rmtree(out / name, ignore_errors=True)
        (out / MARKER_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)


def _split_ids(train: int, val: int, aug: int, seed: int) -> dict[str, list[str]]:
    # Interleave the splits in id order, as in real VOC, with a seeded permutation.
    total = train + val + aug
    ids = [f"2012_{i:06d}" for i in range(1, total + 1)]
    order = np.random.default_rng([seed, 1]).permutation(total)
    picked = [ids[i] for i in order]
    splits = {"train": picked[:train], "val": picked[train : train + val], "aug": picked[train + val :]}
    return {name: sorted(values) for name, values in splits.items()}


def make_synthetic_voc(
    out: Path | str,
    train: int = 200,
    val: int = 100,
    aug: int = 300,
    size: int = 128,
    classes: int = 20,
    seed: int = 0,
    overwrite: bool = False,
    body_tint: float = 0.0,
) -> dict:
    """Write a synthetic VOC 2012 tree at ``out`` (see the module docstring).

    Args:
        out: destination folder (created; must be empty or a previous synthetic tree with ``overwrite``).
        train, val, aug: number of ids in train, val and the extra SBD-like ids of train_aug.
        size: image side in pixels (square images).
        classes: only the first ``classes`` VOC classes appear (1..20).
        seed: the same seed gives byte-identical files.
        body_tint: share of the class colour in the body stripes, in [0, 1] (0 = the benchmark; see the module).

    Returns:
        Summary: ``num_images``, ``splits`` (sizes), ``classes`` (names), ``emblem_fraction`` (mean visible emblem
        pixels / object pixels), ``objects_per_image`` and ``seconds``.
    """
    if not 1 <= classes <= MAX_CLASSES:
        raise WSSSError(f"--classes {classes} is out of range; pass 1..{MAX_CLASSES}")
    if size < 32 or min(train, val, aug) < 0 or train + aug == 0:
        raise WSSSError("need --size >= 32, non-negative --train/--val/--aug and at least one train or aug id")
    if not 0 <= body_tint <= 1:
        raise WSSSError(f"--body_tint {body_tint} is out of range; pass a share in [0, 1] (0 = untinted bodies)")
    out = Path(out)
    _prepare_output(out, overwrite)
    start = time.perf_counter()
    class_names = list(VOC_CLASSES[1:])
    palette = voc_palette()
    band_width = 2 * max(1, size // 128) + 1
    splits = _split_ids(train, val, aug, seed)
    with_original = set(splits["train"]) | set(splits["val"])
    with_aug = set(splits["train"]) | set(splits["aug"])
    fractions, counts = [], []
    for image_id in sorted(with_original | with_aug):
        scene = render_scene(size, classes, np.random.default_rng([seed, 2, int(image_id[5:])]), body_tint=body_tint)
        _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        _write(out / "JPEGImages" / f"{image_id}.jpg", jpeg.tobytes())
        _write(out / "Annotations" / f"{image_id}.xml", voc_xml(image_id, scene, class_names))
        if image_id in with_original:
            banded = np.where(boundary_band(scene.instances, band_width), IGNORE_INDEX, scene.mask).astype(np.uint8)
            _write(out / "SegmentationClass" / f"{image_id}.png", _png_bytes(banded, palette))
        if image_id in with_aug:
            _write(out / "SegmentationClassAug" / f"{image_id}.png", _png_bytes(scene.mask, None))
        fractions.append(scene.emblem.sum() / max(int((scene.instances > 0).sum()), 1))
        counts.append(len(scene.classes))
    lists = {
        "train": splits["train"],
        "val": splits["val"],
        "train_aug": sorted(with_aug),
        "trainval": sorted(with_original),
    }
    for name, ids in lists.items():
        _write(out / "ImageSets" / "Segmentation" / f"{name}.txt", "".join(f"{i}\n" for i in ids))
    summary = {
        "num_images": len(with_original | with_aug),
        "splits": {name: len(ids) for name, ids in lists.items()},
        "classes": class_names[:classes],
        "size": size,
        "seed": seed,
        **({"body_tint": body_tint} if body_tint else {}),  # the default benchmark's marker stays as it was
        "emblem_fraction": float(np.mean(fractions)),
        "objects_per_image": float(np.mean(counts)),
    }
    _write(out / MARKER_FILE, json.dumps(summary, indent=2) + "\n")
    summary["seconds"] = round(time.perf_counter() - start, 2)
    logger.info("wrote %d synthetic images to %s in %.1f s", summary["num_images"], out, summary["seconds"])
    return summary
