"""Parameter counts, FLOPs (torch's FlopCounterMode) and CPU latency of a model.

Effective FLOPs of a fine-grained sparse model count each prunable layer's FLOPs scaled by its
weight density: what a sparse kernel would execute. Structured pruning makes dense == effective.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
def time_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor, *, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall-clock milliseconds of ``fn(x)`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.inference_mode()
def latency_ms(model: nn.Module, shape: tuple[int, ...], *, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock milliseconds of one forward pass on the model's device (CUDA synchronised after
    every call, so each timing ends when the GPU is done)."""
    model.eval()
    device = next(model.parameters()).device
    if device.type != "cuda":
        return time_ms(model, torch.randn(shape, device=device), warmup=warmup, repeats=repeats)

    def synced(x: torch.Tensor) -> None:
        model(x)
        torch.cuda.synchronize()

    torch.cuda.synchronize()
    return time_ms(synced, torch.randn(shape, device=device), warmup=warmup, repeats=repeats)
