"""Structured pruning across torchvision's families: new couplings are exact, the rest is left unpruned."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_structured import forward, masked, randomize_norms
from torch import nn
from torchvision import models as tvm
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.efficientnet import EfficientNet, MBConvConfig
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

from napkit.curvature import LayersNotRunWarning, estimate_kfac
from napkit.errors import NapkitError
from napkit.structured import (
    ChannelGroup,
    CostModel,
    StructuredPruner,
    apply,
    channel_counts,
    count_flops,
    count_params,
    slim_to,
)
from napkit.structured.attention import ATTENTIONS, prunable_attention
from napkit.structured.groups import UnprunedLayersWarning, trace_groups
from napkit.structured.importance import NapChannels, ScoreInputs
from napkit.structured.zoo import check_model, main

# one model per family at the zoo's input sizes (ViT a 2x2 patch grid, the rest 64 px); Swin needs 224 px
# to reach 2x (every stage is padded to whole windows), so CI checks it on a tiny instance below
FAMILIES = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "shufflenet_v2_x1_0",
            "densenet121", "regnet_y_400mf", "vit_b_32"]


def tiny(name: str) -> nn.Module:
    """Small instances of each coupling: SE + depthwise, LayerNorm-coupled MLPs, attention, shuffle,
    concatenations."""
    torch.manual_seed(0)
    if name == "convnext":
        return ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], num_classes=5)
    if name == "vit":  # as napkit's builders make it: prunable heads
        return prunable_attention(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=16, mlp_dim=24, num_classes=5))
    if name == "swin":  # as napkit's builders make it: prunable heads
        return prunable_attention(SwinTransformer([4, 4], 8, [1, 1], [2, 2], [2, 2], num_classes=5))
    if name == "maxvit":  # MBConv, then window and grid attention over partitions of the map
        return prunable_attention(MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                                         block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5))
    if name == "swin_v2":
        return prunable_attention(SwinTransformer([4, 4], 8, [1, 1], [2, 2], [2, 2], num_classes=5,
                                                  block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2))
    if name == "resnext":
        return tvm.ResNet(tvm.resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, groups=4, width_per_group=4)
    if name == "mobilenet_v3_small":
        return tvm.mobilenet_v3_small(width_mult=0.25, num_classes=5)
    if name == "densenet":  # 8 stem channels, each dense layer concatenates 4 more
        return tvm.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5)
    if name == "googlenet":
        return tvm.googlenet(num_classes=5, aux_logits=False, init_weights=False)
    if name == "efficientnet":
        setting = [MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(6, 5, 2, 8, 16, 2)]
        return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=5)
    return tvm.get_model(name, num_classes=5)


TINY = ["mobilenet_v3_small", "efficientnet", "convnext", "vit", "swin", "swin_v2", "maxvit", "shufflenet_v2_x0_5",
        "regnet_y_400mf", "mnasnet0_5", "resnext", "regnet_x_400mf", "densenet", "googlenet", "squeezenet1_1"]


def randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics, BatchNorm and LayerNorm affine terms (eval-mode normalisation matters),
    Linear biases and layer scales."""
    randomize_norms(model, gen)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data = torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype) * 0.1
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.data = torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype)
        if hasattr(m, "layer_scale"):  # ConvNeXt's, 1e-6 at init: the blocks would barely matter
            m.layer_scale.data = torch.rand(m.layer_scale.shape, generator=gen, dtype=m.layer_scale.dtype) + 0.5


def random_plan(groups: list[ChannelGroup], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random proper subset of every group; the same positions of every block of a folded group."""
    plan = {}
    for g in groups:
        width = g.size // g.fold
        keep = torch.randperm(width, generator=gen)[: int(torch.randint(1, width, (1,), generator=gen))]
        plan[g.id] = (torch.arange(g.fold)[:, None] * width + keep).reshape(-1)
    return plan


@pytest.mark.parametrize("name", FAMILIES)
def test_family_prunes_to_half_the_flops_and_runs(name: str) -> None:
    row = check_model(name)
    assert row.ok, row
    assert 2.0 <= row.flops_reduction < 2.2  # the step stops at the first channel reaching the target


@pytest.mark.parametrize("name", TINY)
def test_removal_equals_masking(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    model = tiny(name).double().eval()
    randomize(model, gen)
    tracing = trace_groups(model)
    assert tracing.groups, "every family has prunable groups"
    plan = random_plan(tracing.groups, gen)
    pruned = apply(model, plan, groups=tracing.groups)
    assert count_params(pruned) < count_params(model)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(forward(pruned, x), forward(masked(model, tracing.groups, plan), x), rtol=1e-9, atol=1e-10)


def test_couplings_land_in_the_right_groups() -> None:
    groups = {g.id: g for g in trace_groups(tiny("mobilenet_v3_small")).groups}
    # block 1: SE scale (fc2) coupled with the stem conv, through the depthwise conv
    stem = groups["features.0.0"]
    assert stem.producers == ("features.0.0", "features.1.block.1.fc2")
    assert stem.depthwise == ("features.1.block.0.0",)
    assert [c.name for c in stem.consumers] == ["features.1.block.1.fc1", "features.1.block.2.0"]
    assert groups["features.1.block.1.fc1"].consumers[0].name == "features.1.block.1.fc2"  # SE hidden units
    vit = {g.id: g for g in trace_groups(tiny("vit")).groups}
    assert list(vit) == ["conv_proj"] + [f"encoder.layers.encoder_layer_{i}.{m}" for i in (0, 1)
                                         for m in ("self_attention", "mlp.0")]
    stream = vit["conv_proj"]  # the residual stream: patches, class token, position embedding, every block's writes
    assert stream.params == (("class_token", 2), ("encoder.pos_embedding", 2))
    assert [c.name for c in stream.consumers][:2] == ["encoder.layers.encoder_layer_0.self_attention.in_proj",
                                                     "encoder.layers.encoder_layer_0.mlp.0"]
    assert stream.consumers[-1].name == "heads.head" and len(stream.norms) == 5
    assert vit["encoder.layers.encoder_layer_0.mlp.0"].consumers[0].block == 1


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnext", "densenet", "convnext", "vit", "swin", "swin_v2", "maxvit"])
def test_cost_model_counts_depthwise_grouped_concatenating_and_attention_layers_exactly(name: str) -> None:
    model = tiny(name)
    shape = (1, 3, 32, 32)
    groups = trace_groups(model).groups
    assert any(g.depthwise or g.fold > 1 or g.spans or g.params or isinstance(model.get_submodule(g.id), ATTENTIONS)
               for g in groups)
    plan = random_plan(groups, torch.Generator().manual_seed(2))
    pruned = apply(model, plan, groups=groups)
    removed = torch.tensor([g.size - len(plan[g.id]) for g in groups])
    cost = CostModel(model, groups, count_flops(model, shape)).cost(removed)
    assert cost == (count_params(pruned), count_flops(pruned, shape)[0])


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnext", "densenet", "convnext", "vit", "swin", "swin_v2", "maxvit"])
def test_rebuild_depthwise_grouped_concatenating_and_attention_models_from_counts(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    model = tiny(name).eval()
    pruned = apply(model, random_plan(trace_groups(model).groups, gen))
    rebuilt = slim_to(tiny(name), channel_counts(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=gen)
    assert torch.equal(forward(rebuilt, x), forward(pruned, x))


def test_concatenation_parts_are_groups_at_their_offsets() -> None:
    tracing = trace_groups(tiny("densenet"))
    assert list(tracing.unpruned) == ["classifier"]  # only the logits
    groups = {g.id: g for g in tracing.groups}
    new = groups["features.denseblock1.denselayer1.conv2"]  # 4 channels after the stem's 8, read by all after it
    assert [c.name for c in new.consumers] == ["features.denseblock1.denselayer2.conv1", "features.transition1.conv"]
    assert new.norms == ("features.denseblock1.denselayer2.norm1", "features.transition1.norm")
    assert [(new.windows(n), new.width(n)) for n in new.norms] == [((slice(8, 12),), 12), ((slice(8, 12),), 16)]
    assert groups["features.conv0"].windows("features.transition1.conv") == (slice(0, 8),)
    assert groups["features.denseblock2.denselayer2.conv2"].consumers[-1].name == "classifier"
    plan = {"features.denseblock1.denselayer1.conv2": torch.tensor([1, 3]), "features.conv0": torch.arange(6)}
    pruned = apply(tiny("densenet"), plan)
    assert pruned.features.transition1.conv.in_channels == 16 - 2 - 2
    assert pruned.features.denseblock1.denselayer2.norm1.num_features == 12 - 2 - 2


def test_unsupported_coupling_is_one_warning_naming_the_layers() -> None:
    model = tiny("shufflenet_v2_x0_5")  # channel shuffle: a view of the concatenated branches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = StructuredPruner("l1", model, input_shape=(1, 3, 32, 32), step_fraction=0.5)
    found = [w for w in caught if issubclass(w.category, UnprunedLayersWarning)]
    assert len(found) == 1
    message = str(found[0].message)
    assert ".view() at view" in message and "stage2.0.branch2.5" in message
    assert pruner.unpruned and "stage2.0.branch2.5" in pruner.unpruned
    pruned = pruner(model, 0)  # the branches' inner channels still go
    assert pruned.stage2[1].branch2[0].out_channels < model.stage2[1].branch2[0].out_channels
    assert forward(pruned, torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_ignore_leaves_those_layers_untouched() -> None:
    model = tiny("mobilenet_v3_small")
    ignore = ["features.1", "features.2.block.1"]
    tracing = trace_groups(model, ignore)
    members = [m for g in tracing.groups for m in g.producers + g.depthwise + g.norms]
    members += [c.name for g in tracing.groups for c in g.consumers]
    assert not [m for m in members if m.startswith(("features.1.", "features.2.block.1."))]
    assert "features.0.0" in tracing.unpruned  # coupled with features.1 through its depthwise conv
    assert len(tracing.groups) < len(trace_groups(model).groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnprunedLayersWarning)  # ignoring on purpose is no warning
        pruner = StructuredPruner("l1", model, input_shape=(1, 3, 32, 32), step_fraction=0.5, ignore=ignore)
    pruned = pruner(model, 0)
    for name, m in model.named_modules():
        if name.startswith(("features.1.", "features.2.block.1.")) and hasattr(m, "weight"):
            assert pruned.get_submodule(name).weight.shape == m.weight.shape, name


class _Shared(nn.Module):
    """A conv applied twice (shared weights) next to an ordinary prunable pair."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.shared = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.shared(self.b(torch.relu(self.a(x)))))
        return self.head(x.mean((2, 3)))


def test_shared_layer_freezes_only_its_groups() -> None:
    tracing = trace_groups(_Shared())
    assert [g.id for g in tracing.groups] == ["a"]
    assert any("runs twice" in r for r in tracing.unpruned["b"])


def test_model_without_prunable_groups_fails_clearly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(NapkitError, match="no prunable channel groups.*LayerNorm"):
        StructuredPruner("l1", model, input_shape=(1, 3, 8, 8), step_fraction=0.5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_x_400mf", "inception_v3"])
def test_zoo_with_nap_scores(name: str) -> None:
    """The zoo's NAP mode: K-FAC on noise (random labels: Inception v3's random softmax is saturated), channel
    scores through SE blocks, grouped convs and aux heads that do not run in eval mode, consumer refits."""
    row = check_model(name, criterion="nap", allocation="global")
    assert row.ok, row.error
    assert 2.0 <= row.flops_reduction < 2.1


def test_zoo_cli_prints_count_last(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models", "resnet18", "mobilenet_v3_small", "--no-torch-pruning"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "zoo_ok=2/2"
    assert lines[1].split()[:2] == ["resnet18", "ok"]


def test_grouped_convs_couple_evenly() -> None:
    model = tiny("resnext")  # layer1.0.conv2: 16 -> 16 channels in 4 groups
    assert trace_groups(model).unpruned == {"fc": ("network output",)}
    groups = {g.id: g for g in trace_groups(model).groups}
    inner = groups["layer1.0.conv1"]
    assert (inner.fold, [c.name for c in inner.consumers]) == (4, ["layer1.0.conv2"])
    assert groups["layer1.0.conv2"].fold == 4
    uneven = torch.arange(1, 16)  # drops channel 0 of the first block only
    with pytest.raises(NapkitError, match="same channels in each of its 4 blocks"):
        apply(model, {"layer1.0.conv1": uneven})


def test_l1_step_prunes_grouped_convs_evenly() -> None:
    model = tiny("resnext").eval()
    pruner = StructuredPruner("l1", model, input_shape=(1, 3, 32, 32), step_fraction=0.5, allocation="uniform")
    pruned = pruner(model, 0)
    conv = pruned.layer1[0].conv2
    assert conv.groups == 4 and conv.in_channels == conv.out_channels == 8  # half of each group's 4 channels
    assert forward(pruned, torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnext", "convnext", "vit", "swin", "swin_v2", "maxvit"])
def test_nap_scores_the_new_groups(name: str) -> None:
    """NAP (K-FAC OBS) ranks SE, depthwise-coupled, grouped-conv and MLP hidden-unit groups from their members'
    factors, estimated the default way (ViT's and Swin's heads run their output projections as modules)."""
    model = tiny(name)
    for m in model.modules():  # ViT's zero-initialised head would leave the loss flat
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.1)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LayersNotRunWarning)
        factors = estimate_kfac(model, [(x, y)], num_samples=16, progress=False)
    not_run = [w for w in caught if issubclass(w.category, LayersNotRunWarning)]
    # Swin V2's bias MLP runs once per batch on a fixed table, not per sample: no factors, and NAP needs none there
    layers = [n for w in not_run for n in str(w.message).split(": ", 1)[1].split(" (e.g.")[0].split(", ")]
    assert all(name == "swin_v2" and ".cpb_mlp." in n for n in layers), layers
    if name == "resnext":
        assert "layer1.0.conv2#3" in factors
    pruner = StructuredPruner("nap", model, input_shape=(1, 3, 32, 32), step_fraction=0.5,
                              factors_provider=lambda m, i: factors)
    pruned = pruner(model, 1)
    assert count_params(pruned) < count_params(model)
    assert forward(pruned, x[:2]).shape == (2, 5)
    if name in ("convnext", "swin", "swin_v2", "vit", "maxvit"):  # a LayerNorm-coupled stream is scored from its consumers (qkv too)
        stream = [g for g in pruner.dense_groups if any(isinstance(model.get_submodule(n), nn.LayerNorm) for n in g.norms)]
        scores = NapChannels()(model, stream, ScoreInputs(factors=factors))
        assert stream and all(torch.isfinite(scores[g.id]).all() and scores[g.id].gt(0).all() for g in stream)
    if name == "resnext":  # some grouped conv lost input channels (NAP ranked them on per-group factors)
        grouped = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
        assert any(pruned.get_submodule(n).weight.shape != shape for n, shape in grouped.items())


class _Broadcast(nn.Module):
    """A 1-channel spatial gate multiplied over 6 channels (CBAM style): shapes disagree, not an error."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 1, 1), nn.Conv2d(6, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = torch.relu(self.b(x * torch.sigmoid(self.gate(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_disagreeing_shapes_leave_only_that_group_unpruned() -> None:
    tracing = trace_groups(_Broadcast())
    assert [g.id for g in tracing.groups] == ["b"]
    assert any("disagree" in r for r in tracing.unpruned["a"])


# --- K-FAC of depthwise convs against brute force --------------------------------------------


def test_a_plain_conv_pruned_to_one_channel_of_a_grey_input_stays_a_producer() -> None:
    """groups == in == out == 1 is a plain conv, not a depthwise one: its group (size 1) is still described,
    so a model pruned that far is rebuilt from its channel counts (a grey ResNet stem at max sparsity)."""
    from napkit.layers import is_depthwise
    from napkit.structured.groups import trace_groups

    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.BatchNorm2d(1), nn.ReLU(),
                          nn.Conv2d(1, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    assert not is_depthwise(model[0]) and is_depthwise(nn.Conv2d(4, 4, 3, groups=4))
    assert [g.id for g in trace_groups(model).groups] == ["0", "3"]
