"""Joint OBS compensation (issue #20): brute-force constrained minimisers on tiny layers, measured loss
increases on a tiny trained CNN, and the structured consumer-side score and compensation."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torchvision.models import DenseNet

from napkit.curvature import KFACFactors, estimate_kfac
from napkit.curvature.factors import weight_with_bias
from napkit.errors import NapkitError
from napkit.models import create_model
from napkit.pruning.compensation import (
    column_removal_update,
    obs_compensate_,
    obs_update,
    quadratic_increase,
)
from napkit.pruning.fine_grained import FineGrainedPruner
from napkit.pruning.importance import create_importance
from napkit.pruning.masks import MaskSet
from napkit.structured import ScoreInputs, StructuredPruner, apply, channel_groups, create_channel_importance
from napkit.structured.pruner import compensate_consumers_

# --- brute force on a dense kron(G, A) ---------------------------------------------------------


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return m @ m.T / n + 0.3 * torch.eye(n, dtype=torch.float64)


def constrained_minimiser(f: torch.Tensor, fixed: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """argmin 0.5 x^T f x s.t. x[fixed] = values, from the full KKT system (no structure used)."""
    n, k = f.shape[0], int(fixed.sum())
    e = torch.eye(n, dtype=f.dtype)[:, fixed]
    kkt = torch.zeros(n + k, n + k, dtype=f.dtype)
    kkt[:n, :n], kkt[:n, n:], kkt[n:, :n] = f, e, e.T
    rhs = torch.cat([torch.zeros(n, dtype=f.dtype), values])
    return torch.linalg.solve(kkt, rhs)[:n]


def _case(bias: bool, blocks: bool, seed: int) -> tuple[nn.Conv2d, KFACFactors]:
    """A 5 x (3 channels * 2x2) conv layer with random weights and random SPD factors."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(3, 5, 2, bias=bias).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
        if bias:
            layer.bias.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
    g = _spd(5, gen)
    if blocks:
        a_blocks = torch.stack([_spd(4, gen) for _ in range(3)])
        a_bias = torch.tensor(1.3, dtype=torch.float64) if bias else None
        return layer, KFACFactors(A=None, G=g, num_samples=1, has_bias=bias, positions=1, A_blocks=a_blocks,
                                  A_bias=a_bias)
    return layer, KFACFactors(A=_spd(12 + int(bias), gen), G=g, num_samples=1, has_bias=bias, positions=1)


def _masks(share_old: float, share_new: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept before the step, newly pruned): random disjoint sets of the 5 x 12 weights."""
    gen = torch.Generator().manual_seed(100 + seed)
    u = torch.rand(5, 3, 2, 2, generator=gen, dtype=torch.float64)
    kept = u >= share_old
    newly = kept & (u < share_old + share_new)
    return kept, newly


CASES = [(bias, blocks, old, new) for bias in (True, False) for blocks in (False, True)
         for old, new in ((0.0, 0.15), (0.2, 0.2), (0.3, 0.5))]


@pytest.mark.parametrize(("bias", "blocks", "old", "new"), CASES)
def test_exact_update_is_the_constrained_minimiser(bias: bool, blocks: bool, old: float, new: float) -> None:
    """Exact joint OBS = argmin of the dense K-FAC quadratic with new AND old pruned weights fixed at zero;
    its quadratic value is the OBS prediction; small and large constraint sets use both solve spaces."""
    layer, f = _case(bias, blocks, seed=int(10 * old + 100 * new) + 2 * bias + blocks)
    kept, newly = _masks(old, new, seed=3)
    with torch.no_grad():
        layer.weight.mul_(kept)
    w0 = weight_with_bias(layer).clone()
    out = obs_compensate_(layer, f, newly, kept=kept, method="exact")
    d = weight_with_bias(layer) - w0
    fixed = torch.zeros_like(w0, dtype=torch.bool)
    fixed[:, :12] = (~kept | newly).reshape(5, 12)
    f_dense = f.kron_dense()
    expected = constrained_minimiser(f_dense, fixed.reshape(-1), -w0[fixed])
    torch.testing.assert_close(d.reshape(-1), expected, rtol=1e-9, atol=1e-11)
    assert bool((layer.weight[~kept | newly] == 0).all())
    assert out.method == "exact"
    assert out.predicted == pytest.approx(0.5 * float(expected @ f_dense @ expected), rel=1e-9)
    # the OBS formula 0.5 t^T ((F^-1)_CC)^-1 t over the removed set C
    c = fixed.reshape(-1)
    f_inv = torch.linalg.inv(f_dense)
    t = w0.reshape(-1)[c]
    assert out.predicted == pytest.approx(0.5 * float(t @ torch.linalg.solve(f_inv[c][:, c], t)), rel=1e-8)


@pytest.mark.parametrize(("bias", "blocks", "old", "new"), CASES)
def test_rowwise_update_is_the_minimiser_with_diagonal_g(bias: bool, blocks: bool, old: float,
                                                         new: float) -> None:
    """Row-wise (OBC/SparseGPT) = the exact minimiser of kron(diag(G), A): rows decouple."""
    layer, f = _case(bias, blocks, seed=7)
    kept, newly = _masks(old, new, seed=5)
    with torch.no_grad():
        layer.weight.mul_(kept)
    w0 = weight_with_bias(layer).clone()
    obs_compensate_(layer, f, newly, kept=kept, method="rowwise")
    d = weight_with_bias(layer) - w0
    fixed = torch.zeros_like(w0, dtype=torch.bool)
    fixed[:, :12] = (~kept | newly).reshape(5, 12)
    f_diag_g = torch.kron(torch.diag(torch.diagonal(f.G)), f.a_dense())
    expected = constrained_minimiser(f_diag_g, fixed.reshape(-1), -w0[fixed])
    torch.testing.assert_close(d.reshape(-1), expected, rtol=1e-9, atol=1e-11)


def test_exact_falls_back_to_rowwise_above_max_exact_and_none_zeroes() -> None:
    layer, f = _case(True, False, seed=1)
    _, newly = _masks(0.0, 0.3, seed=1)
    w0 = weight_with_bias(layer).clone()
    removed = torch.zeros_like(w0, dtype=torch.bool)
    removed[:, :12] = newly.reshape(5, 12)
    fallback, used = obs_update(w0, removed, f, "exact", max_exact=3)
    rowwise, _ = obs_update(w0, removed, f, "rowwise")
    assert used == "rowwise"
    torch.testing.assert_close(fallback, rowwise)
    zero, used = obs_update(w0, removed, f, "none")
    assert used == "none" and torch.equal(zero, torch.where(removed, -w0, torch.zeros_like(w0)))
    exact, _ = obs_update(w0, removed, f, "exact")
    # the exact minimiser is never above the others on the quadratic model
    assert quadratic_increase(exact, f) <= quadratic_increase(rowwise, f) <= quadratic_increase(zero, f)
    with pytest.raises(NapkitError, match="valid choices: exact, none, rowwise"):
        obs_update(w0, removed, f, "sum")


@pytest.mark.parametrize("blocks", [False, True])
def test_column_removal_update_is_the_constrained_minimiser(blocks: bool) -> None:
    """Whole-column removal (structured consumers): G cancels, and the update is the joint minimiser."""
    layer, f = _case(True, blocks, seed=9)
    w0 = weight_with_bias(layer).clone()
    for gone in ([1], [0, 2]):
        cols = torch.zeros(13, dtype=torch.bool)
        for c in gone:
            cols[4 * c: 4 * c + 4] = True
        d = column_removal_update(w0, cols, f)
        fixed = cols.expand(5, 13).reshape(-1)
        expected = constrained_minimiser(f.kron_dense(), fixed, -w0.reshape(-1)[fixed])
        torch.testing.assert_close(d.reshape(-1), expected, rtol=1e-9, atol=1e-11)
        zeroed = column_removal_update(w0, cols, f, compensate=False)
        assert torch.equal(zeroed[:, ~cols], torch.zeros(5, 13 - int(cols.sum()), dtype=torch.float64))


# --- a tiny trained CNN: measured loss increases ------------------------------------------------


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def trained_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, KFACFactors]]:
    """TinyCNN trained on sklearn's digits (float32, then float64), with K-FAC factors of that data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model = model.double().eval()
    x = x.double()
    factors = estimate_kfac(model, [(x, y)], num_samples=len(x), dtype=torch.float64, progress=False)
    return model, x, y, factors


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, KFACFactors]]:
    return trained_cnn()


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def pruned_loss(trained: tuple, fraction: float, compensation: str, damping: float = 0.1,
                criterion: str = "nap") -> tuple[float, float]:
    """(measured loss increase, predicted increase) of one global step from the dense model."""
    model, x, y, factors = trained
    model = copy.deepcopy(model)
    base = loss(model, x, y)
    kwargs = {"damping": damping} if criterion == "nap" else {}
    pruner = FineGrainedPruner(create_importance(criterion, **kwargs), step_fraction=fraction, target=None,
                               compensation=compensation, damping=damping, factors=lambda m, i: factors)
    model, _ = pruner(model, MaskSet.dense(model), 1)
    return loss(model, x, y) - base, pruner.last_predicted_increase


@pytest.mark.parametrize("criterion", ["nap", "magnitude"])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_joint_compensation_beats_zeroing_on_a_trained_net(trained: tuple, fraction: float,
                                                           criterion: str) -> None:
    """Measured on the data the factors were estimated on. NAP's first 10% are weights reading dead
    ReLU units (score 0): removing them costs exactly nothing, with or without compensation."""
    zero, zero_pred = pruned_loss(trained, fraction, "none", criterion=criterion)
    exact, exact_pred = pruned_loss(trained, fraction, "exact", criterion=criterion)
    rowwise, _ = pruned_loss(trained, fraction, "rowwise", criterion=criterion)
    if criterion == "nap" and fraction == 0.1:
        assert zero == exact == rowwise == 0.0
        return
    assert exact < zero and rowwise < zero
    if criterion == "nap":  # magnitude fetches no factors without compensation: nothing predicted
        assert exact_pred < zero_pred


def test_pruner_records_predicted_increase_and_keeps_pruned_weights_zero(trained: tuple) -> None:
    """Two exact steps: the second treats the first's pruned weights as fixed zeros (surviving set only)."""
    model, x, y, factors = trained
    model = copy.deepcopy(model)
    pruner = FineGrainedPruner(create_importance("nap"), step_fraction=0.3, target=None, compensation="exact",
                               factors=lambda m, i: estimate_kfac(m, [(x, y)], num_samples=len(x),
                                                                  dtype=torch.float64, progress=False))
    masks = MaskSet.dense(model)
    for it in (1, 2):
        model, masks = pruner(model, masks, it)
        assert set(pruner.last_methods.values()) == {"exact"}
        assert pruner.last_predicted_increase == pytest.approx(sum(pruner.last_predicted.values()))
        assert pruner.last_predicted_increase > 0
        for name, mask in masks.masks.items():
            assert bool((model.get_submodule(name).weight[~mask] == 0).all())
    with pytest.raises(NapkitError, match="prune.compensation 'sum'; valid choices: exact, none, rowwise"):
        FineGrainedPruner(create_importance("nap"), step_fraction=0.3, target=None, compensation="sum",
                          factors=lambda m, i: factors)


# --- structured: consumer-side compensation and a score consistent with it ----------------------


def _channel_increases(trained: tuple, compensate: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Measured loss increase of removing each channel alone (physically), consumers refitted or not,
    and the scores: new (consumer side, as applied), old (producer rows + compensated columns)."""
    model, x, y, factors = trained
    groups = channel_groups(model)
    base = loss(model, x, y)
    measured = []
    for g in groups:
        for c in range(g.size):
            plan = {g.id: torch.tensor([i for i in range(g.size) if i != c])}
            work = copy.deepcopy(model)
            compensate_consumers_(work, groups, plan, factors, 0.1, apply_update=compensate)
            measured.append(loss(apply(work, plan, groups=groups), x, y) - base)
    new = create_channel_importance("nap")(model, groups, ScoreInputs(factors, compensated=compensate))
    old = create_channel_importance("nap", producer_rows=True)(model, groups, ScoreInputs(factors))
    flat = {name: torch.cat([s[g.id] for g in groups]) for name, s in (("new", new), ("old", old))}
    return torch.tensor(measured), flat


@pytest.mark.parametrize("compensate", [True, False], ids=["compensated", "zeroed"])
def test_consumer_side_score_ranks_channels_better_than_the_double_count(trained: tuple,
                                                                         compensate: bool) -> None:
    measured, scores = _channel_increases(trained, compensate)
    rho = {name: spearmanr(s, measured).statistic for name, s in scores.items()}
    assert rho["new"] > rho["old"], rho
    if compensate:  # refitting the consumer never costs more than zeroing its columns (measured, per channel)
        zeroed, _ = _channel_increases(trained, False)
        assert float((measured <= zeroed + 1e-9).float().mean()) >= 0.9


def _small(name: str) -> nn.Module:
    if name == "densenet":  # concatenations: a consumer (and a BatchNorm) reads several groups at once
        return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10)
    return create_model(name, num_classes=10, in_channels=3, input_size=32, width=0.125)


@pytest.mark.parametrize("name", ["alexnet_small", "resnet50_small", "densenet"])
def test_compensated_step_equals_masked_compensation(name: str) -> None:
    """The pruner's physically cut model computes what the compensated, column-masked full model computes;
    a consumer of a concatenation is refit once for all the groups it loses channels of."""
    torch.manual_seed(0)
    model = _small(name).eval()
    for m in model.modules():  # no zero-initialised residual BatchNorm: every layer must reach the loss
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features) + 0.5
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    factors = estimate_kfac(model, [(x, y)], num_samples=16, dtype=torch.float64, progress=False)
    pruner = StructuredPruner("nap", model, input_shape=(1, 3, 32, 32), step_fraction=0.5,
                              factors_provider=lambda m, i: factors)
    assert pruner.compensate
    pruned = pruner(model, 1)
    groups = channel_groups(model)
    masked = copy.deepcopy(model)
    if name == "densenet":  # the step cut several groups of one concatenation's consumer: one joint refit
        readers = [c.name for g in groups if g.id in pruner.last_plan for c in g.consumers]
        assert len(readers) > len(set(readers))
    predicted = compensate_consumers_(masked, groups, pruner.last_plan, factors, pruner.damping)
    assert predicted == pytest.approx(pruner.last_predicted_increase, rel=1e-9) and predicted > 0
    for gid, keep in pruner.last_plan.items():
        g = next(g for g in groups if g.id == gid)
        gone = torch.ones(g.size, dtype=torch.bool)
        gone[keep] = False
        for c in g.consumers:
            w = masked.get_submodule(c.name).weight
            for window in g.windows(c.name):
                cols = w.reshape(w.shape[0], g.width(c.name), -1)[:, window][:, gone]
                assert bool((cols == 0).all())
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x), masked(x))  # the consumers did change


def test_dead_units_score_zero_whatever_the_damping() -> None:
    """A hidden unit that is zero on every sample costs nothing to remove: its consumer weights (fine-grained)
    and its channel (structured) score exactly 0, while damping alone would give them w^2 delta / ..."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        model[1].weight.abs_()
        model[1].bias.fill_(0.1)
        model[1].weight[2] *= -1
        model[1].bias[2] = -1.0
    x = torch.rand(64, 6, dtype=torch.float64)  # positive inputs: unit 2 never fires
    factors = estimate_kfac(model, [(x, torch.randint(0, 4, (64,)))], num_samples=64, dtype=torch.float64,
                            progress=False)
    assert float(factors["3"].A[2, 2]) == 0.0
    for damping in (1e-3, 0.1):
        scores = create_importance("nap", damping=damping)("3", model[3], factors["3"])
        assert bool((scores[:, 2] == 0).all()) and bool((scores[:, [0, 1, 3, 4]] > 0).all())
        channels = create_channel_importance("nap", damping=damping)(model, channel_groups(model),
                                                                     ScoreInputs(factors))["1"]
        assert float(channels[2]) == 0.0 and bool((channels[[0, 1, 3, 4]] > 0).all())


def test_damping_regularises_the_solve_and_the_prediction_is_the_undamped_model() -> None:
    layer, f = _case(True, False, seed=4)
    kept, newly = _masks(0.2, 0.3, seed=4)
    with torch.no_grad():
        layer.weight.mul_(kept)
    twin = copy.deepcopy(layer)
    w0 = weight_with_bias(layer).clone()
    out = obs_compensate_(layer, f, newly, kept=kept, method="exact", damping=0.3)
    obs_compensate_(twin, f.damped(0.3), newly, kept=kept, method="exact")
    torch.testing.assert_close(weight_with_bias(layer), weight_with_bias(twin))
    d = (weight_with_bias(layer) - w0).reshape(-1)
    assert out.predicted == pytest.approx(0.5 * float(d @ f.kron_dense() @ d), rel=1e-10)
