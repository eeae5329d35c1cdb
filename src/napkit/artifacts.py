"""Model artifacts: an architecture description (JSON) plus weights (safetensors), no pickled code.

``model.json`` holds the registry name and builder kwargs together with the data shape the model
was built for (and, after structured pruning, every producer layer's channel count); ``model.safetensors`` holds the state dict; ``masks.safetensors`` (optional) holds
fine-grained keep-masks. Any stage rebuilds the model from these three files alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from napkit.errors import NapkitError
from napkit.io import load_tensors, read_json, save_tensors, write_json
from napkit.models import create_model
from napkit.pruning.masks import MaskSet
from napkit.structured.surgery import channel_counts, slim_to

MODEL_JSON, MODEL_WEIGHTS, MASKS = "model.json", "model.safetensors", "masks.safetensors"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: builder name and kwargs, and the data shape."""

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, int] | None = None  # per-producer channel counts of a structurally pruned model

    def build(self) -> nn.Module:
        """The dense architecture, slimmed to ``channels`` when the model was pruned structurally."""
        model = create_model(self.name, num_classes=self.num_classes, in_channels=self.in_channels,
                             input_size=self.input_size, **self.kwargs)
        return model if self.channels is None else slim_to(model, self.channels)

    def with_channels_of(self, model: nn.Module) -> ModelSpec:
        """This spec describing ``model``'s (possibly pruned) channel counts."""
        return replace(self, channels=channel_counts(model))


def save_model(out_dir: Path, model: nn.Module, spec: ModelSpec, masks: MaskSet | None = None) -> None:
    """Write model.json, model.safetensors and (if given) masks.safetensors atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(out_dir / MODEL_WEIGHTS, model.state_dict())
    if masks is not None:
        save_tensors(out_dir / MASKS, masks.to_tensors())
    write_json(out_dir / MODEL_JSON, asdict(spec))


def load_model(in_dir: Path) -> tuple[nn.Module, ModelSpec, MaskSet | None]:
    """Rebuild a saved model; a state dict that does not fit the architecture names the mismatch."""
    spec = ModelSpec(**read_json(in_dir / MODEL_JSON))
    model = spec.build()
    state = load_tensors(in_dir / MODEL_WEIGHTS)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise NapkitError(
            f"{in_dir / MODEL_WEIGHTS} does not fit model {spec.name!r}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise NapkitError(
                f"{in_dir / MODEL_WEIGHTS} does not fit model {spec.name!r}: {key} has shape "
                f"{tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)
    masks = MaskSet.from_tensors(load_tensors(in_dir / MASKS)) if (in_dir / MASKS).is_file() else None
    if masks is not None:
        masks.apply_(model)
    return model, spec, masks
