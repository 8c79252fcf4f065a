"""CAM post-processing and multi-scale + flip CAM inference of the CAM stage (SPEC §5).

The code lives in :mod:`core.multiscale`, shared with the saliency stage (whose package may not import this one);
these names stay importable from here for the CAM stage's scripts and tools.
"""

from core.multiscale import (
    CAM_EPS,
    CAM_STRIDE,
    UP_STRIDE,
    imagenet_normalize,
    max_normalize,
    multiscale_cams,
    multiscale_cams_batch,
    normalize_cams,
    resize_bicubic,
)

__all__ = [
    "CAM_EPS",
    "CAM_STRIDE",
    "UP_STRIDE",
    "imagenet_normalize",
    "max_normalize",
    "multiscale_cams",
    "multiscale_cams_batch",
    "normalize_cams",
    "resize_bicubic",
]
