"""The saliency stage (``scripts/ccam``): C²AM and C²AM-H, a class-agnostic foreground map (SPEC §2.5, §7).

* :mod:`core.ccam.network`: the network (any CAM-stage backbone, one-channel head, stored polarity decision);
* :mod:`core.ccam.losses`: SimMax, SimMin and the CAM-hint loss;
* :mod:`core.ccam.data`: the CAM-hint dataset and the checks of a CAM folder;
* :mod:`core.ccam.training`: flags, the training step, polarity, the fg/bg validation and the training recipe.

It reads CAM folders through :mod:`core.artifacts` and shares multi-scale inference with the CAM stage through
:mod:`core.multiscale`, never through :mod:`core.cam`.
"""
