"""Model registry (timm style): ``create_model(name, ...)`` builds any registered architecture.

``num_classes``, ``in_channels`` and ``input_size`` describe the data and come from the dataset;
every other keyword is the model's own config (``conf/model/<name>.yaml``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from napkit.errors import NapkitError
from napkit.registry import Registry

_DATA_ARGS = ("num_classes", "in_channels", "input_size")
_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


def register_model(fn: Builder) -> Builder:
    """Register a builder under its function name; it must accept the three data keywords."""
    return _MODELS.add(fn.__name__, fn)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return _MODELS.names()


def create_model(
    name: str, *, num_classes: int, in_channels: int, input_size: int, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for inputs of shape (in_channels, input_size, input_size)."""
    builder = _MODELS.get(name)
    _check_options(name, builder, kwargs)
    for key, value in zip(_DATA_ARGS, (num_classes, in_channels, input_size), strict=True):
        if not isinstance(value, int) or value < 1:
            raise NapkitError(f"model {name!r} needs a positive integer {key}, got {value!r}")
    return builder(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)


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
from napkit.models import imagenet, small  # noqa: E402
from napkit.models import lenet  # noqa: E402

__all__ = ["create_model", "imagenet", "lenet", "list_models", "register_model", "small"]
