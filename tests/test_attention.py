"""Attention heads as channels: HeadAttention is nn.MultiheadAttention, heads are traced, scored and cut."""

from __future__ import annotations

import copy

import pytest
import torch
from test_kfac import exact_weight_grads
from test_structured import forward
from torch import Tensor, nn
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

from napkit.curvature import estimate_kfac
from napkit.errors import NapkitError
from napkit.models import create_model
from napkit.structured import ScoreInputs, StructuredPruner, apply, channel_groups, create_channel_importance
from napkit.structured.attention import (
    GridHeadAttention,
    HeadAttention,
    WindowHeadAttention,
    WindowHeadAttentionV2,
    prunable_attention,
)
from napkit.structured.groups import trace_groups
from napkit.structured.latency import LatencyTable


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_head_attention_is_multihead_attention(batch_first: bool, bias: bool, train: bool) -> None:
    """Same outputs in its own (prunable) form, and through torch's function for every other call."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, bias=bias, batch_first=batch_first, dtype=torch.float64).train(train)
    mha.out_proj.weight.requires_grad_(False)
    ours = HeadAttention.from_torch(mha)
    assert ours.training == train and set(ours.state_dict()) == set(mha.state_dict())
    assert not ours.out_proj.weight.requires_grad and ours.in_proj_weight.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), mha.state_dict().values()))
    x, other = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    length = x.shape[1] if batch_first else x.shape[0]
    mask = torch.randn(length, length, dtype=torch.float64)
    calls = [((x, x, x), {"need_weights": False}), ((x, x, x), {}), ((x, other, other), {"need_weights": False}),
             ((x, x, x), {"attn_mask": mask, "average_attn_weights": False})]
    for args, kwargs in calls:
        expected, expected_weights = mha(*args, **kwargs)
        out, weights = ours(*args, **kwargs)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert (weights is None) == (expected_weights is None)
        if weights is not None:
            torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12)


def test_other_attention_kinds_stay_torchs() -> None:
    with pytest.raises(NapkitError, match="plain self-attention"):
        HeadAttention.from_torch(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))  # its fast path reads torch's
    prunable_attention(model)
    assert type(model[0].self_attn) is nn.MultiheadAttention
    attention = HeadAttention(8, 2, 4, batch_first=True)
    attention.keep_heads(torch.tensor([1]))
    attention.out_proj = nn.Linear(4, 8)  # the surgery cuts its columns as the heads' consumer
    x = torch.randn(1, 3, 8)
    assert attention(x, x, x, need_weights=False)[0].shape == (1, 3, 8)
    with pytest.raises(NapkitError, match="lost heads"):
        attention(x, x, x, attn_mask=torch.zeros(3, 3))


def vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=24,
                             num_classes=5)


def test_swapping_keeps_the_function_and_the_weights_file() -> None:
    plain = vit().double().eval()
    swapped = prunable_attention(copy.deepcopy(plain))
    assert isinstance(swapped.encoder.layers[0].self_attention, HeadAttention)
    swapped.load_state_dict(plain.state_dict())  # a torchvision checkpoint loads as it is
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(forward(swapped, x), forward(plain, x), rtol=1e-10, atol=1e-12)
    built = create_model("vit_b_32", num_classes=5, in_channels=3, input_size=64)  # the builders swap too
    assert isinstance(built.encoder.layers[0].self_attention, HeadAttention)


class _Calls(nn.Module):
    """One attention called with weights (not its prunable form), one called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.weighted = nn.Linear(3, 8), HeadAttention(8, 2, 4, batch_first=True)
        self.twice = HeadAttention(8, 2, 4, batch_first=True)
        self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x)
        a, _ = self.weighted(t, t, t)  # need_weights defaults to True
        b = self.mid(a)
        c = self.twice(b, b, b, need_weights=False)[0]
        d = self.twice(c, c, c, need_weights=False)[0]
        return self.head(d.mean(1))


def test_attention_outside_its_prunable_form_keeps_its_heads() -> None:
    tracing = trace_groups(_Calls())
    assert tracing.groups == []
    assert tracing.unpruned["embed"] == ("attention weighted called with masks, weights or as cross-attention",)
    assert any("runs twice" in r for r in tracing.unpruned["twice"])  # its heads
    assert any("runs twice" in r for r in tracing.unpruned["twice.out_proj"])  # and the rows it writes


def test_heads_are_groups_read_by_out_proj_in_head_dim_blocks() -> None:
    groups = {g.id: g for g in channel_groups(prunable_attention(vit()))}
    heads = groups["encoder.layers.encoder_layer_0.self_attention"]
    assert (heads.size, heads.producers) == (4, ("encoder.layers.encoder_layer_0.self_attention",))
    assert [(c.name, c.block) for c in heads.consumers] == [("encoder.layers.encoder_layer_0.self_attention.out_proj", 4)]
    pruned = apply(prunable_attention(vit()), {heads.id: torch.tensor([0, 2])})
    attention = pruned.encoder.layers[0].self_attention
    assert (attention.num_heads, attention.in_proj_weight.shape, attention.out_proj.in_features) == (2, (24, 16), 8)


class _OneToken(nn.Module):
    """Tokens -> self-attention -> classifier: with one token the K-FAC of each projection is its exact Fisher."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(3, 8), HeadAttention(8, 2, 4, batch_first=True), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.tanh(self.embed(x))
        out, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(out.mean(1))


@pytest.mark.parametrize("layer", ["attention.in_proj", "attention.out_proj"])
def test_projection_factors_are_the_exact_fisher_for_one_example_and_token(layer: str) -> None:
    torch.manual_seed(0)
    model = _OneToken().double()
    x, y = torch.randn(1, 1, 3, dtype=torch.float64), torch.tensor([2])
    f = estimate_kfac(model, [(x, y)], num_samples=1, fisher="empirical", dtype=torch.float64,
                      progress=False)[layer]
    v = exact_weight_grads(model, layer, x, y)[0]
    torch.testing.assert_close(f.kron_dense(), torch.outer(v, v), rtol=1e-10, atol=1e-12)


def test_nap_scores_and_prunes_heads() -> None:
    """Each head's NAP score is the compensated cost of its out_proj column block; the step removes heads."""
    model = prunable_attention(vit()).eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)  # ViT's zero-initialised head would leave the loss flat
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    factors = estimate_kfac(model, [(x, y)], num_samples=32, progress=False)
    groups = channel_groups(model)
    scores = create_channel_importance("nap")(model, groups, ScoreInputs(factors))
    heads = [g.id for g in groups if g.id.endswith("self_attention")]
    assert len(heads) == 2 and all(bool(torch.isfinite(scores[h]).all() and (scores[h] > 0).all()) for h in heads)
    pruner = StructuredPruner("nap", model, input_shape=(1, 3, 32, 32), step_fraction=0.6, allocation="uniform",
                              factors_provider=lambda m, i: factors)
    pruned = pruner(model, 1)
    assert [pruned.get_submodule(h).num_heads for h in heads] == [2, 2]
    assert forward(pruned, x[:2]).shape == (2, 5)


def test_a_latency_table_without_the_attention_is_refused_up_front() -> None:
    model = prunable_attention(vit()).eval()
    table = LatencyTable.measure(model, (1, 3, 32, 32), timer=lambda layer, x: 1.0, progress=False)
    with pytest.raises(NapkitError, match="latency table times plain Conv2d and Linear.*encoder_layer_0.self_attention"):
        StructuredPruner("l1", model, input_shape=(1, 3, 32, 32), step_fraction=0.5, latency=table)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("window,size", [([2, 2], 32), ([3, 3], 40)])  # 40 px: windows that need padding
def test_window_head_attention_is_swins(window: list[int], size: int, v2: bool) -> None:
    torch.manual_seed(0)
    kinds = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    swin = SwinTransformer([4, 4], 8, [2, 2], [2, 2], window, num_classes=5, **kinds).double().eval()
    for p in swin.parameters():  # every parameter matters, V2's key biases too (torchvision never uses them)
        p.data = torch.randn_like(p) * 0.5
    ours = prunable_attention(copy.deepcopy(swin))
    assert sum(isinstance(m, WindowHeadAttentionV2 if v2 else WindowHeadAttention) for m in ours.modules()) == 4
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), swin.state_dict().values()))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    torch.testing.assert_close(forward(ours, x), forward(swin, x), rtol=1e-12, atol=1e-12)


def test_a_swin_head_takes_its_bias_table_column() -> None:
    model = prunable_attention(SwinTransformer([4, 4], 8, [1, 1], [2, 4], [2, 2], num_classes=5))
    heads = {g.id: g for g in channel_groups(model)}["features.3.0.attn"]
    assert [(c.name, c.block) for c in heads.consumers] == [("features.3.0.attn.proj", 4)]
    table = model.features[3][0].attn.relative_position_bias_table.detach().clone()
    pruned = apply(model, {heads.id: torch.tensor([1, 3])})
    attention = pruned.features[3][0].attn
    assert (attention.num_heads, attention.qkv.out_features, attention.proj.in_features) == (2, 24, 8)
    assert torch.equal(attention.relative_position_bias_table, table[:, [1, 3]])


def test_grid_head_attention_is_maxvits_and_a_head_takes_its_table_column() -> None:
    torch.manual_seed(0)
    maxvit = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1],
                    head_dim=4, stochastic_depth_prob=0.0, num_classes=5).double().eval()
    for p in maxvit.parameters():
        p.data = torch.randn_like(p) * 0.3
    ours = prunable_attention(copy.deepcopy(maxvit))
    assert sum(isinstance(m, GridHeadAttention) for m in ours.modules()) == 4
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), maxvit.state_dict().values()))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(forward(ours, x), forward(maxvit, x), rtol=1e-12, atol=1e-12)
    name = "blocks.1.layers.0.layers.grid_attention.attn_layer.1"
    table = ours.get_submodule(name).relative_position_bias_table.detach().clone()
    pruned = apply(ours, {name: torch.tensor([0, 2])}).get_submodule(name)
    assert (pruned.n_heads, pruned.to_qkv.out_features, pruned.merge.in_features) == (2, 24, 8)
    assert torch.equal(pruned.relative_position_bias_table, table[:, [0, 2]])


def test_a_swin_v2_head_takes_its_logit_scale_and_bias_mlp_row() -> None:
    model = prunable_attention(SwinTransformer([4, 4], 8, [1, 1], [2, 4], [2, 2], num_classes=5,
                                               block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2))
    heads = {g.id: g for g in channel_groups(model)}["features.3.0.attn"]
    attention = model.features[3][0].attn
    scale, last = attention.logit_scale.detach().clone(), attention.cpb_mlp[2].weight.detach().clone()
    pruned = apply(model, {heads.id: torch.tensor([1, 3])}).features[3][0].attn
    assert (pruned.num_heads, pruned.qkv.out_features, pruned.cpb_mlp[2].out_features) == (2, 24, 2)
    assert torch.equal(pruned.logit_scale, scale[[1, 3]]) and torch.equal(pruned.cpb_mlp[2].weight, last[[1, 3]])
