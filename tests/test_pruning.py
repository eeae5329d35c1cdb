"""Fine-grained pruning: OBS scores and compensation against brute force, allocation rules, masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from napkit.curvature import KFACFactors
from napkit.curvature.factors import weight_with_bias
from napkit.errors import NapkitError
from napkit.pruning.allocation import prune_lowest
from napkit.pruning.compensation import obs_compensate_
from napkit.pruning.importance import create_importance, list_importances
from napkit.pruning.masks import MaskSet
from napkit.training.engine import train_one_epoch


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(n, dtype=torch.float64)


def _layer_and_factors(bias: bool = True) -> tuple[nn.Linear, KFACFactors]:
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(4, 3, bias=bias).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, generator=gen, dtype=torch.float64))
    d_in_h = 4 + int(bias)
    f = KFACFactors(A=_spd(d_in_h, gen), G=_spd(3, gen), num_samples=10, has_bias=bias, positions=1)
    return layer, f


def test_obs_scores_match_brute_force_obs() -> None:
    """dL_q = w_q^2 / (2 [H^-1]_qq) with H = G (x) A, computed on the dense Kronecker product."""
    layer, f = _layer_and_factors()
    scores = create_importance("nap", damping=0.0)(("fc"), layer, f)
    h_inv = torch.linalg.inv(f.kron_dense())
    w_h = weight_with_bias(layer).reshape(-1)
    d_in_h = f.d_in_h
    for i in range(3):
        for j in range(4):
            q = i * d_in_h + j
            expected = w_h[q] ** 2 / (2 * h_inv[q, q])
            assert scores[i, j].item() == pytest.approx(expected.item(), rel=1e-10)


def test_obs_score_equals_quadratic_loss_increase_after_compensation() -> None:
    """Removing one weight with the OBS update raises 0.5 dw^T H dw by exactly its score, and zeroes it."""
    layer, f = _layer_and_factors()
    h = f.kron_dense()
    score = create_importance("nap", damping=0.0)("fc", layer, f)
    before = weight_with_bias(layer).reshape(-1).clone()
    newly = torch.zeros_like(layer.weight, dtype=torch.bool)
    newly[1, 2] = True
    obs_compensate_(layer, f, newly)
    after = weight_with_bias(layer).reshape(-1)
    dw = after - before
    assert layer.weight[1, 2].item() == pytest.approx(0.0, abs=1e-12)
    assert (0.5 * dw @ h @ dw).item() == pytest.approx(score[1, 2].item(), rel=1e-9)
    # brute-force OBS update: dw = -(w_q / [H^-1]_qq) H^-1 e_q
    h_inv = torch.linalg.inv(h)
    q = 1 * f.d_in_h + 2
    expected = -(before[q] / h_inv[q, q]) * h_inv[:, q]
    torch.testing.assert_close(dw, expected, rtol=1e-9, atol=1e-12)


def test_obd_is_diagonal_hessian_saliency() -> None:
    layer, f = _layer_and_factors()
    scores = create_importance("nap_obd", damping=0.0)("fc", layer, f)
    diag_h = torch.diagonal(f.kron_dense()).reshape(3, 5)[:, :4]
    torch.testing.assert_close(scores, 0.5 * layer.weight.detach() ** 2 * diag_h)


def test_unknown_criterion_lists_choices() -> None:
    with pytest.raises(NapkitError, match="valid choices: .*magnitude.*nap"):
        create_importance("obs_magic")
    assert {"nap", "nap_obd", "magnitude", "random"} <= set(list_importances())


def test_kfac_criterion_without_factors_is_a_clear_error() -> None:
    layer, _ = _layer_and_factors()
    with pytest.raises(NapkitError, match="curvature stage"):
        create_importance("nap")("fc", layer, None)


def _scores_masks() -> tuple[dict[str, torch.Tensor], MaskSet]:
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(4, 6, generator=gen), "b": torch.rand(2, 8, generator=gen) + 0.5}
    masks = MaskSet({n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()})
    return scores, masks


def test_global_allocation_prunes_lowest_scores_across_layers() -> None:
    scores, masks = _scores_masks()
    new = prune_lowest(scores, masks, 10, allocation="global", max_layer_sparsity=1.0)
    kept, total = new.counts()
    assert total - kept == 10
    pruned = torch.cat([s[~new.masks[n]] for n, s in scores.items()])
    survivors = torch.cat([s[new.masks[n]] for n, s in scores.items()])
    # every pruned score is below every unprotected survivor (protected = best of each row)
    protected = torch.cat([s.max(dim=1).values for s in scores.values()])
    unprotected = survivors[~torch.isin(survivors, protected)]
    assert pruned.max() <= unprotected.min()


def test_every_output_keeps_a_weight_and_caps_hold() -> None:
    scores, masks = _scores_masks()
    new = prune_lowest(scores, masks, 1000, allocation="global", max_layer_sparsity=1.0)
    for m in new.masks.values():
        assert bool((m.sum(dim=1) == 1).all())  # one weight per output unit, no more pruning possible
    capped = prune_lowest(scores, masks, 1000, allocation="global", max_layer_sparsity=0.5)
    for m in capped.masks.values():
        assert 1 - m.float().mean().item() <= 0.5


def test_uniform_allocation_gives_equal_ratios() -> None:
    scores, masks = _scores_masks()
    new = prune_lowest(scores, masks, 20, allocation="uniform", max_layer_sparsity=1.0)
    assert masks.counts()[0] - new.counts()[0] == 20  # exactly the amount asked for, rounding included
    dens = new.layer_density()
    assert dens["a"] == pytest.approx(dens["b"], abs=0.07)
    with pytest.raises(NapkitError, match="valid choices: global, uniform"):
        prune_lowest(scores, masks, 1, allocation="per_layer")


def test_previously_pruned_weights_stay_pruned() -> None:
    scores, masks = _scores_masks()
    first = prune_lowest(scores, masks, 8)
    second = prune_lowest({n: -s for n, s in scores.items()}, first, 4)
    for n in scores:
        assert not bool((second.masks[n] & ~first.masks[n]).any())


def test_masks_stay_exact_through_training_with_momentum_and_weight_decay(tmp_path) -> None:
    from napkit.artifacts import ModelSpec, load_model, save_model

    torch.manual_seed(0)
    spec = ModelSpec(name="alexnet_small", num_classes=3, in_channels=1, input_size=28, kwargs={"width": 0.125})
    model = spec.build()
    masks = MaskSet.dense(model)
    gen = torch.Generator().manual_seed(0)
    for m in masks.masks.values():
        m &= torch.rand(m.shape, generator=gen) > 0.7
    masks.apply_(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 3, (8,))) for _ in range(4)]
    train_one_epoch(model, batches, opt, device=torch.device("cpu"), masks=masks, progress=False)
    modules = dict(model.named_modules())
    for name, mask in masks.masks.items():
        assert bool((modules[name].weight[~mask] == 0).all())
        assert bool((modules[name].weight[mask] != 0).any())
    save_model(tmp_path, model, spec, masks)
    loaded, _, loaded_masks = load_model(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert loaded_masks is not None
    for name in masks.masks:
        assert torch.equal(masks.masks[name], loaded_masks.masks[name])


def test_mask_shape_mismatch_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(NapkitError, match="'0' has shape"):
        MaskSet({"0": torch.ones(5, 5, dtype=torch.bool)}).apply_(model)
    assert math.isclose(MaskSet.dense(model).sparsity(), 0.0)


def test_fine_grained_target_is_reached_exactly_once() -> None:
    """The step that prunes down to the target also satisfies `reached` (no idle iterations after it)."""
    from napkit.pruning.fine_grained import FineGrainedPruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 29), nn.ReLU(), nn.Linear(29, 7))
    masks = MaskSet.dense(model)
    pruner = FineGrainedPruner(create_importance("magnitude"), step_fraction=0.5, target=0.9,
                               max_layer_sparsity=0.99)
    steps = 0
    while not pruner.reached(model, masks):
        model, masks = pruner(model, masks, steps + 1)
        steps += 1
        assert steps < 10
    assert steps == 4 and pruner.amount(masks) == 0  # 0.5, 0.75, 0.875, then exactly the target
