"""Concatenations: each input a group at its offset, read through BatchNorms, convs and flatten-Linears."""

from __future__ import annotations

import copy

import pytest
import torch
from test_structured import forward, masked
from test_zoo import random_plan, randomize, tiny
from torch import Tensor, nn

from napkit.curvature import estimate_kfac
from napkit.errors import NapkitError
from napkit.structured import (
    CostModel,
    ScoreInputs,
    StructuredPruner,
    apply,
    channel_counts,
    count_flops,
    count_params,
    create_channel_importance,
    prune_channels,
    slim_to,
    trace_groups,
)
from napkit.structured.latency import LatencyTable
from napkit.structured.pruner import compensate_consumers_


class _Nested(nn.Module):
    """cat(cat(a, b) by keywords, c): a BatchNorm and a conv read all three; a Linear reads the 2x2 map."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1)
        self.bn, self.conv = nn.BatchNorm2d(9), nn.Conv2d(9, 5, 3, padding=1)
        self.fc = nn.Linear(9 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        ab = torch.cat(tensors=[torch.relu(self.a(x)), self.b(x)], dim=1)
        y = torch.relu(self.bn(torch.cat([ab, self.c(x)], 1)))
        pooled = nn.functional.adaptive_avg_pool2d(y, 2)
        return self.fc(torch.flatten(pooled, 1)) + self.conv(y).mean((2, 3))[:, :2]


class _Repeated(nn.Module):
    """One map concatenated twice, around another (as Swin's patch merging reads each channel four times): a
    BatchNorm, a conv and a Linear after a flatten read every channel of ``a`` at two offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.bn, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(8 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.a(x))
        y = torch.relu(self.bn(torch.cat([a, self.b(x), a], 1)))
        pooled = nn.functional.adaptive_avg_pool2d(y, 2)
        return self.fc(torch.flatten(pooled, 1)) + self.conv(y).mean((2, 3))[:, :2]


class _Vectors(nn.Module):
    """Two Linear outputs concatenated, through a BatchNorm1d, into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q = nn.Linear(6, 4), nn.Linear(6, 3)
        self.bn, self.out = nn.BatchNorm1d(7), nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.out(torch.relu(self.bn(torch.cat([self.p(x), self.q(x)], 1))))


def _randomized(model: nn.Module) -> nn.Module:
    model = model.double().eval()
    randomize(model, torch.Generator().manual_seed(0))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean = torch.randn(m.num_features, dtype=torch.float64) * 0.1
            m.running_var = torch.rand(m.num_features, dtype=torch.float64) + 0.5
    return model


def test_nested_concatenation_offsets_and_blocks() -> None:
    groups = {g.id: g for g in trace_groups(_Nested()).groups}
    assert list(groups) == ["a", "b", "c"]
    assert [(g, groups[g].windows("bn")[0], groups[g].width("conv")) for g in groups] == [
        ("a", slice(0, 4), 9), ("b", slice(4, 6), 9), ("c", slice(6, 9), 9)]
    assert [(c.name, c.block) for c in groups["b"].consumers] == [("conv", 9), ("fc", 4)]  # fc: a 2x2 map per channel


@pytest.mark.parametrize("make,shape", [(_Nested, (2, 3, 6, 6)), (_Vectors, (4, 6)), (_Repeated, (2, 3, 6, 6))])
def test_cut_equals_masked_and_cost_and_rebuild_are_exact(make: type[nn.Module], shape: tuple[int, ...]) -> None:
    model = _randomized(make())
    gen = torch.Generator().manual_seed(1)
    tracing = trace_groups(model)
    assert len(tracing.groups) >= 2 and all(g.spans for g in tracing.groups)
    plan = random_plan(tracing.groups, gen)
    pruned = apply(model, plan, groups=tracing.groups)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(forward(pruned, x), forward(masked(model, tracing.groups, plan), x), rtol=1e-10,
                               atol=1e-12)
    rebuilt = slim_to(_randomized(make()), channel_counts(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    assert torch.equal(forward(rebuilt, x), forward(pruned, x))
    removed = torch.tensor([g.size - len(plan[g.id]) for g in tracing.groups])
    one, model, pruned = (1, *shape[1:]), model.float(), pruned.float()  # FLOPs are counted on a float input
    cost = CostModel(model, tracing.groups, count_flops(model, one)).cost(removed)
    assert cost == (count_params(pruned), count_flops(pruned, one)[0])


class _Odd(nn.Module):
    """cat along H, cat of one tensor with itself, and two concatenations added part by part."""

    def __init__(self) -> None:
        super().__init__()
        self.h, self.twice = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
        self.p, self.q, self.r, self.s = (nn.Conv2d(3, n, 1) for n in (2, 3, 2, 3))
        self.read_h, self.read_twice, self.read_sum = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        hx = self.h(x)
        h = self.read_h(torch.cat([hx, hx], 2)).mean((2, 3))
        t = self.twice(x)
        twice = self.read_twice(torch.cat([t, t], 1)).mean((2, 3))
        summed = torch.cat([self.p(x), self.q(x)], 1) + torch.cat([self.r(x), self.s(x)], 1)
        return h + twice + self.read_sum(summed).mean((2, 3))


def test_unsupported_concatenations_freeze_only_their_groups() -> None:
    tracing = trace_groups(_Odd())
    groups = {g.id: g for g in tracing.groups}
    assert tracing.unpruned["h"] == ("cat at cat",)  # along H: not a channel concatenation
    assert groups["twice"].windows("read_twice") == (slice(0, 2), slice(2, 4))  # with itself: read at both offsets
    assert (groups["p"].producers, groups["q"].producers) == (("p", "r"), ("q", "s"))  # coupled part by part
    assert groups["q"].windows("read_sum") == (slice(2, 5),)


def test_bn_gamma_takes_each_groups_window() -> None:
    model = _randomized(_Nested())
    groups = trace_groups(model).groups
    scores = create_channel_importance("bn_gamma")(model, groups)
    gamma = model.bn.weight.detach().abs()
    for g in groups:
        torch.testing.assert_close(scores[g.id], gamma[g.windows("bn")[0]])


def test_groups_from_before_a_cut_are_refused() -> None:
    model = _Nested()
    groups = {g.id: g for g in trace_groups(model).groups}
    prune_channels(model, groups["a"], [0, 1])
    with pytest.raises(NapkitError, match="stale: 'bn' reads 7 channels, the group says 9"):
        prune_channels(model, groups["b"], [0])


def test_a_latency_table_without_grouped_convs_is_refused_up_front() -> None:
    model = tiny("resnext").eval()
    table = LatencyTable.measure(model, (1, 3, 32, 32), timer=lambda layer, x: 1.0, progress=False)
    with pytest.raises(NapkitError, match=r"latency table times plain Conv2d and Linear.*layer1\.0\.conv2"):
        StructuredPruner("l1", model, input_shape=(1, 3, 32, 32), step_fraction=0.5, latency=table)


@pytest.mark.parametrize("make", [_Nested, _Repeated])
def test_nap_scores_each_channel_at_its_offset(make: type[nn.Module]) -> None:
    """A channel's compensated NAP score equals the quadratic model's increase at the refit that removing it
    alone applies to every reader of the concatenation: the scores are taken from the right window (from every
    window, jointly, for a channel the concatenation repeats)."""
    torch.manual_seed(0)
    model = make().double().eval()
    x, y = torch.randn(32, 3, 6, 6, dtype=torch.float64), torch.randint(0, 2, (32,))
    factors = {k: f.damped(0.1) for k, f in estimate_kfac(model, [(x, y)], dtype=torch.float64,
                                                         progress=False).items()}
    groups = trace_groups(model).groups
    scores = create_channel_importance("nap", damping=1e-12)(model, groups, ScoreInputs(factors))
    for g in groups:
        for c in range(g.size):
            plan = {g.id: torch.tensor([i for i in range(g.size) if i != c])}
            predicted = compensate_consumers_(copy.deepcopy(model), groups, plan, factors, 1e-12)
            assert float(scores[g.id][c]) == pytest.approx(predicted, rel=1e-5) and predicted > 0
