"""Block removal: a bottleneck whose conv1 or conv2 group is emptied becomes its shortcut plus a bias."""

from __future__ import annotations

import pytest
import torch
from test_structured import SHAPE, SIZE, by_hand, forward, masked, randomize_norms, small
from torch import nn

from napkit.errors import NapkitError
from napkit.io import load_tensors, save_tensors
from napkit.structured import (
    CostModel,
    StructuredPruner,
    apply,
    channel_counts,
    channel_groups,
    count_flops,
    count_params,
    slim_to,
)
from napkit.structured.blocks import SkippedBlock, skipped_blocks
from napkit.structured.latency import LatencyTable

# layer1.1: identity shortcut; layer2.0: downsample shortcut (stride 2)
EMPTIED = {"layer1.1.conv1": [], "layer2.0.conv2": [], "layer3.2.conv1": []}


def plan_with_empty_blocks(groups, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random proper subsets of every group, except three bottleneck groups that keep nothing."""
    plan = {}
    for g in groups:
        k = int(torch.randint(1, g.size, (1,), generator=gen))
        plan[g.id] = torch.tensor([], dtype=torch.long) if g.id in EMPTIED else torch.randperm(g.size, generator=gen)[:k]
    return plan


@pytest.fixture
def resnet() -> nn.Module:
    model = small("resnet50_small").double()
    randomize_norms(model, torch.Generator().manual_seed(11))
    return model


def test_emptied_bottleneck_is_skipped_with_the_same_outputs_as_masking(resnet: nn.Module) -> None:
    gen = torch.Generator().manual_seed(12)
    groups = channel_groups(resnet)
    plan = plan_with_empty_blocks(groups, gen)
    pruned = apply(resnet, plan, groups=groups)
    assert skipped_blocks(pruned) == ["layer1.1", "layer2.0", "layer3.2"]
    assert isinstance(pruned.layer2[0].downsample, nn.Sequential)  # the stride-2 shortcut stays
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(forward(pruned, x), forward(masked(resnet, groups, plan), x), rtol=1e-9, atol=1e-10)


def test_skipped_blocks_trace_into_their_stage_group_and_count_exactly(resnet: nn.Module) -> None:
    gen = torch.Generator().manual_seed(13)
    resnet = resnet.float()
    groups = channel_groups(resnet)
    plan = plan_with_empty_blocks(groups, gen)
    pruned = apply(resnet, plan, groups=groups)
    stage = {g.id: g for g in channel_groups(pruned)}["layer1.0.conv3"]
    assert "layer1.1.shift" in stage.norms and "layer1.1.conv3" not in stage.producers
    assert "layer1.1.conv1" not in {c.name for c in stage.consumers}
    params, flops = by_hand(pruned)
    shifts = sum(m.shift.num_features for m in pruned.modules() if isinstance(m, SkippedBlock))
    assert (count_params(pruned), count_flops(pruned, SHAPE)[0]) == (params + shifts, flops)
    removed = torch.tensor([g.size - len(plan[g.id]) for g in groups])
    assert CostModel(resnet, groups, count_flops(resnet, SHAPE)).cost(removed) == (params + shifts, flops)
    # a pruned model with skipped blocks prunes further: its shifts shrink with their stage
    again = apply(pruned, {"layer1.0.conv3": torch.arange(3)})
    assert again.layer1[1].shift.bias.shape == (3,)


def test_rebuild_of_skipped_blocks_from_counts(resnet: nn.Module, tmp_path) -> None:
    gen = torch.Generator().manual_seed(14)
    pruned = apply(resnet, plan_with_empty_blocks(channel_groups(resnet), gen)).float()
    counts = channel_counts(pruned)
    assert counts["layer2.0.conv1"] == counts["layer2.0.conv2"] == 0 and "layer2.0.conv3" not in counts
    path = save_tensors(tmp_path / "model.safetensors", pruned.state_dict())
    rebuilt = slim_to(small("resnet50_small"), counts)
    rebuilt.load_state_dict(load_tensors(path))
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    assert torch.equal(forward(rebuilt, x), forward(pruned, x))


def test_only_bottleneck_inner_groups_may_be_emptied(resnet: nn.Module) -> None:
    with pytest.raises(NapkitError, match="must keep at least one channel"):
        apply(resnet, {"layer1.0.conv3": []})
    with pytest.raises(NapkitError, match="must keep at least one channel"):
        apply(small("vgg16_small"), {"features.0": []})


def fake_timer(per_call: float):
    """A layer costs ``per_call`` ms plus 1e-6 ms per multiply-accumulate per output position."""

    def timer(layer: nn.Module, x: torch.Tensor) -> float:
        with torch.no_grad():
            out = layer(x)
        macs = layer.weight.numel() * (out[0, 0].numel() if out.dim() == 4 else 1)
        return per_call + 1e-6 * macs

    return timer


def test_latency_ranking_removes_blocks_only_when_allowed() -> None:
    model = small("resnet50_small")
    table = LatencyTable.measure(model, SHAPE, timer=fake_timer(1.0), progress=False)

    def prune(remove_blocks: bool) -> nn.Module:
        from napkit.structured.importance import ChannelImportance

        class Flops(ChannelImportance):
            name = "flops"

            def __call__(self, m, groups, inputs):
                return {g.id: torch.ones(g.size, dtype=torch.float64) for g in groups}

        pruner = StructuredPruner(Flops(), model, input_shape=SHAPE, step_fraction=0.1, target_flops_reduction=2.0,
                                  latency=table, remove_blocks=remove_blocks)
        pruned, it = model, 0
        while not pruner.reached(pruned):
            it += 1
            pruned = pruner(pruned, it)
        assert pruner.measure(pruned)["flops_reduction"] >= 2.0
        return pruned

    groups = {g.id: g for g in channel_groups(model)}
    inner, stage = groups["layer1.0.conv1"], groups["layer1.0.conv3"]
    whole = table.modules_ms(model, [f"layer1.0.conv{i}" for i in (1, 2, 3)])
    assert whole / inner.size > table.saved_ms(model, inner)  # 1 ms a call: the block's share is the larger
    credit = StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=0.1, latency=table, remove_blocks=True)
    plain = StructuredPruner("l1", model, input_shape=SHAPE, step_fraction=0.1, latency=table)
    assert credit._saved_ms(model, inner) == pytest.approx(whole / inner.size)
    assert plain._saved_ms(model, inner) == table.saved_ms(model, inner)
    assert credit._saved_ms(model, stage) == table.saved_ms(model, stage)  # not a block's inner group
    with_blocks, without = prune(True), prune(False)
    assert not any(isinstance(m, SkippedBlock) for m in without.modules())
    assert skipped_blocks(with_blocks)  # 1 ms per call: whole blocks are the cheapest milliseconds
    assert table.model_ms(with_blocks) < table.model_ms(without)
    assert forward(with_blocks, torch.randn(1, 3, SIZE, SIZE)).shape == (1, 10)
