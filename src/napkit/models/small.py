"""Small-input (28x28 / 32x32, 1 or 3 channels) AlexNet, VGG-16 and ResNet-50, width-scalable.

Each is a subclass of the torchvision class that inherits its ``forward``, so the module layout
(``features -> avgpool -> flatten -> classifier``, or ResNet's stem and stages) stays torchvision's
and structured pruning can trace it. The subclasses skip the parent ``__init__`` because it would
allocate the 224x224 heads (tens of millions of parameters) only to replace them.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import VGG, AlexNet, ResNet
from torchvision.models.resnet import Bottleneck
from torchvision.models.vgg import cfgs, make_layers

from napkit.errors import NapkitError
from napkit.models import register_model

_MIN_INPUT_SIZE = 8  # three 2x2 pools in alexnet_small


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, round(channels * width))


def _check(name: str, width: float, input_size: int) -> None:
    """Reject a non-positive width or an input too small for the pools."""
    if not width > 0:
        raise NapkitError(f"model {name!r} needs width > 0, got {width!r}")
    if input_size < _MIN_INPUT_SIZE:
        raise NapkitError(f"model {name!r} needs input_size >= {_MIN_INPUT_SIZE}, got {input_size}")


def _init_weights(model: nn.Module, *, linear_std: float | None) -> None:
    """torchvision's VGG/ResNet init: He-normal convs, unit BatchNorm, N(0, linear_std) Linear if given."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


class AlexNetSmall(AlexNet):
    """AlexNet for small inputs: five stride-1 convs (5x5, 5x5, 3x3, 3x3, 3x3), three 2x2 max-pools."""

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int, width: float, dropout: float):
        nn.Module.__init__(self)  # skip AlexNet.__init__ (module docstring)
        c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (64, 192, 384, 256, 256))
        hidden = _scaled(4096, width)
        pooled = input_size // 8
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)  # identity at the nominal size, robust off it
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c5 * pooled * pooled, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )


class VGGSmall(VGG):
    """VGG-16 ("D") for small inputs: ceil-mode pools (28 -> 14 -> 7 -> 4 -> 2 -> 1), 512w-wide head."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float, batch_norm: bool, dropout: float):
        nn.Module.__init__(self)  # skip VGG.__init__ (module docstring)
        channels = [v if v == "M" else _scaled(v, width) for v in cfgs["D"]]
        self.features = make_layers(channels, batch_norm=batch_norm)
        # make_layers assumes RGB input
        self.features[0] = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        hidden = _scaled(512, width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        # PyTorch's default Linear init: torchvision's N(0, 0.01) suits 4096-wide heads, but through
        # three narrow layers it shrinks the signal ~1000x and training stalls at chance
        _init_weights(self, linear_std=None)


class ResNetSmall(ResNet):
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]) for small inputs: 3x3 stride-1 stem, no max-pool."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float, zero_init_residual: bool):
        nn.Module.__init__(self)  # skip ResNet.__init__ (module docstring); set what _make_layer reads
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = _scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # ResNet._forward_impl calls it; 32x32 inputs keep their resolution
        self.layer1 = self._make_layer(Bottleneck, _scaled(64, width), 3)
        self.layer2 = self._make_layer(Bottleneck, _scaled(128, width), 4, stride=2)
        self.layer3 = self._make_layer(Bottleneck, _scaled(256, width), 6, stride=2)
        self.layer4 = self._make_layer(Bottleneck, _scaled(512, width), 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        _init_weights(self, linear_std=None)
        if zero_init_residual:  # torchvision's option: each block starts as identity, trains stably
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)


@register_model
def alexnet_small(
    *, num_classes: int, in_channels: int, input_size: int, width: float = 0.25, dropout: float = 0.5
) -> AlexNetSmall:
    """Small-input AlexNet; ``width`` scales every conv and the hidden Linear width (4096 * width)."""
    _check("alexnet_small", width, input_size)
    return AlexNetSmall(
        num_classes=num_classes, in_channels=in_channels, input_size=input_size, width=width, dropout=dropout
    )


@register_model
def vgg16_small(
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    width: float = 0.25,
    batch_norm: bool = True,
    dropout: float = 0.5,
) -> VGGSmall:
    """Small-input VGG-16; ``width`` scales every conv and the 512-wide head."""
    _check("vgg16_small", width, input_size)
    return VGGSmall(
        num_classes=num_classes, in_channels=in_channels, width=width, batch_norm=batch_norm, dropout=dropout
    )


@register_model
def resnet50_small(
    *, num_classes: int, in_channels: int, input_size: int, width: float = 0.25, zero_init_residual: bool = True
) -> ResNetSmall:
    """Small-input ResNet-50; ``width`` scales the stem and every bottleneck (output 2048 * width)."""
    _check("resnet50_small", width, input_size)
    return ResNetSmall(num_classes=num_classes, in_channels=in_channels, width=width,
                       zero_init_residual=zero_init_residual)
