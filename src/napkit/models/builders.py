"""Models by builder path (Hydra's ``_target_`` style), beyond napkit's registry.

``name`` may be a torchvision classifier (``resnet18`` or ``torchvision.models.resnet18``; all 80 of
``torchvision.models.list_models``), ``timm.create_model`` (timm is an optional extra; ``model_name``
goes in the kwargs, ``conf/model/timm.yaml``) or any importable ``my_package.my_builder`` returning an
``nn.Module``. The data keywords reach the builder under the names it takes (``num_classes``;
``in_channels`` / ``in_chans``; ``input_size`` / ``image_size`` / ``img_size``; a timm model built for
one input size, ViT or Swin, gets ``img_size``); a builder that takes no input-channel keyword gets
its first 3-channel conv replaced when ``in_channels != 3``. ``weights`` picks torchvision's
pretrained weights by enum name (local hub cache only).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from napkit.errors import NapkitError
from napkit.models.weights import cached_state, load_state
from napkit.structured.attention import prunable_attention

_TORCHVISION = "torchvision.models."
_CHANNELS = ("in_channels", "in_chans")
_SIZES = ("input_size", "image_size", "img_size")


def torchvision_name(name: str) -> str | None:
    """The torchvision classifier ``name`` refers to (bare or ``torchvision.models.``-prefixed), if any."""
    bare = name.removeprefix(_TORCHVISION)
    if "." in bare:
        return None
    return bare if bare in torchvision.models.list_models(module=torchvision.models) else None


def is_builder_path(name: str) -> bool:
    """Whether ``name`` names a builder outside the registry: a torchvision model or a dotted path."""
    return torchvision_name(name) is not None or "." in name


def build(name: str, *, num_classes: int, in_channels: int, input_size: int, weights: str | None = None,
          **kwargs: Any) -> nn.Module:
    """Build the model ``name`` (see the module docstring) for ``in_channels x input_size^2`` inputs."""
    tv = torchvision_name(name)
    if tv is not None:
        model = _torchvision(tv, num_classes, input_size, kwargs)
    else:
        if weights is not None:
            raise NapkitError(f"model.weights={weights!r} names torchvision weights, but {name!r} is not a "
                              f"torchvision model; pass a weights file instead")
        builder = _import(name)
        data = _data_args(name, builder, num_classes, in_channels, input_size, kwargs.get("model_name"))
        model = _call(name, builder, data | kwargs)
    if in_channels != 3 and not _takes_channels(name, tv):
        _replace_first_conv(model, in_channels)
    prunable_attention(model)  # same weights and function; heads become prunable channels
    if weights is not None and tv is not None:
        load_state(model, cached_state(tv, weights), f"{tv} {weights}", skip_mismatched=True)
    return model


def _torchvision(name: str, num_classes: int, input_size: int, kwargs: dict[str, Any]) -> nn.Module:
    """A torchvision classifier with random weights; ViT / MaxViT get the input size they must know."""
    sized = {}
    if name.startswith("vit_"):
        sized = {"image_size": input_size}
    elif name.startswith("maxvit_"):
        sized = {"input_size": (input_size, input_size)}
    builder = torchvision.models.get_model_builder(name)
    return _call(name, lambda **kw: builder(weights=None, **kw), {"num_classes": num_classes} | sized | kwargs)


def _import(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.rpartition(".")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        extra = " (timm is an optional extra: pip install timm)" if path.startswith("timm.") else ""
        raise NapkitError(f"model {path!r} cannot be imported: {exc}{extra}; give a registered model, a "
                          f"torchvision model name or an importable package.module.builder") from exc
    if not callable(builder):
        raise NapkitError(f"model {path!r} is a {type(builder).__name__}, not a callable builder")
    return builder


def _accepts(builder: Callable[..., Any]) -> tuple[set[str], bool]:
    """Keyword names ``builder`` takes and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    return {p.name for p in params}, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _data_args(name: str, builder: Callable[..., Any], num_classes: int, in_channels: int,
               input_size: int, model_name: Any = None) -> dict[str, Any]:
    """The data keywords under the names ``builder`` takes (timm: ``num_classes``, ``in_chans`` and, for
    a model built for one input size, ``img_size``)."""
    names, var = _accepts(builder)
    if name == "timm.create_model":
        return {"num_classes": num_classes, "in_chans": in_channels} | _timm_size(model_name, input_size)
    out: dict[str, Any] = {"num_classes": num_classes} if "num_classes" in names or var else {}
    out |= {k: in_channels for k in _CHANNELS if k in names}
    out |= {k: input_size for k in _SIZES if k in names}
    return out


def _timm_size(model_name: Any, input_size: int) -> dict[str, Any]:
    """``img_size`` for a timm model whose pretrained config says ``fixed_input_size`` (ViT, DeiT, Swin,
    MaxViT ...: their position embeddings or windows are sized at build time; timm's default is 224 px,
    so a 32 px dataset would fail at the first batch). CNNs take no ``img_size``: nothing for them."""
    import timm

    cfg = timm.get_pretrained_cfg(model_name) if isinstance(model_name, str) else None
    return {"img_size": input_size} if cfg is not None and cfg.fixed_input_size else {}


def _takes_channels(name: str, tv: str | None) -> bool:
    if tv is not None:
        return False
    return name == "timm.create_model" or bool(set(_CHANNELS) & _accepts(_import(name))[0])


def _call(name: str, builder: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        raise NapkitError(f"model {name!r} rejected its options {sorted(kwargs)}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise NapkitError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel Conv2d for a fresh one with ``in_channels`` inputs, same geometry."""
    for name, old in model.named_modules():
        if isinstance(old, nn.Conv2d) and old.in_channels == 3:
            new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                            old.dilation, old.groups, old.bias is not None)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            return
    raise NapkitError(f"in_channels={in_channels}: {type(model).__name__} has no 3-channel input conv to adapt")
