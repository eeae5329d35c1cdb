"""Weights for a built model: a user's file (safetensors, or a torch state dict read with
``weights_only=True``) or torchvision's pretrained weights, read from the local torch hub cache only
(napkit never downloads: runs stay offline-safe and reproducible).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from napkit.errors import NapkitError
from napkit.io import load_tensors, load_torch

_NESTED = ("state_dict", "model", "model_state_dict")  # where training scripts often keep the state dict


def read_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a .safetensors file, or a torch file holding a state dict (possibly
    under a ``state_dict`` / ``model`` key), loaded with ``weights_only=True``."""
    p = Path(path)
    state = load_tensors(p) if p.suffix == ".safetensors" else load_torch(p)
    for key in _NESTED:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NapkitError(f"model weights file {p} holds no state dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` (in place); a mismatch names the keys."""
    load_state(model, read_state(path), str(path))
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str,
               skip_mismatched: bool = False) -> None:
    """Load ``state`` strictly; with ``skip_mismatched``, layers whose shapes differ (a new head or
    input conv) keep their fresh initialisation. Every other difference raises NapkitError."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or (shapes and not skip_mismatched):
        raise NapkitError(
            f"weights {source} do not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {shapes[:5]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in shapes}, strict=False)


def torchvision_weights(model_name: str, weights: str) -> WeightsEnum:
    """The weights enum ``weights`` ("DEFAULT", "IMAGENET1K_V2" or "ResNet18_Weights.IMAGENET1K_V1")
    of torchvision model ``model_name``."""
    enum = torchvision.models.get_model_weights(model_name)
    member = weights.rpartition(".")[2]
    if weights.count(".") > 1 or (weights.count(".") == 1 and weights.split(".")[0] != enum.__name__):
        raise NapkitError(f"model.weights={weights!r} is not a weight of {model_name!r}; valid: DEFAULT, "
                          f"{', '.join(w.name for w in enum)} (or {enum.__name__}.<name>)")
    if member == "DEFAULT":
        return enum.DEFAULT  # type: ignore[attr-defined]
    try:
        return enum[member]
    except KeyError:
        raise NapkitError(f"model.weights={weights!r} is not a weight of {model_name!r}; valid: DEFAULT, "
                          f"{', '.join(w.name for w in enum)}") from None


def hub_path(weights: WeightsEnum) -> Path:
    """Where torchvision keeps ``weights``: the hub cache, under the file name of their URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def cached_state(model_name: str, weights: str) -> dict[str, torch.Tensor]:
    """Pretrained state dict of a torchvision model from the local hub cache, or an error saying how
    to get it there."""
    enum = torchvision_weights(model_name, weights)
    path = hub_path(enum)
    if not path.is_file():
        raise NapkitError(
            f"pretrained weights {type(enum).__name__}.{enum.name} not found at {path} (napkit reads only the "
            f"local torch hub cache); on a connected machine run `python -c \"import torchvision; "
            f"torchvision.models.get_model('{model_name}', weights='{type(enum).__name__}.{enum.name}')\"` and "
            f"copy {path.name} into {path.parent} here (or set TORCH_HOME to a folder holding hub/checkpoints)"
        )
    return load_torch(path)
