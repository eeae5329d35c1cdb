"""Which layers K-FAC covers: grouped convs (one factor pair per conv group), and layers that never run as modules."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from napkit.curvature import LayersNotRunWarning, estimate_kfac, group_key, group_weight, sample_labels
from napkit.errors import NapkitError


class _GroupedNet(nn.Module):
    """conv -> ReLU -> grouped 3x3 conv (2 groups, bias, stride 2) -> ReLU -> linear, float64."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.conv, self.gc = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, groups=2)
        out = (size - 3) // 2 + 1
        self.fc = nn.Linear(6 * out * out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.gc(torch.relu(self.conv(x)))).flatten(1))


def test_group_factors_are_the_exact_fisher_blocks_for_one_example_at_one_position() -> None:
    torch.manual_seed(0)
    model = _GroupedNet(3).double()  # a 3x3 input: one output position of the grouped conv
    x, y = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.tensor([2])
    factors = estimate_kfac(model, [(x, y)], fisher="empirical", dtype=torch.float64, progress=False)
    assert {k for k in factors if k.startswith("gc")} == {"gc#0", "gc#1"}
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    gw, gb = torch.autograd.grad(loss, [model.gc.weight, model.gc.bias])
    for k in range(2):
        f = factors[group_key("gc", k)]
        grad = torch.cat([gw[3 * k : 3 * k + 3].reshape(3, -1), gb[3 * k : 3 * k + 3, None]], 1).reshape(-1)
        torch.testing.assert_close(torch.kron(f.G, f.A), torch.outer(grad, grad), rtol=1e-10, atol=1e-12)
        assert (f.d_out, f.d_in_h) == tuple(group_weight(model.gc, k).shape) == (3, 19)


def test_group_factors_match_explicit_sums_over_examples_and_positions() -> None:
    torch.manual_seed(1)
    model = _GroupedNet(6).double().eval()  # T = 4 output positions
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    loader = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.zeros(2, dtype=torch.long))]
    factors = estimate_kfac(model, loader, fisher="true", seed=3, dtype=torch.float64, chunk_size=3, progress=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        labels = torch.cat([sample_labels(model(b), gen) for b, _ in loader])
    a_sum = torch.zeros(2, 19, 19, dtype=torch.float64)
    g_sum = torch.zeros(2, 3, 3, dtype=torch.float64)
    for n in range(6):
        h = torch.relu(model.conv(x[n : n + 1])).detach()
        out = model.gc(h)
        out.retain_grad()
        nn.functional.cross_entropy(model.fc(torch.relu(out).flatten(1)), labels[n : n + 1], reduction="sum").backward()
        for k in range(2):
            for i in range(2):
                for j in range(2):
                    patch = h[0, 2 * k : 2 * k + 2, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1)
                    a = torch.cat([patch, torch.ones(1, dtype=torch.float64)])
                    a_sum[k] += torch.outer(a, a)
                    g = out.grad[0, 3 * k : 3 * k + 3, i, j]
                    g_sum[k] += torch.outer(g, g)
    for k in range(2):
        f = factors[group_key("gc", k)]
        torch.testing.assert_close(f.A, a_sum[k] / 24, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.G, g_sum[k] / 6, rtol=1e-10, atol=1e-12)
        assert f.num_samples == 6 and f.positions == 4


class _WithUnusedHead(nn.Module):
    """A model with a Linear whose weight is used functionally (as attention's out_proj is) and an
    auxiliary head that only runs in training mode (GoogLeNet, Inception)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.proj, self.aux, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = nn.functional.linear(h, self.proj.weight, self.proj.bias)
        out = self.fc2(h)
        return out + self.aux(h) if self.training else out


def test_layers_that_do_not_run_as_modules_are_left_out_with_a_warning() -> None:
    model, x = _WithUnusedHead(), torch.randn(8, 4)
    with pytest.warns(LayersNotRunWarning, match="proj, aux"):
        factors = estimate_kfac(model, [(x, torch.zeros(8, dtype=torch.long))], progress=False)
    assert set(factors) == {"fc1", "fc2"}
    assert model.training  # the modes are restored
    with warnings.catch_warnings(), pytest.raises(NapkitError, match=r"\['proj'\] did not run"):
        warnings.simplefilter("error")
        estimate_kfac(model, [(x, torch.zeros(8, dtype=torch.long))], layers={"fc1": model.fc1, "proj": model.proj},
                      progress=False)


def test_a_factor_file_may_lack_only_the_layers_it_records_as_not_run(tmp_path) -> None:
    from napkit.curvature import load_factors, model_fingerprint, save_factors
    from napkit.curvature.storage import not_run

    model, x = _WithUnusedHead().eval(), torch.randn(8, 4)
    with pytest.warns(LayersNotRunWarning):
        factors = estimate_kfac(model, [(x, torch.zeros(8, dtype=torch.long))], progress=False)
    assert not_run(model, factors) == ["aux", "proj"]
    save_factors(tmp_path / "ok.safetensors", factors, {"not_run": not_run(model, factors)})
    assert set(load_factors(tmp_path / "ok.safetensors", model)[0]) == {"fc1", "fc2"}
    save_factors(tmp_path / "bad.safetensors", factors, {"not_run": ["aux"]})
    with pytest.raises(NapkitError, match="has no factors for layer 'proj'"):
        load_factors(tmp_path / "bad.safetensors", model)
    grouped = _GroupedNet(3).eval()
    factors = estimate_kfac(grouped, [(torch.randn(2, 2, 3, 3), torch.zeros(2, dtype=torch.long))], progress=False)
    save_factors(tmp_path / "grouped.safetensors", factors, {})
    loaded, meta = load_factors(tmp_path / "grouped.safetensors", grouped)
    assert set(loaded) == {"conv", "gc#0", "gc#1", "fc"} and meta["fingerprint"] == model_fingerprint(grouped)
    with pytest.raises(NapkitError, match="does not match the model at layer 'gc#0'"):
        load_factors(tmp_path / "grouped.safetensors", _GroupedNetWide())


class _GroupedNetWide(_GroupedNet):
    """The same layer names, but a grouped conv of another shape."""

    def __init__(self) -> None:
        super().__init__(3)
        self.gc = nn.Conv2d(4, 8, 3, stride=2, groups=2)
        self.fc = nn.Linear(8, 3)


def test_fine_grained_nap_leaves_layers_without_factors_unpruned() -> None:
    from napkit.pruning.fine_grained import FineGrainedPruner
    from napkit.pruning.importance import create_importance
    from napkit.pruning.masks import MaskSet

    torch.manual_seed(0)
    model, x = _WithUnusedHead().eval(), torch.randn(32, 4)
    before = model.proj.weight.detach().clone()

    def factors(m: nn.Module, iteration: int) -> dict:
        with pytest.warns(LayersNotRunWarning):
            return estimate_kfac(m, [(x, torch.zeros(32, dtype=torch.long))], progress=False)

    pruner = FineGrainedPruner(create_importance("nap"), step_fraction=0.5, target=None, compensation="exact",
                               factors=factors)
    model, masks = pruner(model, MaskSet.dense(model), 1)
    assert bool(masks.masks["proj"].all()) and torch.equal(model.proj.weight, before)
    assert not bool(masks.masks["fc1"].all())  # the others were pruned, and the step's prediction is whole
    assert set(pruner.last_predicted) <= {"fc1", "fc2"} and pruner.last_predicted_increase > 0


# --- NAP channel scores and consumer refits through grouped convs -------------------------------


class _TinyResNeXt(nn.Module):
    """stem -> 1x1 -> grouped 3x3 (2 groups) -> 1x1, a residual sum, pooled linear head (BatchNorm throughout)."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.stem, self.reduce, self.grouped = cbr(3, 8, 3), cbr(8, 8, 1), cbr(8, 8, 3, groups=2)
        self.expand = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.expand(self.grouped(self.reduce(h))))
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny_resnext() -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = _TinyResNeXt().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features) + 0.5
            m.running_mean.data = torch.randn(m.num_features) * 0.1
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    factors = estimate_kfac(model, [(x, y)], dtype=torch.float64, progress=False)
    return model, x, y, factors


def test_nap_prunes_through_grouped_convs_and_the_cut_model_equals_the_refit_one(tiny_resnext: tuple) -> None:
    import copy

    from napkit.structured import StructuredPruner, channel_groups
    from napkit.structured.pruner import compensate_consumers_

    model, x, _, factors = tiny_resnext
    groups = {g.id: g for g in channel_groups(model)}
    assert groups["reduce.0"].fold == 2 and groups["grouped.0"].fold == 2  # both spaces of the grouped conv
    pruner = StructuredPruner("nap", model, input_shape=(1, 3, 8, 8), step_fraction=0.5,
                              factors_provider=lambda m, i: factors)
    pruned = pruner(copy.deepcopy(model), 1)
    assert pruned.grouped[0].in_channels < 8 and pruned.grouped[0].groups == 2  # pruned group-evenly
    masked = copy.deepcopy(model)
    predicted = compensate_consumers_(masked, list(groups.values()), pruner.last_plan, factors, pruner.damping)
    assert predicted == pytest.approx(pruner.last_predicted_increase, rel=1e-9) and predicted > 0
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_grouped_consumer_scores_price_the_refit_the_pruner_applies(tiny_resnext: tuple) -> None:
    """A channel's compensated NAP score at the grouped conv equals the quadratic model's increase at the
    per-group refit that removing the channel applies."""
    import copy

    from napkit.structured import ScoreInputs, channel_groups, create_channel_importance
    from napkit.structured.pruner import compensate_consumers_

    model, _, _, factors = tiny_resnext
    damped = {k: f.damped(0.1) for k, f in factors.items()}
    groups = channel_groups(model)
    group = next(g for g in groups if g.id == "reduce.0")
    only_grouped = type(group)(group.id, group.size, group.producers, group.norms, group.consumers)
    scores = create_channel_importance("nap", damping=1e-12)(model, [only_grouped], ScoreInputs(damped))[group.id]
    for c in range(group.size):
        plan = {group.id: torch.tensor([i for i in range(group.size) if i != c])}
        predicted = compensate_consumers_(copy.deepcopy(model), [only_grouped], plan, damped, 1e-12)
        assert float(scores[c]) == pytest.approx(predicted, rel=1e-5) and predicted > 0
