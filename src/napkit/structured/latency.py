"""Measured layer latency as a pruning cost (NetAdapt / HALP-style lookup table).

FLOPs say little about time on a CPU at batch 1: a narrow 1x1 convolution runs at half the GFLOP/s
of a wide one, so a FLOPs-driven allocation buys less speed than it promises. :class:`LatencyTable`
times every Conv2d / Linear of the dense model alone, in its deployment form (TorchScript, frozen,
weights prepacked), on a grid of (output, input) channel counts on the machine it runs on, and
interpolates. :meth:`LatencyTable.saved_ms` is the time one channel's removal saves at a model's
current widths: what :class:`~napkit.structured.pruner.StructuredPruner` divides scores by when
``latency=`` is given, so channels are ranked by loss increase per millisecond saved.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from napkit.errors import NapkitError
from napkit.evaluation.cost import time_ms
from napkit.layers import PrunableLayer, modes_kept, prunable_layers
from napkit.structured.groups import ChannelGroup, in_channels, rows

FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)
MIN_SAVING_MS = 1e-6  # a removal that saves no measurable time ranks last, not undefined


@dataclass(frozen=True)
class _Spec:
    """A layer's configuration apart from its channel counts: layers with equal specs share timings."""

    kind: str  # "conv" or "linear"
    out_dense: int
    in_dense: int  # Conv2d input channels or Linear input features
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    bias: bool
    input_tail: tuple[int, ...]  # input shape after (batch, channels/features)
    batch: int

    def build(self, out: int, inp: int) -> tuple[nn.Module, Tensor]:
        """The layer at ``out`` x ``inp`` channels and an input for it."""
        if self.kind == "linear":
            layer: nn.Module = nn.Linear(inp, out, bias=self.bias)
        else:
            layer = nn.Conv2d(inp, out, self.kernel, self.stride, self.padding, bias=self.bias)  # type: ignore[arg-type]
        return layer.eval(), torch.randn(self.batch, inp, *self.input_tail)


def _spec(layer: PrunableLayer, shape: torch.Size) -> _Spec:
    if isinstance(layer, nn.Linear):
        return _Spec("linear", layer.out_features, layer.in_features, (), (), (), layer.bias is not None,
                     tuple(shape[2:]), int(shape[0]))
    return _Spec("conv", layer.out_channels, layer.in_channels, tuple(layer.kernel_size), tuple(layer.stride),
                 layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                 layer.bias is not None, tuple(shape[2:]), int(shape[0]))


def _counts(dense: int, fractions: tuple[float, ...]) -> list[int]:
    return sorted({max(1, round(f * dense)) for f in fractions})


@torch.inference_mode()
def deployment_form(model: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    """TorchScript trace, frozen (BatchNorm folded) and optimized for CPU inference (weights prepacked).
    TorchScript is deprecated in favour of torch.compile, whose per-model compile is too slow to time
    hundreds of layer shapes; its deprecation warnings are silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model.eval(), x)))


def default_timer(layer: nn.Module, x: Tensor) -> float:
    """Milliseconds of ``layer`` alone in its deployment form."""
    return time_ms(deployment_form(nn.Sequential(layer), x), x)


class LatencyTable:
    """Per-layer latency of a dense model as a function of each layer's (output, input) channel counts.

    Made by :meth:`measure` (``input_shape`` includes the batch size the latency is wanted at) or
    read back by :meth:`from_json`. Every distinct layer configuration is timed once per grid point
    (``fractions`` of its dense output x input counts, by ``timer(layer, x)`` in ms), made
    non-decreasing in both counts (timing noise must not make a removal look like a slow-down) and
    interpolated bilinearly. Layers are looked up by name, so a
    pruned model made from ``dense`` by channel removal is priced by the same table.
    """

    def __init__(self, specs: dict[str, _Spec], grids: dict[_Spec, tuple[Tensor, Tensor, Tensor]]) -> None:
        self.specs, self._grids = specs, grids

    @classmethod
    def measure(
        cls,
        dense: nn.Module,
        input_shape: tuple[int, ...],
        *,
        fractions: tuple[float, ...] = FRACTIONS,
        timer: Callable[[nn.Module, Tensor], float] = default_timer,
        progress: bool = True,
    ) -> LatencyTable:
        """Time every distinct layer configuration of ``dense`` at ``input_shape`` on the grid."""
        if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
            raise NapkitError(f"latency grid fractions must lie in (0, 1], got {fractions}")
        shapes = layer_input_shapes(dense, input_shape)
        specs = {name: _spec(layer, shapes[name]) for name, layer in prunable_layers(dense).items() if name in shapes}
        unique = list(dict.fromkeys(specs.values()))
        points = [(s, o, i) for s in unique for o in _counts(s.out_dense, fractions)
                  for i in _counts(s.in_dense, fractions)]
        ms: dict[tuple[_Spec, int, int], float] = {}
        for spec, out, inp in tqdm(points, desc="latency table", disable=None if progress else True, leave=False):
            ms[(spec, out, inp)] = timer(*spec.build(out, inp))
        grids = {}
        for spec in unique:
            outs, ins = _counts(spec.out_dense, fractions), _counts(spec.in_dense, fractions)
            grid = torch.tensor([[ms[(spec, o, i)] for i in ins] for o in outs], dtype=torch.float64)
            grid = torch.cummax(torch.cummax(grid, 0).values, 1).values
            grids[spec] = (torch.tensor(outs, dtype=torch.float64), torch.tensor(ins, dtype=torch.float64), grid)
        return cls(specs, grids)

    def to_json(self) -> dict[str, Any]:
        """The timed grids and which layer uses which: the table again without re-timing (resume, MLflow)."""
        unique = list(dict.fromkeys(self.specs.values()))
        return {"specs": [dataclasses.asdict(s) for s in unique],
                "layers": {name: unique.index(s) for name, s in self.specs.items()},
                "grids": [{"outs": o.tolist(), "ins": i.tolist(), "ms": g.tolist()}
                          for o, i, g in (self._grids[s] for s in unique)]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyTable:
        """The table :meth:`to_json` wrote."""
        unique = [_Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) for d in data["specs"]]
        grids = {s: (torch.tensor(g["outs"], dtype=torch.float64), torch.tensor(g["ins"], dtype=torch.float64),
                     torch.tensor(g["ms"], dtype=torch.float64)) for s, g in zip(unique, data["grids"])}
        return cls({name: unique[i] for name, i in data["layers"].items()}, grids)

    def layer_ms(self, name: str, out: float, inp: float) -> float:
        """Interpolated milliseconds of layer ``name`` at ``out`` output and ``inp`` input channels/features."""
        if name not in self.specs:
            raise NapkitError(f"layer {name!r} is not in the latency table; it has {sorted(self.specs)}")
        outs, ins, grid = self._grids[self.specs[name]]
        (o0, o1, wo), (i0, i1, wi) = _bracket(outs, out), _bracket(ins, inp)
        top = (1 - wi) * grid[o0, i0] + wi * grid[o0, i1]
        bottom = (1 - wi) * grid[o1, i0] + wi * grid[o1, i1]
        return float((1 - wo) * top + wo * bottom)

    def model_ms(self, model: nn.Module) -> float:
        """Sum of the table's latencies of ``model``'s layers at their current channel counts."""
        return self.modules_ms(model, [n for n in prunable_layers(model) if n in self.specs])

    def modules_ms(self, model: nn.Module, names: list[str]) -> float:
        """Sum of the table's latencies of layers ``names`` of ``model`` at their current channel counts."""
        return sum(self.layer_ms(n, *_units(model.get_submodule(n))) for n in names)

    def floor_ms(self) -> float:
        """The table's time of the dense model with every layer at its smallest grid counts: the part of
        its latency (per-call overhead, memory traffic) that removing channels cannot take away."""
        return sum(float(self._grids[spec][2][0, 0]) for spec in self.specs.values())

    def saved_ms(self, model: nn.Module, group: ChannelGroup) -> float:
        """Milliseconds one channel of ``group`` saves when removed from ``model`` as it is now."""
        saved = 0.0
        for p in group.producers:
            out, inp = _units(model.get_submodule(p))
            saved += self.layer_ms(p, out, inp) - self.layer_ms(p, out - 1, inp)
        for c in group.consumers:
            layer = model.get_submodule(c.name)
            out, inp = _units(layer)
            per_channel = inp / in_channels(layer, c.block)  # Linear after a flatten: H*W features per channel
            saved += self.layer_ms(c.name, out, inp) - self.layer_ms(c.name, out, inp - per_channel)
        return max(saved, MIN_SAVING_MS)


def _units(layer: nn.Module) -> tuple[int, int]:
    """(output channels, input channels or features) of a Conv2d / Linear."""
    return rows(layer), layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels  # type: ignore[union-attr,return-value]


def _bracket(points: Tensor, x: float) -> tuple[int, int, float]:
    """Indices of the grid points around ``x`` and the weight of the upper one (linear beyond the ends)."""
    if len(points) == 1:
        return 0, 0, 0.0
    j = int(torch.searchsorted(points, torch.tensor(x, dtype=torch.float64)).clamp(1, len(points) - 1))
    lo, hi = points[j - 1], points[j]
    return j - 1, j, float((x - lo) / (hi - lo))


def layer_input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, torch.Size]:
    """Input shape every prunable layer sees on an ``input_shape`` forward pass (train/eval modes kept)."""
    seen: dict[str, torch.Size] = {}
    hooks = [m.register_forward_hook(lambda _m, args, _out, n=n: seen.__setitem__(n, args[0].shape))
             for n, m in prunable_layers(model).items()]
    try:
        with modes_kept(model), torch.inference_mode():
            model.eval()(torch.zeros(input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return seen
