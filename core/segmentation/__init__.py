"""The segmentation stage (``scripts/segmentation``): DeepLabV3+ on a label folder, multi-scale inference.

* :mod:`core.segmentation.network`: :class:`~core.segmentation.network.DeepLabV3Plus` (the reference's keys);
* :mod:`core.segmentation.labels`: the label folder and its check before training;
* :mod:`core.segmentation.training`: flags, step, validation and the recipe ``scripts/segmentation/train.py`` runs;
* :mod:`core.segmentation.predict`: multi-scale + flip class probabilities of one image.

It reads label folders through :mod:`core.datasets` and writes its PNGs through :mod:`core.artifacts`.
"""
