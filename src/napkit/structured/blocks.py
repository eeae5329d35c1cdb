"""Depth from width: a ResNet bottleneck whose inner channels are all pruned becomes its shortcut plus a bias.

When every output channel of a torchvision ``Bottleneck``'s conv1 (or conv2) is removed, the rest of
its residual branch sees an all-zero input (the convs have no bias), so in eval mode the branch
returns one constant per channel: ``bn3(conv3(relu(bn2(conv2(0)))))``, or ``bn3(conv3(0))`` after
conv2. :func:`skip_block` swaps the block for :class:`SkippedBlock`, ``relu(shortcut(x) + shift)``
with that constant as the learnable ``shift``: the same outputs without three convolutions. On a CPU at
batch 1 every layer costs a fixed ~0.1 ms whatever its width, which channel removal cannot take away;
removing the block does. Channel ranking decides when: a block goes when its inner channels are the
cheapest to lose (:class:`~napkit.structured.pruner.StructuredPruner` ``remove_blocks=True``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from napkit.layers import modes_kept

INNER = ("conv1", "conv2")  # producers whose channel group, emptied, removes the block
BRANCH = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")  # what goes with it


class ResidualBias(nn.Module):
    """Adds a learnable per-channel constant to a feature map: the removed branch's output."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.view(1, -1, 1, 1)


class SkippedBlock(nn.Module):
    """A bottleneck without its residual branch: ``relu(shortcut(x) + shift)``.

    ``downsample`` keeps its name, so the shortcut's weights keep their state-dict keys.
    """

    def __init__(self, num_features: int, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample = downsample
        self.shift = ResidualBias(num_features)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.shift(identity))


def bottlenecks(model: nn.Module) -> list[str]:
    """Names of the torchvision bottlenecks of ``model`` that still have their residual branch."""
    return [name for name, m in model.named_modules() if isinstance(m, Bottleneck)]


def skipped_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks already reduced to their shortcut."""
    return [name for name, m in model.named_modules() if isinstance(m, SkippedBlock)]


def block_of(group_id: str, blocks: list[str]) -> str | None:
    """The bottleneck whose branch dies with channel group ``group_id`` (its conv1 or conv2), if any."""
    block, _, layer = group_id.rpartition(".")
    return block if layer in INNER and block in blocks else None


@torch.no_grad()
def branch_constant(block: Bottleneck, emptied: str) -> Tensor:
    """Eval-mode output of ``block``'s branch once producer ``emptied`` (conv1 or conv2) has no channels."""
    with modes_kept(block):
        block.eval()
        ref = block.conv3.weight
        if emptied == "conv1":
            x = torch.zeros(1, block.conv2.in_channels, 1, 1, dtype=ref.dtype, device=ref.device)
            x = block.relu(block.bn2(block.conv2(x)))
        else:
            x = torch.zeros(1, block.conv3.in_channels, 1, 1, dtype=ref.dtype, device=ref.device)
        return block.bn3(block.conv3(x)).flatten()


def skip_block(model: nn.Module, name: str, emptied: str = "conv1") -> None:
    """Replace bottleneck ``name`` of ``model`` (in place) by its shortcut plus the branch's constant."""
    block = model.get_submodule(name)
    if not isinstance(block, Bottleneck):
        raise TypeError(f"{name!r} is a {type(block).__name__}, not a torchvision Bottleneck")
    constant = branch_constant(block, emptied)
    skipped = SkippedBlock(constant.numel(), block.downsample).to(constant.device, constant.dtype)
    skipped.shift.bias.data.copy_(constant)
    skipped.train(block.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, skipped)
