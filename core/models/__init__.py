"""Networks: backbones, stage models and checkpoint compatibility.

``BACKBONES`` maps every ``--architecture`` name to its factory (use it as ``choices=BACKBONES``);
``MODELS`` maps stage-model names to their classes, and :func:`build_model` builds one by name.
Stage models are registered below by explicit calls, so importing this package has no other effect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from core.errors import WSSSError
from core.models.backbones import (
    BACKBONES,
    MIX_POINTS,
    Backbone,
    FeatureBackbone,
    FixedBatchNorm2d,
    HiddenMix,
    build_backbone,
    group_parameters,
    imagenet_state_dict,
    register_backbone,
)
from core.models.classifier import Classifier, SubcategoryClassifier
from core.models.compat import (
    describe_state_dict,
    load_classifier_weights,
    normalize_state_dict_keys,
    read_checkpoint,
    unwrap_state_dict,
)

#: stage-model name -> constructor (class or factory) taking keyword arguments.
MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator (or plain call) adding a stage-model constructor to :data:`MODELS`."""

    def register(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = constructor
        return constructor

    return register


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the stage model registered as ``name``, e.g. ``build_model("classifier", architecture="resnet50")``.

    Raises:
        WSSSError: unknown name (the message lists the registered names).
    """
    if name not in MODELS:
        raise WSSSError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


register_model("classifier")(Classifier)
register_model("subcategory_classifier")(SubcategoryClassifier)

__all__ = [
    "BACKBONES",
    "MIX_POINTS",
    "MODELS",
    "Backbone",
    "Classifier",
    "FeatureBackbone",
    "FixedBatchNorm2d",
    "HiddenMix",
    "SubcategoryClassifier",
    "build_backbone",
    "build_model",
    "describe_state_dict",
    "group_parameters",
    "imagenet_state_dict",
    "load_classifier_weights",
    "normalize_state_dict_keys",
    "read_checkpoint",
    "register_backbone",
    "register_model",
    "unwrap_state_dict",
]
