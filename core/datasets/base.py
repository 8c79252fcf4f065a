"""The :class:`DataSource` contract shared by every dataset layout, and the readers behind it.

A data source knows where a dataset's images, ground-truth masks and image-level labels live for one
id list (the *domain*, e.g. ``train_aug``) and reads them as numpy arrays. It needs no torch.

Conventions (SPEC §1.1):
    * ``classes`` are the segmentation classes, background first, so ``K = len(classes)`` and the
      classification task has ``C = K - 1`` foreground classes (``num_classes``).
    * Masks are ``uint8 [H, W]`` with values ``0..C`` and ``255`` = ignore.
    * Labels are ``float32 [C]`` multi-hot vectors over the foreground classes, ``None`` when unknown.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.errors import WSSSError
from core.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

PACKAGED_LISTS_DIR = Path(__file__).resolve().parent / "lists"


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The standard Pascal VOC colour map (bits of the index interleaved into R, G, B).

    Returns:
        uint8 [num_colors, 3]; index 0 is black, 1 is (128, 0, 0), 255 is the void colour (224, 224, 192).
    """
    indices = np.arange(num_colors, dtype=np.int64)
    palette = np.zeros((num_colors, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            bit = (indices >> (3 * (7 - shift) + channel)) & 1
            palette[:, channel] |= bit << shift
    return palette.astype(np.uint8)


def read_id_list(path: Path) -> list[str]:
    """Read a split list: one id per line; CRLF, blank lines and ``#`` comments tolerated.

    Lines in the deeplab style (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``) give the id ``x``.
    Duplicated ids are dropped (with a warning) because they would be counted twice in evaluation.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise WSSSError(f"cannot read id list {path} ({e.strerror}); check the file and its permissions") from e
    ids: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0].split(",")[0]
        if "/" in token or "\\" in token:
            token = Path(token.replace("\\", "/")).stem
        ids.append(token)
    unique = list(dict.fromkeys(ids))
    if len(unique) != len(ids):
        logger.warning("id list %s has %d duplicated ids; each is used once", path, len(ids) - len(unique))
    if not unique:
        raise WSSSError(f"id list {path} is empty; put one image id per line in it")
    return unique


def read_class_names(path: Path) -> list[str]:
    """Read one class name per line (background first); blank lines and ``#`` comments skipped."""
    if not Path(path).is_file():
        raise WSSSError(f"class-names file {path} does not exist; write one class name per line, background first")
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if len(names) < 2:
        raise WSSSError(
            f"class-names file {path} lists {len(names)} classes; it needs background plus at least one class"
        )
    if len(set(names)) != len(names):
        raise WSSSError(f"class-names file {path} repeats a class name; each line must be unique")
    return names


def decode_image_file(path: Path, list_path: Path | None = None) -> np.ndarray:
    """Decode an image file with OpenCV, ignoring EXIF orientation so that GT masks stay aligned.

    Returns:
        uint8 [H, W, 3] RGB.
    """
    path = Path(path)
    if not path.is_file():
        origin = f" listed in {list_path}" if list_path else ""
        raise WSSSError(f"image {path}{origin} does not exist; remove the id from the list or check --data_dir")
    data = np.fromfile(str(path), dtype=np.uint8)  # np.fromfile + imdecode also handles non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        where = list_path if list_path else "the id list"
        raise WSSSError(
            f"cannot decode image {path} (corrupt or not an image); remove its id from {where} or replace the file"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_color_mask(rgb: np.ndarray, palette: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Map an RGB colour mask to class indices by exact colour match.

    Args:
        rgb: uint8 [H, W, 3].
        palette: uint8 [256, 3]; colours of indices ``0..num_classes`` and of 255 (void) are accepted.
        num_classes: number of foreground classes C.
        path: the file, for the error message.

    Returns:
        uint8 [H, W] with values in ``0..C`` or 255.
    """
    valid = list(range(num_classes + 1)) + [IGNORE_INDEX]
    codes = palette.astype(np.int64) @ np.array([65536, 256, 1], dtype=np.int64)
    code_to_index = {int(codes[i]): i for i in reversed(valid)}
    packed = rgb[..., :3].astype(np.int64) @ np.array([65536, 256, 1], dtype=np.int64)
    colors, inverse = np.unique(packed, return_inverse=True)
    unknown = [int(c) for c in colors if int(c) not in code_to_index]
    if unknown:
        shown = ", ".join(str((c >> 16, (c >> 8) & 255, c & 255)) for c in unknown[:5])
        raise WSSSError(
            f"mask {path} has colours {shown} that are not in the dataset palette; save masks as index PNGs"
        )
    lut = np.array([code_to_index[int(c)] for c in colors], dtype=np.uint8)
    return lut[inverse.reshape(packed.shape)]


def decode_mask_file(path: Path, palette: np.ndarray, num_classes: int) -> np.ndarray:
    """Read a label PNG (palette "P", grayscale "L"/"I" or RGB colour) and check its values.

    Returns:
        uint8 [H, W] with values in ``0..num_classes`` or 255.
    """
    try:
        with Image.open(path) as pil:
            pil.load()
            mode = pil.mode
            array = np.asarray(pil)
    except FileNotFoundError as e:
        raise WSSSError(f"mask {path} does not exist; check --data_dir / --masks_dir") from e
    except OSError as e:
        raise WSSSError(f"cannot decode mask {path} (corrupt or not a PNG); regenerate or remove it") from e
    if mode in ("RGB", "RGBA"):
        return decode_color_mask(array, palette, num_classes, path)
    if array.ndim == 3:  # "LA"/"PA": the index is the first plane
        array = array[..., 0]
    check_mask_values(array, num_classes, path)
    return array.astype(np.uint8)


def check_mask_values(mask: np.ndarray, num_classes: int, path: Path | str) -> None:
    """Raise :class:`WSSSError` naming ``path`` unless every value is in ``0..num_classes`` or 255."""
    if mask.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        present = np.unique(mask)
    bad = [int(v) for v in present if not (0 <= v <= num_classes or v == IGNORE_INDEX)]
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        raise WSSSError(
            f"mask {path} has values {shown} outside 0..{num_classes} and 255; "
            f"it does not match this dataset's {num_classes} classes (check --dataset and --masks_dir)"
        )


def label_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot label of the foreground classes present in a mask.

    Args:
        mask: integer [H, W] with values ``0..C`` or 255.

    Returns:
        float32 [C] with 1 for every class index ``c`` such that ``c + 1`` occurs in the mask.
    """
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=256)
    return (counts[1 : num_classes + 1] > 0).astype(np.float32)


class DataSource:
    """Images, masks and image-level labels of one id list of one dataset.

    Subclasses set the layout: :meth:`default_image_path`, :meth:`default_mask_path` and
    :meth:`compute_label`. ``images_dir`` / ``masks_dir`` overrides (e.g. pseudo-label PNGs to train a
    segmentation model on) apply to every layout: ``<images_dir>/<id>.<ext>`` and ``<masks_dir>/<id>.png``.
    """

    name = "base"
    image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")

    def __init__(
        self,
        data_dir: Path,
        domain: str,
        ids: list[str],
        classes: list[str],
        *,
        list_path: Path | None = None,
        images_dir: Path | None = None,
        masks_dir: Path | None = None,
        palette: np.ndarray | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.domain = domain
        self.ids = list(ids)
        self.classes = list(classes)
        self.list_path = list_path
        self.images_dir = Path(images_dir) if images_dir else None
        self.masks_dir = Path(masks_dir) if masks_dir else None
        self.palette = voc_palette() if palette is None else palette
        self._label_cache: dict[str, np.ndarray | None] = {}
        self._has_masks: bool | None = None
        if self.masks_dir is not None and not self.masks_dir.is_dir():
            raise WSSSError(f"masks folder {self.masks_dir} does not exist; check --masks_dir")
        if self.images_dir is not None and not self.images_dir.is_dir():
            raise WSSSError(f"images folder {self.images_dir} does not exist; check --images_dir")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(data_dir='{self.data_dir}', domain={self.domain!r}, ids={len(self.ids)})"

    @property
    def num_classes(self) -> int:
        """Number of foreground classes C (``len(classes) - 1``)."""
        return len(self.classes) - 1

    # Layout hooks -----------------------------------------------------------------------------------
    def default_image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def default_mask_path(self, image_id: str) -> Path | None:
        """Path of the ground-truth PNG of ``image_id``, or None when the layout has none for it."""
        raise NotImplementedError

    def compute_label(self, image_id: str) -> np.ndarray | None:
        """Label from the layout's annotation files; the default derives it from the mask."""
        return self.label_from_mask_file(image_id)

    # Public API -------------------------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        """Path of the image of ``image_id`` (it may not exist; :meth:`read_image` reports that)."""
        if self.images_dir is None:
            return self.default_image_path(image_id)
        for ext in self.image_extensions:
            candidate = self.images_dir / f"{image_id}{ext}"
            if candidate.is_file():
                return candidate
        return self.images_dir / f"{image_id}{self.image_extensions[0]}"

    def mask_path(self, image_id: str) -> Path | None:
        """Path of the existing mask PNG of ``image_id``, or None when there is none."""
        if self.masks_dir is not None:
            candidate = self.masks_dir / f"{image_id}.png"
            return candidate if candidate.is_file() else None
        return self.default_mask_path(image_id)

    @property
    def has_masks(self) -> bool:
        """True when at least one id of the list has a mask file."""
        if self._has_masks is None:
            self._has_masks = any(self.mask_path(i) is not None for i in self.ids)
        return self._has_masks

    def read_image(self, image_id: str) -> np.ndarray:
        """Decode the image of ``image_id``: uint8 [H, W, 3] RGB."""
        return decode_image_file(self.image_path(image_id), self.list_path)

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image of ``image_id`` from its file header (the pixels are not decoded)."""
        try:
            with Image.open(self.image_path(image_id)) as image:
                width, height = image.size  # the stored size: EXIF orientation is ignored, as read_image does
            return height, width
        except OSError:
            return self.read_image(image_id).shape[:2]  # reports a missing or corrupt file in one line

    def read_mask(self, image_id: str) -> np.ndarray:
        """Read the mask of ``image_id``: uint8 [H, W], values ``0..C`` and 255 (ignore)."""
        path = self.mask_path(image_id)
        if path is None:
            where = self.masks_dir if self.masks_dir is not None else self.data_dir
            raise WSSSError(f"no mask {image_id}.png under {where}; this domain has no ground truth for that id")
        return decode_mask_file(path, self.palette, self.num_classes)

    def label(self, image_id: str) -> np.ndarray | None:
        """Image-level label of ``image_id``: float32 [C] multi-hot (a copy), or None when unknown."""
        if image_id not in self._label_cache:
            self._label_cache[image_id] = self.compute_label(image_id)
        label = self._label_cache[image_id]
        return None if label is None else label.copy()

    def labels(self) -> dict[str, np.ndarray | None]:
        """Labels of every id of the list (computed once, then cached)."""
        return {image_id: self.label(image_id) for image_id in self.ids}

    def label_from_mask_file(self, image_id: str, path: Path | None = None) -> np.ndarray | None:
        """Label from the unique values of a mask PNG (default: :meth:`mask_path`), None without a PNG."""
        path = self.mask_path(image_id) if path is None else path
        if path is None:
            return None
        return label_from_mask(decode_mask_file(path, self.palette, self.num_classes), self.num_classes)
