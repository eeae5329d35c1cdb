"""Model registry (timm style): ``create_model(name, ...)`` builds any registered architecture, and
any builder by path (:mod:`napkit.models.builders`: a torchvision classifier, ``timm.create_model``,
``my_package.my_builder``).

``num_classes``, ``in_channels`` and ``input_size`` describe the data and come from the dataset;
every other keyword is the model's own config (``conf/model/<name>.yaml``). ``weights`` loads a
weights file (``.safetensors`` or a torch state dict, read with ``weights_only=True``) into any model,
or, for a torchvision model, names its pretrained weights (``DEFAULT``, ``IMAGENET1K_V1``, ...; read
from the local torch hub cache only).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from napkit.errors import NapkitError
from napkit.registry import Registry

_DATA_ARGS = ("num_classes", "in_channels", "input_size")
_WEIGHT_FILES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


def register_model(fn: Builder) -> Builder:
    """Register a builder under its function name; it must accept the three data keywords."""
    return _MODELS.add(fn.__name__, fn)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return _MODELS.names()


def create_model(
    name: str, *, num_classes: int, in_channels: int, input_size: int, weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for inputs of shape (in_channels, input_size, input_size)."""
    for key, value in zip(_DATA_ARGS, (num_classes, in_channels, input_size), strict=True):
        if not isinstance(value, int) or value < 1:
            raise NapkitError(f"model {name!r} needs a positive integer {key}, got {value!r}")
    data = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    weights_file = weights if weights is not None and is_weights_file(weights) else None
    if name in list_models():
        if weights is not None and weights_file is None:
            raise NapkitError(f"model.weights={weights!r} is not a weights file ({', '.join(_WEIGHT_FILES)}); "
                              f"registered models load torchvision's weights with pretrained: true")
        builder = _MODELS.get(name)
        _check_options(name, builder, kwargs)
        model = builder(**data, **kwargs)
    elif builders.is_builder_path(name):
        model = builders.build(name, **data, weights=None if weights_file else weights, **kwargs)
    else:
        try:
            _MODELS.get(name)
        except NapkitError as exc:
            raise NapkitError(f"{exc}; or a torchvision model name (torchvision.models.list_models()) or an "
                              f"importable package.module.builder") from None
    return model if weights_file is None else load_weights(model, weights_file)


def is_weights_file(weights: str) -> bool:
    """Whether ``model.weights`` names a file (by its suffix or an existing path), not a torchvision enum."""
    return weights.endswith(_WEIGHT_FILES) or Path(weights).is_file()


def _check_options(name: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    """Reject config keys the builder does not take, naming the ones it does."""
    valid = [p for p in inspect.signature(builder).parameters if p not in _DATA_ARGS]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise NapkitError(
            f"model {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )


# Importing the builder modules registers them; they import register_model from above.
from napkit.models import (  # noqa: E402
    builders,
    imagenet,
    lenet,
    small,
)
from napkit.models.weights import load_weights  # noqa: E402

__all__ = ["builders", "create_model", "imagenet", "lenet", "list_models", "load_weights", "register_model",
           "small"]
