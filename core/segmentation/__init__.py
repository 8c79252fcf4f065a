"""The segmentation stage (``scripts/segmentation``): DeepLabV3+ training and inference pieces will live here.

Its network registers in :mod:`core.models`; it reads label folders through :mod:`core.artifacts`.
"""
