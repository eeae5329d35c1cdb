"""Which layers napkit prunes and measures: Linear and plain Conv2d (no groups, no dilation) weight by weight;
grouped and depthwise convs too when it removes channels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

PrunableLayer = nn.Linear | nn.Conv2d


def is_prunable(module: nn.Module) -> bool:
    """Linear layers and Conv2d layers without groups or dilation (nap.md, Notation)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and tuple(module.dilation) == (1, 1)
    return False


def is_depthwise(module: nn.Module) -> bool:
    """A Conv2d with one filter per channel: output channel c reads input channel c only. A plain conv
    (groups 1) pruned to one output channel of a one-channel input is not one: it stays a producer."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def is_grouped(module: nn.Module) -> bool:
    """A grouped Conv2d (1 < groups, not depthwise) without dilation, which napkit prunes group-evenly."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module)
            and tuple(module.dilation) == (1, 1))


def prunable_layers(model: nn.Module) -> dict[str, PrunableLayer]:
    """Map qualified name -> layer for every prunable layer, in module order."""
    return {name: m for name, m in model.named_modules() if is_prunable(m)}  # type: ignore[misc]


def classifier_name(model: nn.Module) -> str:
    """Name of the layer that produces the logits: the last Linear layer in module order."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear classifier layer")
    return names[-1]


def weight_matrix_shape(layer: PrunableLayer) -> tuple[int, int]:
    """(d_out, d_in) of the layer's weight viewed as a matrix (conv: order c, kh, kw)."""
    w = layer.weight
    return w.shape[0], w[0].numel()


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that may switch ``model``'s submodules between train and eval; restore every mode after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
