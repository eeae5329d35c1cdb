"""FLOPs of every Conv2d and Linear of a model, grouped and depthwise convs included.

:func:`napkit.evaluation.cost.layer_flops` reports the layers napkit prunes row by row (plain convs,
Linear); structured pruning also shrinks depthwise convs with their channels, so its cost model
needs their FLOPs too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from napkit.layers import modes_kept
from napkit.structured.attention import ATTENTIONS


@torch.no_grad()
def module_flops(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one eval-mode forward pass of a zero input of ``shape`` and the FLOPs of every
    Conv2d / Linear and every prunable attention without its output projection and the layers whose FLOPs do not
    depend on its heads (by qualified name);
    train/eval modes are restored afterwards."""
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with modes_kept(model):
        model.eval()
        with counter:
            model(torch.zeros(shape, device=device))
    by_module = counter.get_flop_counts()
    root = type(model).__name__

    def flops(name: str) -> int:
        return int(sum(by_module.get(f"{root}.{name}", {}).values()))

    per_layer = {name: flops(name) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    per_layer |= {name: flops(name) - flops(f"{name}.{m.output}") - sum(flops(f"{name}.{c}") for c in m.constant)
                  for name, m in model.named_modules() if isinstance(m, ATTENTIONS)}  # what grows with the heads
    return int(counter.get_total_flops()), per_layer
