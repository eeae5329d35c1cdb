"""Parameter counts, FLOPs (torch's FlopCounterMode) and CPU latency of a model.

Effective FLOPs of a fine-grained sparse model count each prunable layer's FLOPs scaled by its
weight density: what a sparse kernel would execute. Structured pruning makes dense == effective.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from napkit.layers import prunable_layers
from napkit.pruning.masks import MaskSet


def input_shape(in_channels: int, input_size: int, batch: int = 1) -> tuple[int, int, int, int]:
    return (batch, in_channels, input_size, input_size)


@torch.no_grad()
def layer_flops(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward pass and the FLOPs of each prunable layer (by qualified name)."""
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(shape, device=device))
    by_module = counter.get_flop_counts()
    root = type(model).__name__
    per_layer = {}
    for name in prunable_layers(model):
        counts = by_module.get(f"{root}.{name}", {})
        per_layer[name] = int(sum(counts.values()))
    return int(counter.get_total_flops()), per_layer


def cost_summary(model: nn.Module, shape: tuple[int, ...], masks: MaskSet | None = None) -> dict[str, float]:
    """Dense/non-zero parameters and dense/effective FLOPs (batch 1)."""
    total_params = sum(p.numel() for p in model.parameters())
    nonzero = total_params
    flops, per_layer = layer_flops(model, shape)
    effective = flops
    if masks is not None:
        density = masks.layer_density()
        for name, mask in masks.masks.items():
            nonzero -= int(mask.numel() - mask.sum())
            effective -= per_layer.get(name, 0) * (1.0 - density[name])
    return {"params": total_params, "params_nonzero": nonzero, "flops": flops, "flops_effective": int(effective)}


def compare_to_dense(model: nn.Module, dense: nn.Module, shape: tuple[int, ...], masks: MaskSet | None = None,
                     latency_repeats: int | None = None) -> dict[str, float]:
    """Size, FLOPs (and latency if ``latency_repeats``) of a pruned model next to its dense reference."""
    cost, cost_dense = cost_summary(model, shape, masks), cost_summary(dense, shape)
    out = {**cost, "params_dense": cost_dense["params"], "flops_dense": cost_dense["flops"],
           "compression_params": cost_dense["params"] / max(cost["params_nonzero"], 1),
           "flops_reduction": cost_dense["flops"] / max(cost["flops_effective"], 1)}
    if latency_repeats:
        out["latency_ms"] = latency_ms(model, shape, repeats=latency_repeats)
        out["latency_ms_dense"] = latency_ms(dense, shape, repeats=latency_repeats)
    return out


@torch.inference_mode()
def latency_ms(model: nn.Module, shape: tuple[int, ...], *, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock milliseconds of one forward pass on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(shape, device=device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)
