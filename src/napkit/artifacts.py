"""Model artifacts: an architecture description (JSON) plus weights (safetensors), no pickled code.

``model.json`` holds the registry name and builder kwargs together with the data shape the model
was built for (and, after structured pruning, every producer layer's channel count); ``model.safetensors`` holds the state dict; ``masks.safetensors`` (optional) holds
fine-grained keep-masks. Any stage rebuilds the model from these three files alone.

The three form one set: ``model.json`` is written last and lists the sha256 of the others
(``files``), so a reader refuses a set a killed writer left mixed (new weights, old masks). The
tensor files are first written completely under temporary names and only then renamed into place
(milliseconds), so a kill during the long writes leaves the previous set whole. Weights with NaN or
Inf are refused on save and on load, naming the tensor.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from napkit import io
from napkit.errors import NapkitError
from napkit.io import check_finite, load_tensors, read_json, write_json
from napkit.layers import prunable_layers
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


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(out_dir: Path, model: nn.Module, spec: ModelSpec, masks: MaskSet | None = None) -> None:
    """Write model.safetensors, (if given) masks.safetensors, then model.json listing their hashes.

    Both tensor files are written whole under temporary names before either replaces its old copy.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {MODEL_WEIGHTS: model.state_dict()}
    if masks is not None:
        parts[MASKS] = masks.to_tensors()
    check_finite(parts[MODEL_WEIGHTS], f"{out_dir / MODEL_WEIGHTS} (not written)")
    files: dict[str, str] = {}
    with ExitStack() as renames:  # leaving it renames every finished temporary file into place
        for name, tensors in parts.items():
            tmp = renames.enter_context(io.atomic_path(out_dir / name))
            save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))
            files[name] = sha256(tmp)
    write_json(out_dir / MODEL_JSON, {**asdict(spec), "files": files})


def _checked_files(in_dir: Path, saved: dict[str, Any]) -> dict[str, str]:
    """The set's ``files`` (name -> sha256), each present with that hash; else one line saying to rerun."""
    files = saved.get("files")
    if not isinstance(files, dict) or MODEL_WEIGHTS not in files:
        raise NapkitError(f"{in_dir / MODEL_JSON} lists no file hashes (an incomplete set, or written by an "
                          "older napkit); rerun the stage that writes it")
    for name, digest in files.items():
        if not (in_dir / name).is_file() or sha256(in_dir / name) != digest:
            state = "does not match the sha256 in model.json" if (in_dir / name).is_file() else "is missing"
            raise NapkitError(f"{in_dir / name} {state}: an incomplete output set (a run was killed while "
                              "writing it); rerun the stage that writes it")
    return files


def load_model(in_dir: Path) -> tuple[nn.Module, ModelSpec, MaskSet | None]:
    """Rebuild a saved model; a state dict that does not fit the architecture names the mismatch.

    Refused: a set whose files do not match model.json's hashes, weights with NaN / Inf, and masks
    that leave a prunable layer out (it would be fine-tuned dense).
    """
    saved = read_json(in_dir / MODEL_JSON)
    files = _checked_files(in_dir, saved)
    spec = ModelSpec(**{k: v for k, v in saved.items() if k != "files"})
    model = spec.build()
    state = load_tensors(in_dir / MODEL_WEIGHTS)
    check_finite(state, str(in_dir / MODEL_WEIGHTS))
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
    masks = MaskSet.from_tensors(load_tensors(in_dir / MASKS)) if MASKS in files else None
    if masks is not None:
        missing = [n for n in prunable_layers(model) if n not in masks.masks]
        if missing:
            raise NapkitError(f"{in_dir / MASKS} has no mask for layer(s) {', '.join(missing[:3])} (it would "
                              "be trained dense); rerun the stage that writes it")
        masks.apply_(model)
    return model, spec, masks
