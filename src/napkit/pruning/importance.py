"""Fine-grained importance criteria behind one interface (Torch-Pruning's Importance split).

A criterion maps a layer's weight to a score of the same shape: the predicted loss increase of
removing that weight (lower = pruned first). Scores of every layer go into one global ranking, so
they must share one scale: the K-FAC criteria use the curvature's single scale convention.
Adding a criterion means adding one small class decorated with ``@register_importance``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from napkit.curvature import KFACFactors
from napkit.errors import NapkitError
from napkit.layers import PrunableLayer
from napkit.registry import Registry

_IMPORTANCES: Registry[type[Importance]] = Registry("pruning criterion")


def register_importance(name: str) -> Callable[[type[Importance]], type[Importance]]:
    """Class decorator: make the criterion available as ``prune.method=<name>``."""
    return _IMPORTANCES.named(name)


def list_importances() -> list[str]:
    return _IMPORTANCES.names()


def create_importance(name: str, **kwargs: object) -> Importance:
    """Instantiate a criterion by name; an unknown name lists the valid ones."""
    return _IMPORTANCES.get(name)(**kwargs)


class Importance(ABC):
    """Score every weight of a layer; higher means more important."""

    name: ClassVar[str]
    needs_curvature: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, name: str, layer: PrunableLayer, factors: KFACFactors | None) -> torch.Tensor:
        """Scores shaped like ``layer.weight``."""


def _matrix(layer: PrunableLayer) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).double()


def _require(name: str, factors: KFACFactors | None) -> KFACFactors:
    """The layer's factors in float64 (inverting float32 factors of a large layer loses precision)."""
    if factors is None:
        raise NapkitError(f"no K-FAC factors for layer {name!r}; run the curvature stage for this model")
    return factors.to(torch.float64)


def _a_diagonal(f: KFACFactors) -> torch.Tensor:
    """diag(A) in either representation (bias coordinate last)."""
    if f.A is not None:
        return f.A.diagonal()
    assert f.A_blocks is not None
    diag = f.A_blocks.diagonal(dim1=-2, dim2=-1).reshape(-1)
    return diag if f.A_bias is None else torch.cat([diag, f.A_bias.reshape(1)])


def live_inputs(f: KFACFactors) -> torch.Tensor:
    """Per column of ``W_h``: 1.0 where the input's second moment ``A_jj`` (undamped) is positive, else 0.0.

    ``A`` sums outer products, so ``A_jj = 0`` exactly when input j was zero on every sample: removing
    its weights then changes no output.
    """
    return (_a_diagonal(f) > 0).double()


@register_importance("magnitude")
class Magnitude(Importance):
    """|w|: the classic baseline (Han et al. 2015)."""

    def __call__(self, name: str, layer: PrunableLayer, factors: KFACFactors | None) -> torch.Tensor:
        return layer.weight.detach().abs().double()


@register_importance("random")
class Random(Importance):
    """Uniform random scores: the floor every criterion must beat."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, name: str, layer: PrunableLayer, factors: KFACFactors | None) -> torch.Tensor:
        return torch.rand(layer.weight.shape, generator=self.generator, dtype=torch.float64)


@register_importance("nap")
class ObsKfac(Importance):
    """NAP's OBS under K-FAC: dL_ij = w_ij^2 / (2 [G^-1]_ii [A^-1]_jj) on pi-damped factors (nap.md s.2).

    A weight whose input is zero on every sample (``A_jj = 0``: a dead ReLU unit, a removed channel)
    scores exactly 0, its true cost; damping alone would score it ``w^2 delta / (2 [G^-1]_ii)``.
    """

    needs_curvature = True

    def __init__(self, damping: float = 0.1) -> None:
        self.damping = damping

    def __call__(self, name: str, layer: PrunableLayer, factors: KFACFactors | None) -> torch.Tensor:
        undamped = _require(name, factors)
        f = undamped.damped(self.damping)
        w = _matrix(layer)
        g_inv = f.g_inv_diag().double()
        a_inv = f.a_inv_diag().double()[: w.shape[1]]
        scores = w.square() / (2.0 * g_inv[:, None] * a_inv[None, :])
        return (scores * live_inputs(undamped)[None, : w.shape[1]]).reshape(layer.weight.shape)


@register_importance("nap_obd")
class ObdKfac(Importance):
    """OBD under K-FAC (no inverse): 0.5 w_ij^2 G_ii A_jj, for ablation against OBS."""

    needs_curvature = True

    def __init__(self, damping: float = 0.1) -> None:
        self.damping = damping

    def __call__(self, name: str, layer: PrunableLayer, factors: KFACFactors | None) -> torch.Tensor:
        f = _require(name, factors).damped(self.damping)
        w = _matrix(layer)
        g = f.G.diagonal().double()
        a = _a_diagonal(f).double()[: w.shape[1]]
        return (0.5 * w.square() * g[:, None] * a[None, :]).reshape(layer.weight.shape)
