"""Where a consumer's input channels live: the weight blocks (and K-FAC factor keys) of their columns.

A plain layer reads every channel through one ``W_h``. A grouped conv reads channel block k only
through conv group k's weight rows, so its columns, factors, scores and refits are per group.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from napkit.curvature import group_key, group_weight, weight_with_bias
from napkit.layers import is_grouped
from napkit.structured.groups import Consumer


@dataclass(frozen=True)
class ConsumerBlock:
    """One weight block of a consumer: its factor ``key``, ``W_h`` (bias last), the weight ``rows`` it
    covers and the consumer's input ``channels`` whose columns it holds (``channels`` many, in order)."""

    key: str
    weight: Tensor
    rows: slice
    channels: slice


def consumer_blocks(model: nn.Module, consumer: Consumer) -> list[ConsumerBlock]:
    """The consumer's weight blocks in channel order: one for a plain layer, one per group of a grouped conv."""
    layer = model.get_submodule(consumer.name)
    if not is_grouped(layer):
        w = weight_with_bias(layer)  # type: ignore[arg-type]
        return [ConsumerBlock(consumer.name, w, slice(0, w.shape[0]), slice(0, layer.weight[0].numel() // consumer.block))]
    g = layer.groups
    o, c = layer.out_channels // g, layer.in_channels // g
    return [ConsumerBlock(group_key(consumer.name, k), group_weight(layer, k), slice(k * o, (k + 1) * o),
                          slice(k * c, (k + 1) * c)) for k in range(g)]
