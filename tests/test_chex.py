"""CHEX (docs/chex.md): CSS, budgets, schedule, masks, MRU bank, regrowth, compaction, stages."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from napkit.artifacts import load_model
from napkit.chex import (
    ChannelMasks,
    Explorer,
    MRUBank,
    Schedule,
    channel_tensors,
    chex_layers,
    compact,
    css_keep,
    distance_from_uniform,
    layer_budgets,
    regrowth_probabilities,
    sample_regrowth,
    sparsity_for_flops,
    train_chex,
)
from napkit.errors import NapkitError
from napkit.evaluation.cost import input_shape
from napkit.models import create_model
from napkit.structured.pruner import count_flops
from napkit.training.engine import train_one_epoch

TINY = {"vgg16_small": {"width": 0.125}, "alexnet_small": {"width": 0.125}, "resnet50_small": {"width": 0.125}}


def _model(name: str, seed: int = 0, in_channels: int = 3, size: int = 28) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=in_channels, input_size=size, **TINY[name])


def _randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Distinct BatchNorm gammas/betas/statistics, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _chex_cfg(**kw):
    base = {"S": 0.5, "d0": 0.2, "dT": 1, "T_max_fraction": 0.72, "regrowth": "importance", "reinit": "mru",
            "min_channels": 1, "epochs": 3, "label_smoothing": 0.0,
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9,
                          "nesterov": True, "weight_decay": 5e-4},
            "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True}}
    return OmegaConf.create({**base, **kw})


def _random_data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


# ---------------------------------------------------------------------------------------- CSS


def _projection_error(x: torch.Tensor, cols: tuple[int, ...]) -> float:
    q, _ = torch.linalg.qr(x[:, list(cols)])
    return float(((x - q @ (q.T @ x)) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leverage_css_picks_the_best_subset_in_easy_cases(seed: int) -> None:
    """k clear directions + a near-duplicate + small noise: CSS keeps the brute-force optimum."""
    g = torch.Generator().manual_seed(seed)
    d, k = 10, 3
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0][:, :k]
    strong = basis * torch.tensor([10.0, 8.0, 6.0], dtype=torch.float64)
    dup = 0.8 * strong[:, :1] + 0.05 * torch.randn(d, 1, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(d, 3, generator=g, dtype=torch.float64)
    x = torch.cat([noise[:, :1], strong[:, 1:2], dup, strong[:, :1], noise[:, 1:], strong[:, 2:]], dim=1)
    best = min(itertools.combinations(range(x.shape[1]), k), key=lambda c: _projection_error(x, c))
    chosen = css_keep(x.T.contiguous(), k)
    assert tuple(chosen.tolist()) == tuple(sorted(best)) == (1, 3, 6)


def test_css_falls_back_to_l1_when_filters_outnumber_their_inputs() -> None:
    w = torch.zeros(6, 2)  # C_out = 6 > C_in*kh*kw = 2
    w[:, 0] = torch.tensor([1.0, 5.0, 2.0, 4.0, 0.5, 3.0])
    assert css_keep(w, 3).tolist() == [1, 3, 5]


# ---------------------------------------------------------------------------------------- budgets


def test_min_layer_density_floors_starved_layers_and_keeps_the_global_budget() -> None:
    scores = {"early": torch.full((16,), 0.01), "late": torch.linspace(1.0, 2.0, 64)}
    keep, _ = layer_budgets(scores, 0.5, 0.1)
    assert keep["early"] == 1  # the global quantile starves the low-gamma layer
    keep, grow = layer_budgets(scores, 0.5, 0.1, min_density=0.25)
    assert keep["early"] == 4 and keep["early"] + keep["late"] == 40
    with pytest.raises(NapkitError, match="min_layer_density must lie in"):
        layer_budgets(scores, 0.5, 0.1, min_density=0.6)


@pytest.mark.parametrize("sparsity,regrow", [(0.5, 0.2), (0.7, 0.3), (0.5, 0.0), (0.3, 0.1)])
def test_budgets_sum_to_the_global_sparsity(sparsity: float, regrow: float) -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [16, 32, 7, 64, 5]
    scores = {f"l{i}": torch.rand(n, generator=g) for i, n in enumerate(sizes)}
    scores["l1"][:10] = 0.0  # pruned channels score 0
    scores["l4"][:] = 0.0  # a layer entirely pruned still keeps one channel
    keep, grow = layer_budgets(scores, sparsity, regrow)
    total = sum(sizes)
    assert sum(keep.values()) == round((1 - sparsity) * total)
    assert sum(keep.values()) + sum(grow.values()) == round((1 - sparsity + regrow) * total)
    assert all(keep[n] >= 1 and keep[n] + grow[n] <= s.numel() for n, s in scores.items())
    if regrow == 0:
        assert sum(grow.values()) == 0
    # the quantile rule keep_l = #{score >= thr}, except the one channel l4 borrowed from the largest layer
    flat = torch.cat(list(scores.values()))
    thr = torch.sort(flat, descending=True).values[round((1 - sparsity) * total) - 1]
    diff = {n: keep[n] - int((s >= thr).sum()) for n, s in scores.items()}
    assert diff.pop("l4") == 1 and sorted(diff.values()) == [-1, 0, 0, 0]


# ---------------------------------------------------------------------------------------- schedule


def test_cosine_schedule_ends_at_exactly_S() -> None:
    s = Schedule.create(epochs=25, d0=0.2, dT=2, T_max_fraction=0.72)
    assert s.T_max == 18 and s.epochs_exploring() == list(range(2, 19, 2))
    d = [s.regrow_factor(e) for e in s.epochs_exploring()]
    assert d[-1] == 0.0 and all(a > b for a, b in zip(d, d[1:])) and d[0] < 0.2
    assert s.regrow_factor(9) == pytest.approx(0.1)
    assert not s.explores(0) and not s.explores(3) and not s.explores(20)
    short = Schedule.create(epochs=3, d0=0.2, dT=2)
    assert short.epochs_exploring() == [2] and short.regrow_factor(2) == 0.0
    assert Schedule.create(epochs=1, d0=0.2).epochs_exploring() == [0]


# ---------------------------------------------------------------------------------------- masks


def _assert_masked(model: nn.Module, masks: ChannelMasks) -> None:
    for layer in masks.layers:
        dead = ~masks.masks[layer.id]
        for name, view, kind in channel_tensors(model, layer):
            expect = 1.0 if kind == "running_var" else 0.0
            assert bool((view[:, dead] == expect).all()), name


@pytest.mark.parametrize("name", ["alexnet_small", "vgg16_small"])
def test_masks_hold_after_optimizer_steps_with_momentum_and_weight_decay(name: str) -> None:
    model = _model(name)
    ex = Explorer(model, sparsity=0.5, d0=0.2, seed=0)
    ex.init(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    data = _random_data(8)
    batches = [(data.tensors[0][i:i + 4], data.tensors[1][i:i + 4]) for i in (0, 4)]
    train_one_epoch(model, batches, opt, device=torch.device("cpu"), masks=ex.masks, progress=False)
    _assert_masked(model, ex.masks)
    ex.step(model, 1, 0.1)  # momentum buffers of newly pruned channels are non-zero now
    train_one_epoch(model, batches, opt, device=torch.device("cpu"), masks=ex.masks, progress=False)
    _assert_masked(model, ex.masks)
    assert ex.masks.density() == pytest.approx(0.6, abs=0.01)
    # the first Linear's column blocks follow the last conv (flatten blocks)
    last = ex.layers[-1]
    assert last.group.consumers[0].name.startswith("classifier")


def test_resnet_prunes_only_bottleneck_conv1_conv2() -> None:
    model = _model("resnet50_small")
    names = [l.producer for l in chex_layers(model)]
    assert len(names) == 2 * 16 and all(n.endswith((".conv1", ".conv2")) and n.startswith("layer") for n in names)


# ---------------------------------------------------------------------------------------- MRU, regrowth


def test_mru_restore_returns_the_exact_saved_values() -> None:
    model = _model("vgg16_small")
    _randomize_norms(model)
    layers = chex_layers(model)
    bank = MRUBank(layers)
    bank.snapshot(model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(1.0)
    sel = {l.id: torch.arange(l.size) % 3 == 0 for l in layers}
    bank.restore(model, sel)
    layer = layers[3]
    for name, view, _ in channel_tensors(model, layer):
        original = saved[name].view(view.shape)
        assert torch.equal(view[:, sel[layer.id]], original[:, sel[layer.id]]), name
    # channels not restored keep their current values
    gamma = dict(model.named_parameters())[f"{layer.norm}.weight"]
    assert torch.equal(gamma[~sel[layer.id]], saved[f"{layer.norm}.weight"][~sel[layer.id]] + 1.0)


def test_regrowth_prefers_filters_outside_the_kept_span() -> None:
    d = 6
    x = torch.zeros(d, 4, dtype=torch.float64)
    x[0, 0], x[1, 1] = 1.0, 1.0
    x[0, 2] = 5.0  # inside span of the kept filters: residual 0
    x[5, 3] = 5.0  # orthogonal: residual 25
    hits = sum(int(sample_regrowth(x, torch.tensor([0, 1]), 1, generator=torch.Generator().manual_seed(s)).item() == 3)
               for s in range(20))
    assert hits == 20


def _residual_matrix(residuals: list[float]) -> torch.Tensor:
    """Two kept unit filters (columns 0, 1) and candidates orthogonal to them with these squared residuals."""
    x = torch.zeros(2 + len(residuals), 2 + len(residuals), dtype=torch.float64)
    x[0, 0], x[1, 1] = 1.0, 1.0
    for j, r in enumerate(residuals):
        x[2 + j, 2 + j] = math.sqrt(r)
        x[0, 2 + j] = 3.0  # a component inside the kept span, which the projection removes
    return x


def test_regrowth_probabilities_are_the_softmax_of_residuals_over_the_temperature() -> None:
    eps = [1.0, 1.2, 1.5]
    x, kept = _residual_matrix(eps), torch.tensor([0, 1])
    for t in (1.0, 0.05):
        candidates, probs = regrowth_probabilities(x, kept, temperature=t)
        expected = torch.softmax(torch.tensor(eps, dtype=torch.float64) / t, 0)
        assert candidates.tolist() == [2, 3, 4]
        assert torch.allclose(probs, expected, atol=1e-9)
        assert distance_from_uniform(probs) == pytest.approx(float(0.5 * (expected - 1 / 3).abs().sum()))
    # at T = 1, residuals of similar size (as BatchNorm nets' filters have) give a near-uniform draw
    assert distance_from_uniform(regrowth_probabilities(x, kept)[1]) < 0.15
    assert distance_from_uniform(regrowth_probabilities(x, kept, method="random")[1]) == 0.0
    # a cold temperature always draws the largest residual first
    assert all(sample_regrowth(x, kept, 1, generator=torch.Generator().manual_seed(s), temperature=0.01).item() == 4
               for s in range(20))
    with pytest.raises(NapkitError, match=r"regrowth_temperature must be > 0, got 0.0"):
        regrowth_probabilities(x, kept, temperature=0.0)


def test_each_step_records_how_far_regrowth_is_from_uniform() -> None:
    def distances(**kw) -> list[float]:
        model = _model("vgg16_small")
        _randomize_norms(model)
        ex = Explorer(model, sparsity=0.5, d0=0.3, seed=0, **kw)
        ex.init(model)
        return [ex.step(model, e, d).sampling_distance for e, d in ((1, 0.2), (2, 0.1))]

    random, spec, cold = distances(regrowth="random"), distances(), distances(temperature=0.05)
    assert random == [0.0, 0.0]
    assert all(0.0 < a < b for a, b in zip(spec, cold))


def test_exploration_is_deterministic_under_a_seed() -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        model = _model("alexnet_small")
        ex = Explorer(model, sparsity=0.5, d0=0.3, regrowth="importance", seed=seed)
        ex.init(model)
        for e, d in ((1, 0.2), (2, 0.1)):
            ex.step(model, e, d)
        return ex.masks.masks

    a, b = run(0), run(0)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------- compaction


@pytest.mark.parametrize("name", ["vgg16_small", "alexnet_small", "resnet50_small"])
def test_compact_model_gives_the_masked_outputs(name: str) -> None:
    model = _model(name)
    _randomize_norms(model)
    ex = Explorer(model, sparsity=0.6, d0=0.2, seed=0)
    ex.init(model)
    ex.step(model, 2, 0.0)
    small = compact(model, ex.masks)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    size = 28 if name == "alexnet_small" else 16  # vgg/resnet pool adaptively
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    model.double().eval()
    small.double().eval()
    with torch.no_grad():
        assert torch.allclose(model(x), small(x), atol=1e-10, rtol=0)


def test_flops_target_to_sparsity_by_bisection() -> None:
    model = _model("alexnet_small")
    shape = input_shape(3, 28)
    s = sparsity_for_flops(model, 2.0, shape)
    assert 0.0 < s < 1.0
    dense = count_flops(model, shape)[0]

    def reduction(sp: float) -> float:
        plan = {l.id: torch.arange(max(1, round((1 - sp) * l.size))) for l in chex_layers(model)}
        return dense / count_flops(compact(model, ChannelMasks(chex_layers(model), {
            k: torch.isin(torch.arange(l.size), v) for (k, v), l in zip(plan.items(), chex_layers(model))})), shape)[0]

    assert reduction(s) >= 2.0 > reduction(s - 0.01)


@pytest.mark.parametrize("name", ["vgg16_small", "resnet50_small"])
def test_exploration_with_a_flops_target_meets_it_whatever_the_gammas(name: str) -> None:
    model = _model(name)
    _randomize_norms(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # early gammas fall fastest in training: the costly high-resolution layers lose most
        for m in norms[: len(norms) // 3]:
            m.weight.mul_(0.2)
    shape = input_shape(3, 28)
    dense = count_flops(model, shape)[0]
    uniform_s = sparsity_for_flops(model, 3.0, shape)
    reductions, used = {}, {}
    for key, target in (("fixed", None), ("targeted", (3.0, shape))):
        m = copy.deepcopy(model)
        ex = Explorer(m, sparsity=uniform_s, d0=0.2, seed=0, flops_target=target)
        ex.init(m)
        used[key] = ex.step(m, 2, 0.0).sparsity  # the last step: d_e = 0
        reductions[key] = dense / count_flops(compact(m, ex.masks), shape)[0]
    assert used["fixed"] == uniform_s and used["targeted"] != uniform_s
    # the gammas move channels between cheap and costly layers, so a fixed S misses the target
    assert abs(reductions["fixed"] - 3.0) > 0.05
    assert 3.0 <= reductions["targeted"] <= 3.0 * 1.03


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("overrides", [{}, {"d0": 0.0}, {"regrowth": "random"}, {"reinit": "zero"}])
def test_training_with_exploration_and_ablations(overrides: dict) -> None:
    model = _model("alexnet_small")
    data = _random_data(16)
    steps = []
    ex, history = train_chex(model, data, data, cfg=_chex_cfg(**overrides), batch_size=8, eval_batch_size=16,
                             seed=0, device=torch.device("cpu"), on_step=steps.append, progress=False)
    assert [r.epoch for r in steps] == [1, 2] and len(history) == 3
    total = sum(l.size for l in ex.layers)
    assert sum(ex.masks.counts().values()) == round(0.5 * total)  # ends at exactly S
    _assert_masked(model, ex.masks)
    if overrides.get("d0") == 0.0:
        assert all(r.regrown == 0 for r in steps)
    else:
        assert steps[0].regrown > 0 and steps[1].survived is not None


def test_training_resumes_exactly_from_a_checkpoint(tmp_path) -> None:
    data = _random_data(16)
    cfg = _chex_cfg(epochs=3)

    def train(stop_after: int | None = None):
        model = _model("alexnet_small")

        def stop(epoch: int, _row: dict) -> None:
            if stop_after is not None and epoch == stop_after:
                raise KeyboardInterrupt

        ex, _ = train_chex(model, data, data, cfg=cfg, batch_size=8, eval_batch_size=16, seed=0,
                           device=torch.device("cpu"), checkpoint=tmp_path / "ck.pt", on_epoch=stop, progress=False)
        return model, ex

    ref, ref_ex = train()
    (tmp_path / "ck.pt").unlink()
    with pytest.raises(KeyboardInterrupt):
        train(stop_after=1)
    resumed, ex = train()
    for key, value in ref.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert all(torch.equal(ref_ex.masks.masks[k], ex.masks.masks[k]) for k in ex.masks.masks)
    assert [r.regrown for r in ex.records] == [r.regrown for r in ref_ex.records]


# ---------------------------------------------------------------------------------------- stages


def test_stages_end_to_end_on_digits(compose_cfg, tmp_path, monkeypatch) -> None:
    from napkit.stages import chex as stages

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = compose_cfg(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"paths.artifacts={tmp_path / 'a'}",
                      "model=vgg16_small", "model.width=0.125", "data.subset_train=64", "data.batch_size=32", "chex.epochs=3",
                      "chex.dT=1", "evaluate.latency_repeats=1", "device=cpu")
    train = stages.train(cfg)
    assert train["density"] == pytest.approx(0.5, abs=0.01) and train["explorations"] == 2
    comp = stages.compact_stage(cfg)
    assert comp["max_abs_diff"] <= 1e-6 and comp["params"] < comp["params_masked"]
    ev = stages.evaluate_stage(cfg)
    assert ev["params"] < ev["params_dense"] and ev["flops_reduction"] > 1.0 and 0 <= ev["top1"] <= 100
    saved = json.loads((tmp_path / "a/chex/evaluate/metrics.json").read_text())
    assert saved["top1"] == pytest.approx(ev["top1"])
    small, spec, _ = load_model(tmp_path / "a/chex/compact")
    assert spec.channels is not None and sum(p.numel() for p in small.parameters()) == ev["params"]
    rows = (tmp_path / "a/chex/train/explorations.csv").read_text().splitlines()
    assert len(rows) == 3 and "channels/features.0" in rows[0]
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    for key in ("chex_train/density", "iter/chex_train/regrown", "iter/chex_train/survived", "chex_evaluate/top1"):
        assert key in metrics, key
    assert any(k.startswith("iter/chex_train/channels/") for k in metrics)
    assert metrics["chex_train/density"] == pytest.approx(train["density"])  # the summary is the result
    history = client.get_metric_history(runs[0].info.run_id, "iter/chex_train/density")
    assert len(history) >= 2 and math.isclose(history[-1].value, train["density"], abs_tol=0.02)


def test_a_checkpoint_is_not_resumed_on_other_data(tmp_path, caplog) -> None:
    """Same shapes, same config, other data (e.g. another data.subset_train): the CHEX checkpoint of
    the first run must not be resumed; the second run equals a fresh run on its own data."""
    cfg = _chex_cfg(epochs=2)

    def train(data, checkpoint):
        model = _model("alexnet_small")
        train_chex(model, data, data, cfg=cfg, batch_size=8, eval_batch_size=16, seed=0,
                   device=torch.device("cpu"), checkpoint=checkpoint, progress=False)
        return model

    train(_random_data(16, seed=0), tmp_path / "ck.pt")
    with caplog.at_level(logging.WARNING):
        swapped = train(_random_data(16, seed=1), tmp_path / "ck.pt")
    assert "ignoring checkpoint" in caplog.text
    fresh = train(_random_data(16, seed=1), None)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in swapped.state_dict().items())
