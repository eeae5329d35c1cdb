"""LayerNorm over channels and per-channel parameters: members of a group, cut so the model equals the masked one."""

from __future__ import annotations

import copy

import pytest
import torch
from test_structured import forward, masked
from test_zoo import randomize, tiny
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d

from napkit.structured import apply, channel_counts, slim_to
from napkit.structured.groups import trace_groups
from napkit.structured.norms import KeptLayerNorm, KeptLayerNorm2d
from napkit.structured.surgery import slice_norm


@pytest.mark.parametrize("first", [True, False])
def test_a_cut_layer_norm_equals_the_norm_over_zeroed_channels(first: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    norm = (LayerNorm2d(7) if first else nn.LayerNorm(7)).double()
    norm.weight.data, norm.bias.data = (torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(2))
    dense = copy.deepcopy(norm)
    x = torch.randn(2, 7, 3, 3, generator=gen, dtype=torch.float64)
    x, dim = (x, 1) if first else (x.permute(0, 2, 3, 1), -1)
    # two cuts: channels 1 and 4, then (of the 5 left) positions 1 and 3; the divisor stays 7
    for keep, kept in ((torch.tensor([0, 2, 3, 5, 6]), [0, 2, 3, 5, 6]), (torch.tensor([0, 2, 4]), [0, 3, 6])):
        slice_norm(norm, keep)
        assert isinstance(norm, KeptLayerNorm2d if first else KeptLayerNorm) and norm.full == 7
        index = torch.tensor(kept)
        zeroed = torch.zeros_like(x).index_copy(dim, index, x.index_select(dim, index))
        with torch.no_grad():
            got, want = norm(x.index_select(dim, index)), dense(zeroed).index_select(dim, index)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_convnext_stream_is_one_group_with_layer_norms_and_layer_scales() -> None:
    tracing = trace_groups(tiny("convnext"))
    assert list(tracing.unpruned) == ["classifier.2"]  # only the logits
    stem = {g.id: g for g in tracing.groups}["features.0.0"]
    assert stem.producers == ("features.0.0", "features.1.0.block.5", "features.1.1.block.5")
    assert stem.norms == ("features.0.1", "features.1.0.block.2", "features.1.1.block.2", "features.2.0")
    assert stem.params == (("features.1.0.layer_scale", 0), ("features.1.1.layer_scale", 0))
    assert stem.depthwise == ("features.1.0.block.0", "features.1.1.block.0")


def test_pruned_convnext_rebuilds_and_prunes_again() -> None:
    gen = torch.Generator().manual_seed(4)
    model = tiny("convnext").double().eval()
    randomize(model, gen)
    once = apply(model, {"features.0.0": torch.tensor([0, 2, 3, 5, 6, 7])})
    assert once.features[1][0].layer_scale.shape == (6, 1, 1)
    rebuilt = slim_to(tiny("convnext").double(), channel_counts(once))
    rebuilt.load_state_dict(once.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    assert torch.equal(forward(rebuilt, x), forward(once, x))
    twice = apply(once, {"features.0.0": torch.tensor([1, 4, 5])})  # channels 2, 6, 7 of the dense stem
    plan = {"features.0.0": torch.tensor([2, 6, 7])}
    stem = [g for g in trace_groups(model).groups if g.id == "features.0.0"]
    torch.testing.assert_close(forward(twice, x), forward(masked(model, stem, plan), x),
                               rtol=1e-10, atol=1e-12)


class _Scaled(nn.Module):
    """A per-channel scale, a position-like bias and a viewed scale (parameters), one parameter also used
    otherwise, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 3, 1)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 1, 1, 5))
        self.odd = nn.Parameter(torch.rand(6, 1, 1))
        self.gamma = nn.Parameter(torch.rand(3) + 0.5)  # timm's layer scale: a vector viewed as [1, C, 1, 1]
        self.register_buffer("fixed", torch.rand(4, 1, 1))
        self.fa, self.fb, self.fc, self.fd = nn.Linear(4, 2), nn.Linear(5, 2), nn.Linear(6, 2), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.a(x) * self.scale * self.fixed
        b = (self.b(x).permute(0, 2, 3, 1) + self.shift).permute(0, 3, 1, 2)
        c = self.c(x) * self.odd + self.odd.sum()
        d = self.d(x).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.fa(a.mean((2, 3))) + self.fb(b.mean((2, 3))) + self.fc(c.mean((2, 3))) + self.fd(d.mean((2, 3)))


def test_parameters_join_the_channels_they_scale_or_freeze_them() -> None:
    model = _Scaled().double()
    tracing = trace_groups(model)
    groups = {g.id: g for g in tracing.groups}
    assert groups["b"].params == (("shift", 3),)
    assert groups["d"].params == (("gamma", 0),)
    assert "c" in tracing.unpruned  # self.odd is also summed: a use napkit cannot cut
    assert "a" in tracing.unpruned  # also times a buffer: a constant napkit does not cut
    plan = {"b": torch.tensor([0, 3]), "d": torch.tensor([1, 2])}
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    chosen = [groups["b"], groups["d"]]
    pruned = apply(model, plan, groups=chosen)
    assert pruned.shift.shape == (1, 1, 1, 2) and pruned.gamma.shape == (2,)
    torch.testing.assert_close(forward(pruned, x), forward(masked(model, chosen, plan), x), rtol=1e-10, atol=1e-12)


def _trained_convnext() -> tuple[nn.Module, Tensor, Tensor]:
    """A small ConvNeXt trained briefly on the embedded digits (upsampled to 32 px), and its validation split."""
    from sklearn.datasets import load_digits
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.nn.functional.interpolate(torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0, size=32,
                                        mode="bilinear").repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    model = ConvNeXt([CNBlockConfig(24, 48, 2), CNBlockConfig(48, None, 2)], num_classes=10, layer_scale=1.0)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    for _ in range(8):
        for idx in torch.randperm(1500).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[1500:], y[1500:]


def test_layer_norm_statistics_shift_is_second_order_on_a_trained_convnext() -> None:
    """NAP's quadratic model prices a stream channel's removal at its consumers' inputs; the cut also moves every
    LayerNorm's statistics. Removing each channel with (masked model) and without that shift (consumers read 0,
    the stream untouched) must rank the channels alike, and the shift must not dominate the increase."""
    model, x, y = _trained_convnext()

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(x), y))

    base = loss(model)
    assert base < 0.6  # trained: the comparison means something
    group = {g.id: g for g in trace_groups(model).groups}["features.0.0"]
    consumers_only, shifted = [], []
    for c in range(group.size):
        hooks = [model.get_submodule(k.name).register_forward_pre_hook(
            lambda m, inp, c=c: (inp[0].index_fill(1 if isinstance(m, nn.Conv2d) else -1, torch.tensor([c]), 0.0),))
            for k in group.consumers]
        consumers_only.append(loss(model) - base)
        for h in hooks:
            h.remove()
        keep = torch.tensor([k for k in range(group.size) if k != c])
        shifted.append(loss(masked(model, [group], {group.id: keep})) - base)
    a, b = torch.tensor(consumers_only), torch.tensor(shifted)
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    assert torch.corrcoef(ranks)[0, 1] > 0.8
    assert 0.5 < float(b.mean() / a.mean()) < 2.0
