"""LeNet-5-sized conv net for 28x28 grey inputs (the classic MNIST benchmark for fine-grained pruning).

conv 6@5x5 (padding 2) -> ReLU -> 2x2 max-pool -> conv 16@5x5 -> ReLU -> 2x2 max-pool
-> fc 120 -> ReLU -> fc 84 -> ReLU -> fc ``num_classes``: 61.7k weights at 28x28, almost all
in the first fully connected layer (400 x 120), which makes the per-layer ratios interesting.
"""

from __future__ import annotations

from torch import nn

from napkit.errors import NapkitError
from napkit.models import register_model


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; ``features -> flatten -> classifier``."""

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = ((input_size // 2) - 4) // 2
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@register_model
def lenet5(*, num_classes: int, in_channels: int, input_size: int) -> LeNet5:
    """LeNet-5 for small grey (or colour) inputs; needs ``input_size >= 12``."""
    if input_size < 12:
        raise NapkitError(f"model 'lenet5' needs input_size >= 12, got {input_size}")
    return LeNet5(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
