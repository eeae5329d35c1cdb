"""Weight masks for fine-grained pruning, kept exact through training and save/load.

A mask is a boolean tensor shaped like a layer's weight (True = kept). Masked weights are zeroed
in place; during training their gradients are zeroed before the optimizer step and the weights
re-zeroed after it, so momentum and weight decay can never revive them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from napkit.errors import NapkitError
from napkit.layers import prunable_layers


@dataclass
class MaskSet:
    """Boolean keep-masks keyed by the qualified name of a prunable layer."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def dense(cls, model: nn.Module) -> MaskSet:
        """All-ones masks for every prunable layer of ``model``."""
        return cls({n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in prunable_layers(model).items()})

    def _weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        modules = dict(model.named_modules())
        out = {}
        for name, mask in self.masks.items():
            if name not in modules:
                raise NapkitError(f"mask for layer {name!r} does not fit this model (no such layer)")
            weight = modules[name].weight
            if weight.shape != mask.shape:
                raise NapkitError(
                    f"mask for layer {name!r} has shape {tuple(mask.shape)}, the model's weight {tuple(weight.shape)}"
                )
            out[name] = weight
        return out

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zero every masked weight in place."""
        for name, weight in self._weights(model).items():
            weight.mul_(self.masks[name].to(weight.device, weight.dtype))

    @torch.no_grad()
    def mask_grads_(self, model: nn.Module) -> None:
        """Zero the gradients of masked weights (call between backward and optimizer step)."""
        for name, weight in self._weights(model).items():
            if weight.grad is not None:
                weight.grad.mul_(self.masks[name].to(weight.device, weight.grad.dtype))

    def layer_density(self) -> dict[str, float]:
        """Fraction of kept weights per layer."""
        return {n: m.float().mean().item() for n, m in self.masks.items()}

    def counts(self) -> tuple[int, int]:
        """(kept, total) weights over all masked layers."""
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return kept, total

    def sparsity(self) -> float:
        """Fraction of prunable weights removed."""
        kept, total = self.counts()
        return 1.0 - kept / total if total else 0.0

    def clone(self) -> MaskSet:
        return MaskSet({n: m.clone() for n, m in self.masks.items()})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Serialisable form (uint8, since safetensors stores bool too but uint8 is portable)."""
        return {n: m.to(torch.uint8) for n, m in self.masks.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> MaskSet:
        return cls({n: t.bool() for n, t in tensors.items()})
