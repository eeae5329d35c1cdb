"""The layer latency table: interpolation, the per-channel saving, and latency-aware channel ranking."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from napkit.errors import NapkitError
from napkit.evaluation.cost import time_ms
from napkit.layers import prunable_layers
from napkit.models import create_model
from napkit.structured import StructuredPruner, apply, channel_counts, channel_groups
from napkit.structured.latency import LatencyTable, deployment_form

SIZE = 32
SHAPE = (1, 3, SIZE, SIZE)


def small(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=3, input_size=SIZE, width=0.125)


def bilinear_ms(layer: nn.Module, x: Tensor) -> float:
    """A fake timer, bilinear in (output, input) counts with a per-layer-kind slope: bilinear
    interpolation of a grid must reproduce it exactly, everywhere."""
    out, inp = (layer.out_features, layer.in_features) if isinstance(layer, nn.Linear) else \
        (layer.out_channels, layer.in_channels)
    rate = 1e-3 * x[0].numel() / inp  # spatial size: conv layers at high resolution cost more per channel pair
    return rate * out * inp + 0.01 * out + 0.02 * inp + 0.05


def true_ms(model: nn.Module) -> float:
    """The fake timer summed over the model's layers at the shapes they really see."""
    times: list[float] = []
    hooks = [m.register_forward_hook(lambda m, args, _out: times.append(bilinear_ms(m, args[0])))
             for m in prunable_layers(model).values()]
    with torch.no_grad():
        model.eval()(torch.zeros(SHAPE))
    for h in hooks:
        h.remove()
    return sum(times)


@pytest.mark.parametrize("name", ["vgg16_small", "resnet50_small"])
def test_table_reproduces_a_bilinear_timer_on_pruned_models(name: str) -> None:
    dense = small(name)
    table = LatencyTable.measure(dense, SHAPE, timer=bilinear_ms, progress=False)
    assert table.model_ms(dense) == pytest.approx(true_ms(dense), rel=1e-9)
    gen = torch.Generator().manual_seed(1)
    groups = channel_groups(dense)
    plan = {g.id: torch.randperm(g.size, generator=gen)[: max(1, g.size // 3)].sort().values for g in groups}
    pruned = apply(dense, plan, groups=groups)
    assert table.model_ms(pruned) == pytest.approx(true_ms(pruned), rel=1e-9)
    # one channel's saving is the exact time difference of removing it (every group, coupled ones included)
    for g in channel_groups(pruned)[:: max(1, len(groups) // 8)]:
        if g.size < 2:
            continue
        fewer = apply(pruned, {g.id: torch.arange(g.size - 1)})
        assert table.saved_ms(pruned, g) == pytest.approx(true_ms(pruned) - true_ms(fewer), rel=1e-6)


def test_noisy_timings_never_make_a_removal_a_slow_down() -> None:
    dense = small("alexnet_small")
    gen = torch.Generator().manual_seed(0)

    def noisy(layer: nn.Module, x: Tensor) -> float:
        return bilinear_ms(layer, x) * float(0.2 + 1.6 * torch.rand(1, generator=gen))

    table = LatencyTable.measure(dense, SHAPE, timer=noisy, progress=False)
    for g in channel_groups(dense):
        assert table.saved_ms(dense, g) > 0
    for _outs, _ins, grid in table._grids.values():
        assert bool((grid.diff(dim=0) >= 0).all()) and bool((grid.diff(dim=1) >= 0).all())


def test_latency_ranking_removes_the_channels_that_cost_the_most_time() -> None:
    """Scores in [0, 1) (random) over a table where the first conv's channels cost 100x more time: the
    latency-aware ranking takes that layer to its floor first; the plain ranking barely touches it."""
    dense = small("vgg16_small")
    slow = "features.0"  # the only conv that reads <= 3 input channels on the grid below

    def skewed(layer: nn.Module, x: Tensor) -> float:
        first = isinstance(layer, nn.Conv2d) and layer.in_channels <= 3
        return bilinear_ms(layer, x) * (100.0 if first else 1.0)

    table = LatencyTable.measure(dense, SHAPE, fractions=(1.0, 0.5), timer=skewed, progress=False)
    kwargs = {"input_shape": SHAPE, "step_fraction": 0.05, "allocation": "global"}
    with_table = channel_counts(StructuredPruner("random", dense, latency=table, **kwargs)(dense, 1))
    without = channel_counts(StructuredPruner("random", dense, **kwargs)(dense, 1))
    assert with_table[slow] == 1  # its floor (max_group_sparsity 0.9 of 8 channels)
    assert without[slow] > with_table[slow]


def test_real_timer_prices_a_small_model() -> None:
    """The default timer (TorchScript, frozen) runs and gives positive, size-ordered figures."""
    dense = small("alexnet_small")
    table = LatencyTable.measure(dense, SHAPE, fractions=(1.0, 0.25), progress=False)
    groups = channel_groups(dense)
    quarter = apply(dense, {g.id: torch.arange(max(1, g.size // 4)) for g in groups}, groups=groups)
    assert 0 < table.model_ms(quarter) < table.model_ms(dense)
    x = torch.randn(SHAPE)
    assert time_ms(deployment_form(dense, x), x, repeats=3) > 0


def test_bad_latency_options_fail_clearly() -> None:
    dense = small("alexnet_small")
    with pytest.raises(NapkitError, match=r"fractions must lie in \(0, 1\]"):
        LatencyTable.measure(dense, SHAPE, fractions=(1.0, 0.0), timer=bilinear_ms, progress=False)
    table = LatencyTable.measure(dense, SHAPE, fractions=(1.0, 0.5), timer=bilinear_ms, progress=False)
    with pytest.raises(NapkitError, match="already ranks per FLOP"):
        StructuredPruner("nap_per_flop", dense, input_shape=SHAPE, step_fraction=0.5, latency=table,
                         factors_provider=lambda m, i: {})
    with pytest.raises(NapkitError, match="not in the latency table"):
        table.layer_ms("no.such.layer", 4, 4)


def test_floor_is_the_model_at_the_smallest_grid_widths() -> None:
    dense = small("alexnet_small")
    table = LatencyTable.measure(dense, SHAPE, fractions=(1.0, 0.5), timer=bilinear_ms, progress=False)
    groups = channel_groups(dense)
    half = apply(dense, {g.id: torch.arange(max(1, round(g.size / 2))) for g in groups}, groups=groups)
    # the floor also halves the input and the logits, which no channel group can shrink
    assert table.floor_ms() < table.model_ms(half) < table.model_ms(dense)


def test_table_survives_json_exactly() -> None:
    """What a resumed prune stage reads back prices every model and every removal as the original did."""
    dense = small("resnet50_small")
    gen = torch.Generator().manual_seed(0)

    def noisy(layer: nn.Module, x: Tensor) -> float:
        return bilinear_ms(layer, x) * float(0.5 + torch.rand(1, generator=gen))

    table = LatencyTable.measure(dense, SHAPE, fractions=(1.0, 0.5, 0.25), timer=noisy, progress=False)
    back = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    groups = channel_groups(dense)
    pruned = apply(dense, {g.id: torch.arange(max(1, g.size // 3)) for g in groups}, groups=groups)
    assert back.model_ms(pruned) == table.model_ms(pruned)
    assert back.floor_ms() == table.floor_ms()
    for g in channel_groups(pruned):
        assert back.saved_ms(pruned, g) == table.saved_ms(pruned, g)
