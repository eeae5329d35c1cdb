"""Structured pruning: channel groups, physical removal, rebuild from counts, NAP channel scores, the step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from napkit.curvature import estimate_kfac
from napkit.errors import NapkitError
from napkit.io import load_tensors, save_tensors
from napkit.layers import classifier_name
from napkit.models import create_model
from napkit.structured import (
    ChannelGroup,
    CostModel,
    ScoreInputs,
    StructuredPruner,
    apply,
    channel_counts,
    channel_groups,
    count_flops,
    count_params,
    create_channel_importance,
    list_channel_importances,
    recalibrate_bn,
    saved_flops,
    slim_to,
)
from napkit.structured.attention import ATTENTIONS

SIZE = 32
SHAPE = (1, 3, SIZE, SIZE)
FAMILIES = ("alexnet_small", "vgg16_small", "resnet50_small")
# expected groups: AlexNet 5 convs + 2 hidden Linear; VGG16 13 convs + 2 hidden Linear;
# ResNet-50 stem + 2 per bottleneck (16) + one coupled group per stage
GROUPS = {"alexnet_small": (7, 0), "vgg16_small": (15, 0), "resnet50_small": (37, 4)}


def small(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=3, input_size=SIZE, width=0.125)


def randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics, so eval-mode BN matters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n, dtype = m.num_features, m.weight.dtype
            m.weight.data = torch.rand(n, generator=gen, dtype=dtype) + 0.5
            m.bias.data = torch.randn(n, generator=gen, dtype=dtype)
            m.running_mean = torch.randn(n, generator=gen, dtype=dtype) * 0.1
            m.running_var = torch.rand(n, generator=gen, dtype=dtype) + 0.5


def random_plan(groups: list[ChannelGroup], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Keep a random non-empty proper subset of every group."""
    plan = {}
    for g in groups:
        k = int(torch.randint(1, g.size, (1,), generator=gen))
        plan[g.id] = torch.randperm(g.size, generator=gen)[:k]
    return plan


def masked(model: nn.Module, groups: list[ChannelGroup], plan: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the removed channels instead: producer rows and bias, depthwise filters, norm weight and bias,
    per-channel parameters."""
    out = copy.deepcopy(model)
    for g in groups:
        gone = torch.ones(g.size, dtype=torch.bool)
        gone[plan[g.id]] = False
        for name in g.producers + g.depthwise + g.norms:
            m = out.get_submodule(name)
            if isinstance(m, ATTENTIONS):  # a head: its query, key and value rows
                projection = m.get_submodule(m.input)
                for p in (projection.weight, projection.bias):
                    if p is not None:
                        p.data.view(3, m.num_heads, m.head_dim, -1)[:, gone] = 0.0
                continue
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                for window in g.windows(name) if p is not None else ():  # a norm over a concatenation: its windows
                    p.data[window][gone] = 0.0
        for name, dim in g.params:  # a per-channel parameter (layer scale): its entries
            out.get_parameter(name).data.index_fill_(dim, torch.nonzero(gone).flatten(), 0.0)
    return out


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def by_hand(model: nn.Module) -> tuple[int, int]:
    """Params and FLOPs from the layer attributes and output shapes (no parameter tensors read)."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, tuple(o.shape)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    forward(model, torch.zeros(SHAPE))
    for h in hooks:
        h.remove()
    params = flops = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k = m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            params += k + m.out_channels * (m.bias is not None)
            flops += 2 * k * shapes[m][2] * shapes[m][3]
        elif isinstance(m, nn.Linear):
            params += m.out_features * m.in_features + m.out_features * (m.bias is not None)
            flops += 2 * m.out_features * m.in_features
        elif isinstance(m, nn.BatchNorm2d):
            params += 2 * m.num_features
    return params, flops


# --- groups --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_groups_never_touch_classifier_outputs_or_network_input(name: str) -> None:
    model = small(name)
    groups = channel_groups(model)
    assert (len(groups), sum(g.coupled for g in groups)) == GROUPS[name]
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    members = {p for g in groups for p in g.producers}
    assert classifier_name(model) not in members
    assert first_conv not in {c.name for g in groups for c in g.consumers}


def test_resnet_coupled_group_members() -> None:
    groups = {g.id: g for g in channel_groups(small("resnet50_small"))}
    stage = groups["layer4.0.conv3"]
    assert stage.producers == ("layer4.0.conv3", "layer4.0.downsample.0", "layer4.1.conv3", "layer4.2.conv3")
    assert stage.norms == ("layer4.0.bn3", "layer4.0.downsample.1", "layer4.1.bn3", "layer4.2.bn3")
    assert [c.name for c in stage.consumers] == ["layer4.1.conv1", "layer4.2.conv1", "fc"]
    assert groups["layer1.0.conv3"].consumers[-1].name == "layer2.0.downsample.0"


def test_flatten_consumer_reads_blocks_of_hw_columns() -> None:
    groups = {g.id: g for g in channel_groups(small("alexnet_small"))}
    assert groups["features.10"].consumers[0].block == (SIZE // 8) ** 2
    assert groups["classifier.1"].consumers[0].block == 1


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_full_size_groups(name: str) -> None:
    model = create_model(name, num_classes=1000, in_channels=3, input_size=64)
    groups = channel_groups(model)
    first_linear = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    head = [c.block for g in groups for c in g.consumers if c.name == first_linear]
    # groups, coupled groups, column block of the flatten into the head
    expected = {"vgg16": (15, 0, [49]), "resnet50": (37, 4, [1])}[name]
    assert (len(groups), sum(g.coupled for g in groups), head) == expected


# --- surgery -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_removal_equals_masking(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    model = small(name).double()
    randomize_norms(model, gen)
    groups = channel_groups(model)
    plan = random_plan(groups, gen)
    pruned = apply(model, plan)
    assert type(pruned) is type(model)
    assert count_params(pruned) < count_params(model)
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    reference = forward(masked(model, groups, plan), x)
    torch.testing.assert_close(forward(pruned, x), reference, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", FAMILIES)
def test_rebuild_from_counts_and_safetensors(name: str, tmp_path) -> None:
    gen = torch.Generator().manual_seed(2)
    model = small(name)
    randomize_norms(model, gen)
    pruned = apply(model, random_plan(channel_groups(model), gen))
    path = save_tensors(tmp_path / "model.safetensors", pruned.state_dict())
    rebuilt = slim_to(small(name), channel_counts(pruned))
    rebuilt.load_state_dict(load_tensors(path))
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    assert torch.equal(forward(rebuilt, x), forward(pruned, x))


def test_slim_to_rejects_foreign_counts() -> None:
    counts = channel_counts(small("alexnet_small"))
    with pytest.raises(NapkitError, match=r"do not describe this VGGSmall: unknown layers \['classifier.1'"):
        slim_to(small("vgg16_small"), counts)


@pytest.mark.parametrize("name", FAMILIES)
def test_params_and_flops_match_layer_shapes(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    model = small(name)
    groups = channel_groups(model)
    plan = random_plan(groups, gen)
    pruned = apply(model, plan, groups=groups)
    params, flops = by_hand(pruned)
    assert (count_params(pruned), count_flops(pruned, SHAPE)[0]) == (params, flops)
    removed = torch.tensor([g.size - len(plan[g.id]) for g in groups])
    assert CostModel(model, groups, count_flops(model, SHAPE)).cost(removed) == (params, flops)


def test_recalibrate_bn_uses_exact_batch_statistics() -> None:
    model = small("vgg16_small")
    x = torch.randn(8, 3, SIZE, SIZE)
    model.train(False)
    recalibrate_bn(model, [(x, None)], num_batches=1)
    conv_out = model.features[0](x)
    torch.testing.assert_close(model.features[1].running_mean, conv_out.mean((0, 2, 3)))
    assert not model.training and model.features[1].momentum == 0.1


# --- scores --------------------------------------------------------------------------------


class Tiny(nn.Module):
    """conv -> conv -> flatten -> linear, small enough for dense kron(G, A) inverses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3)
        self.conv2 = nn.Conv2d(4, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def obs_group(model: nn.Module, factors: dict, layer: str, coords: torch.Tensor) -> torch.Tensor:
    """Brute-force OBS ``0.5 w_S^T ([F^-1]_SS)^-1 w_S`` of one layer from its dense damped kron(G, A)."""
    f = factors[layer].damped(0.1)
    m = model.get_submodule(layer)
    w = torch.cat([m.weight.detach().reshape(m.weight.shape[0], -1), m.bias.detach()[:, None]], 1).reshape(-1)
    f_inv = torch.linalg.inv(f.kron_dense())
    ws = w[coords]
    return 0.5 * ws @ torch.linalg.solve(f_inv[coords][:, coords], ws)


def zeroing_cost(model: nn.Module, factors: dict, layer: str, coords: torch.Tensor) -> torch.Tensor:
    """Brute-force ``0.5 w_S^T F_SS w_S``: the quadratic model's cost of zeroing S with no update."""
    f = factors[layer].damped(0.1)
    m = model.get_submodule(layer)
    w = torch.cat([m.weight.detach().reshape(m.weight.shape[0], -1), m.bias.detach()[:, None]], 1).reshape(-1)
    ws = w[coords]
    return 0.5 * ws @ f.kron_dense()[coords][:, coords] @ ws


def brute_force_scores(model: Tiny, factors: dict, cost=obs_group, rows: bool = False) -> dict[str, torch.Tensor]:
    """Consumer column blocks (``cost``: compensated OBS or zeroing), plus the producer rows (bias included)
    when ``rows``, summed over the layers."""
    d1, d2, d3 = 2 * 9 + 1, 4 * 9 + 1, 12 + 1  # columns of W_h per layer

    def columns(d: int, start: int, block: int, outputs: int) -> torch.Tensor:
        return torch.cat([o * d + start + torch.arange(block) for o in range(outputs)])

    conv1 = [cost(model, factors, "conv2", columns(d2, i * 9, 9, 3))
             + rows * obs_group(model, factors, "conv1", torch.arange(i * d1, (i + 1) * d1)) for i in range(4)]
    conv2 = [cost(model, factors, "fc", columns(d3, i * 4, 4, 5))
             + rows * obs_group(model, factors, "conv2", torch.arange(i * d2, (i + 1) * d2)) for i in range(3)]
    return {"conv1": torch.stack(conv1), "conv2": torch.stack(conv2)}


@pytest.mark.parametrize("max_dense_dim", [8192, 10, 3], ids=["dense_A", "channel_blocks", "other_blocks"])
def test_nap_equals_brute_force_obs(max_dense_dim: int) -> None:
    torch.manual_seed(4)
    model = Tiny().double()
    x = torch.randn(64, 2, 6, 6, dtype=torch.float64)
    factors = estimate_kfac(model, [(x, torch.randint(0, 5, (64,)))], num_samples=64, dtype=torch.float64,
                            max_dense_dim=max_dense_dim, progress=False)
    groups = channel_groups(model)
    scores = create_channel_importance("nap", damping=0.1)(model, groups, ScoreInputs(factors))
    zeroing = create_channel_importance("nap", damping=0.1)(model, groups, ScoreInputs(factors, compensated=False))
    both = create_channel_importance("nap", damping=0.1, producer_rows=True)(model, groups, ScoreInputs(factors))
    for got, expected in ((scores, brute_force_scores(model, factors)),
                          (zeroing, brute_force_scores(model, factors, zeroing_cost)),
                          (both, brute_force_scores(model, factors, rows=True))):
        for gid in ("conv1", "conv2"):
            torch.testing.assert_close(got[gid], expected[gid], rtol=1e-8, atol=0)
    flops = count_flops(model.float(), (1, 2, 6, 6))[1]
    per_flop = create_channel_importance("nap_per_flop")(model.double(), groups, ScoreInputs(factors, flops))
    hand = flops["conv1"] / 4 + flops["conv2"] / 4
    assert saved_flops(model, groups[0], flops) == hand
    torch.testing.assert_close(per_flop["conv1"], scores["conv1"] / hand)


def test_bn_gamma_sums_over_coupled_group_and_skips_groups_without_bn() -> None:
    model = small("resnet50_small")
    randomize_norms(model, torch.Generator().manual_seed(5))
    groups = {g.id: g for g in channel_groups(model)}
    scores = create_channel_importance("bn_gamma")(model, list(groups.values()))
    stage = groups["layer2.0.conv3"]
    gammas = sum(model.get_submodule(n).weight.detach().double().abs() for n in stage.norms)
    torch.testing.assert_close(scores[stage.id], gammas)
    vgg = small("vgg16_small")
    head = create_channel_importance("bn_gamma")(vgg, channel_groups(vgg))["classifier.0"]
    assert torch.isinf(head).all()


def test_unknown_importance_lists_valid_ones() -> None:
    assert list_channel_importances() == ["bn_gamma", "l1", "nap", "nap_per_flop", "random"]
    with pytest.raises(NapkitError, match="valid choices: bn_gamma, l1, nap"):
        create_channel_importance("taylor")


# --- the pruning step ----------------------------------------------------------------------


def test_resnet_step_removes_coupled_channels_together() -> None:
    model = small("resnet50_small")
    pruner = StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=0.5, allocation="uniform")
    pruned = pruner(model, 1)
    for g in channel_groups(model):
        sizes = {pruned.get_submodule(p).out_channels for p in g.producers}
        sizes |= {pruned.get_submodule(n).num_features for n in g.norms}
        sizes |= {pruned.get_submodule(c.name).weight[0].numel() // c.block for c in g.consumers}
        assert len(sizes) == 1 and sizes.pop() < g.size
    assert forward(pruned, torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)


def test_global_allocation_keeps_one_channel_per_group_and_all_classes() -> None:
    model = small("alexnet_small")
    pruner = StructuredPruner("random", model, input_shape=SHAPE, step_fraction=1.0, max_group_sparsity=1.0)
    pruned = pruner(model, 1)
    assert set(channel_counts(pruned).values()) == {1}
    assert forward(pruned, torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)
    with pytest.raises(NapkitError, match="cannot prune further"):
        pruner(pruned, 2)


def test_flops_target_is_reached_without_overshoot() -> None:
    model = small("vgg16_small")
    pruner = StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=0.9, target_flops_reduction=1.5)
    pruned = pruner(model, 1)
    cost = pruner.measure(pruned)
    assert pruner.reached(pruned) and cost["flops_reduction"] >= 1.5
    flops = count_flops(model, SHAPE)[1]
    largest = max(saved_flops(model, g, flops) for g in channel_groups(model))
    assert cost["flops"] > pruner.dense["flops"] / 1.5 - largest  # stopped at the first channel reaching it
    assert pruner(pruned, 2) is pruned


def test_uniform_allocation_removes_the_same_share_of_every_group() -> None:
    model = small("vgg16_small")
    pruner = StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=0.5, allocation="uniform")
    before, after = channel_counts(model), channel_counts(pruner(model, 1))
    assert all(after[n] == before[n] - round(0.5 * before[n]) for n in before)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_round_to_keeps_multiples_and_still_reaches_the_target(allocation: str) -> None:
    model = small("resnet50_small")
    before = channel_counts(model)
    pruner = StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=1.0, target_flops_reduction=2.0,
                              allocation=allocation, round_to=4)
    pruned = pruner(model, 1)
    after = channel_counts(pruned)
    changed = {n: c for n, c in after.items() if c != before[n]}
    assert changed and all(c % 4 == 0 for c in changed.values())
    assert pruner.reached(pruned)
    unrounded = StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=1.0, target_flops_reduction=2.0,
                                 allocation=allocation)
    assert any(c % 4 for c in channel_counts(unrounded(model, 1)).values())  # rounding changed something
    with pytest.raises(NapkitError, match="round_to must be >= 1"):
        StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=1.0, round_to=0)


def test_nap_step_on_current_model_factors() -> None:
    model = small("alexnet_small")
    x, y = torch.randn(32, 3, SIZE, SIZE), torch.randint(0, 10, (32,))

    def provider(m: nn.Module, iteration: int) -> dict:
        return estimate_kfac(m, [(x, y)], num_samples=32, progress=False)

    pruner = StructuredPruner("nap_per_flop", model, input_shape=SHAPE, step_fraction=0.2,
                              target_flops_reduction=3.0, factors_provider=provider)
    pruned = model
    for it in range(1, 4):
        pruned = pruner(pruned, it)
    assert pruner.measure(pruned)["flops_reduction"] > pruner.measure(model)["flops_reduction"]


def test_bad_targets_and_options_fail_clearly() -> None:
    model = small("alexnet_small")
    with pytest.raises(NapkitError, match="cannot be reached"):
        StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=0.5, target_flops_reduction=1000.0)
    with pytest.raises(NapkitError, match="factor"):
        StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=0.5, target_params_reduction=0.5)
    with pytest.raises(NapkitError, match="factors_provider"):
        StructuredPruner("nap", model, input_shape=SHAPE, step_fraction=0.5)
    with pytest.raises(NapkitError, match="valid choices: global, uniform"):
        StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=0.5, allocation="layerwise")
