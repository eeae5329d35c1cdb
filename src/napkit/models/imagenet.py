"""Full-size ImageNet models (224x224 inputs), built by torchvision's own builders.

``pretrained=True`` loads torchvision's DEFAULT weights from the local torch hub cache only
(``torch.hub.get_dir()/checkpoints``): napkit never downloads weights, so runs are offline-safe.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from napkit.errors import NapkitError
from napkit.io import load_torch
from napkit.models import register_model


@dataclass(frozen=True)
class _Arch:
    """What napkit needs to know about one torchvision architecture."""

    builder: Callable[..., nn.Module]
    weights: WeightsEnum
    first_conv: str  # qualified name of the input convolution
    classifier: str  # qualified name of the final Linear layer
    min_input_size: int  # smallest input the feature extractor accepts


_ARCHS = {
    "alexnet": _Arch(tvm.alexnet, tvm.AlexNet_Weights.DEFAULT, "features.0", "classifier.6", 63),
    "vgg16": _Arch(tvm.vgg16, tvm.VGG16_Weights.DEFAULT, "features.0", "classifier.6", 32),
    "vgg16_bn": _Arch(tvm.vgg16_bn, tvm.VGG16_BN_Weights.DEFAULT, "features.0", "classifier.6", 32),
    "resnet50": _Arch(tvm.resnet50, tvm.ResNet50_Weights.DEFAULT, "conv1", "fc", 32),
}


@register_model
def alexnet(
    *, num_classes: int, in_channels: int, input_size: int, pretrained: bool = False, dropout: float = 0.5
) -> nn.Module:
    """torchvision AlexNet. in_channels != 3 replaces ``features.0`` with a freshly initialised conv."""
    return _build("alexnet", num_classes, in_channels, input_size, pretrained, dropout=dropout)


@register_model
def vgg16(
    *, num_classes: int, in_channels: int, input_size: int, pretrained: bool = False, dropout: float = 0.5
) -> nn.Module:
    """torchvision VGG-16. in_channels != 3 replaces ``features.0`` with a freshly initialised conv."""
    return _build("vgg16", num_classes, in_channels, input_size, pretrained, dropout=dropout)


@register_model
def vgg16_bn(
    *, num_classes: int, in_channels: int, input_size: int, pretrained: bool = False, dropout: float = 0.5
) -> nn.Module:
    """torchvision VGG-16 with BatchNorm. in_channels != 3 replaces ``features.0`` (fresh init)."""
    return _build("vgg16_bn", num_classes, in_channels, input_size, pretrained, dropout=dropout)


@register_model
def resnet50(*, num_classes: int, in_channels: int, input_size: int, pretrained: bool = False) -> nn.Module:
    """torchvision ResNet-50. in_channels != 3 replaces ``conv1`` with a freshly initialised conv."""
    return _build("resnet50", num_classes, in_channels, input_size, pretrained)


def pretrained_path(name: str) -> Path:
    """Where torchvision keeps the DEFAULT weights of ``name``: the hub cache, as torchvision names them."""
    file_name = os.path.basename(urlparse(_ARCHS[name].weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _build(
    name: str, num_classes: int, in_channels: int, input_size: int, pretrained: bool, **kwargs: float
) -> nn.Module:
    """Build with torchvision, adapt the input conv, then load cached weights where asked."""
    arch = _ARCHS[name]
    if input_size < arch.min_input_size:
        raise NapkitError(
            f"model {name!r} needs input_size >= {arch.min_input_size}, got {input_size}; "
            f"use a *_small model (alexnet_small, vgg16_small, resnet50_small) for 28x28/32x32 inputs"
        )
    state = _cached_weights(name) if pretrained else None  # fail before allocating the model
    model = arch.builder(weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, arch.first_conv, in_channels)
    if state is not None:
        skip = [arch.classifier] * (num_classes != 1000) + [arch.first_conv] * (in_channels != 3)
        _load_except(model, state, skip, name)
    return model


def _replace_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    """Swap the input conv for one with ``in_channels`` inputs and otherwise the same geometry."""
    old = model.get_submodule(name)
    assert isinstance(old, nn.Conv2d)
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None
    )
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _cached_weights(name: str) -> dict[str, torch.Tensor]:
    """The DEFAULT state dict of ``name`` from the local hub cache, or an error saying how to get it."""
    path = pretrained_path(name)
    if not path.is_file():
        raise NapkitError(
            f"pretrained weights for {name!r} not found at {path} (napkit reads only the local torch hub "
            f"cache); on a connected machine run `python -c \"import torchvision; "
            f"torchvision.models.{name}(weights='DEFAULT')\"` and copy {path.name} into {path.parent} here "
            f"(or set TORCH_HOME to a folder holding hub/checkpoints/{path.name})"
        )
    return load_torch(path)


def _load_except(model: nn.Module, state: dict[str, torch.Tensor], skip: list[str], name: str) -> None:
    """Load ``state`` into ``model`` except the layers named in ``skip`` (new head / input conv)."""
    kept = {k: v for k, v in state.items() if not any(k.startswith(f"{s}.") for s in skip)}
    expected = {k for k in model.state_dict() if not any(k.startswith(f"{s}.") for s in skip)}
    if set(kept) != expected:
        diff = sorted(set(kept) ^ expected)[:5]
        raise NapkitError(
            f"{pretrained_path(name)} does not hold {name!r} weights (mismatched keys, e.g. {diff}); "
            f"delete it and fetch it again"
        )
    model.load_state_dict(kept, strict=False)
