"""K-FAC factors against brute force on tiny float64 networks (nap.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from napkit.curvature import (
    KFACFactors,
    a_block_size,
    all_reduce_factors,
    conv_patches,
    estimate_kfac,
    lattice_step,
    load_factors,
    merge_factors,
    model_fingerprint,
    sample_labels,
    save_factors,
    weight_with_bias,
)
from napkit.errors import NapkitError

N, BATCH = 32, 8


class TinyNet(nn.Module):
    """Conv(bias, padding 1: T=36) -> ReLU -> Conv(no bias, stride 2: T=4) -> flatten -> Linear(bias).

    The ReLU is in-place on the conv output (as in VGG/AlexNet): G must still be dL/d(conv output).
    """

    def __init__(self, fc_out: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, bias=False)
        self.fc = nn.Linear(16, fc_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv2(self.relu(self.conv1(x))).flatten(1))


def _with_eps(params: dict[str, Tensor], x: Tensor, y: Tensor, eps: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """TinyNet's loss for one example with additive perturbations of each layer output (brute-force g)."""
    s1 = F.conv2d(x[None], params["conv1.weight"], params["conv1.bias"], padding=1) + eps[0]
    s2 = F.conv2d(torch.relu(s1), params["conv2.weight"], stride=2) + eps[1]
    s3 = F.linear(s2.flatten(1), params["fc.weight"], params["fc.bias"]) + eps[2]
    return F.cross_entropy(s3, y[None], reduction="sum")


def brute_output_grads(model: TinyNet, x: Tensor, y: Tensor) -> list[Tensor]:
    """Per-example gradients dL_n/ds of every layer output, via torch.func (vmap + grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    eps = (torch.zeros(1, 3, 6, 6), torch.zeros(1, 4, 2, 2), torch.zeros(1, 3))
    eps = tuple(e.double() for e in eps)
    per_example = vmap(grad(lambda xi, yi, e: _with_eps(params, xi, yi, e), argnums=2), in_dims=(0, 0, None))
    return [g.squeeze(1) for g in per_example(x, y, eps)]


def brute_inputs(model: TinyNet, x: Tensor) -> list[Tensor]:
    """Homogeneous per-position inputs ``[N, T, d_in_h]`` of each layer, by explicit unfolding."""
    with torch.no_grad():
        h = torch.relu(model.conv1(x))
        a1 = F.unfold(x, 3, padding=1).transpose(1, 2)
        a2 = F.unfold(h, 3, stride=2).transpose(1, 2)
        a3 = model.conv2(h).flatten(1)[:, None, :]
    return [_append_one(a1), a2, _append_one(a3)]


def _append_one(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], 2)


def brute_factors(model: TinyNet, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(A, G) per layer from explicit sums: A = sum a a^T / (N T), G = sum g g^T / N."""
    out = []
    for a, g in zip(brute_inputs(model, x), brute_output_grads(model, x, y)):
        g = g.flatten(2).transpose(1, 2) if g.dim() == 4 else g[:, None, :]
        n, t = a.shape[:2]
        out.append((torch.einsum("nti,ntj->ij", a, a) / (n * t), torch.einsum("nti,ntj->ij", g, g) / n))
    return out


@pytest.fixture(autouse=True)
def _double() -> None:
    torch.manual_seed(0)


@pytest.fixture
def model() -> TinyNet:
    return TinyNet().double()


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    return torch.randn(N, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (N,))


def batches(x: Tensor, y: Tensor, size: int = BATCH) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def estimate(model: nn.Module, loader: list, **kw) -> dict[str, KFACFactors]:
    opts = {"dtype": torch.float64, "progress": False, "num_samples": 10_000} | kw
    return estimate_kfac(model, loader, **opts)


def true_fisher_labels(model: nn.Module, loader: list, seed: int = 0) -> Tensor:
    """The labels estimate_kfac samples for fisher='true' (same generator, same batches)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.cat([sample_labels(model(x), gen) for x, _ in loader])


# --- 1. hooks vs brute force ---------------------------------------------------------------


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_factors_match_brute_force(model, data, fisher):
    x, y = data
    loader = batches(x, y)
    labels = y if fisher == "empirical" else true_fisher_labels(model, loader)
    got = estimate(model, loader, fisher=fisher)
    assert list(got) == ["conv1", "conv2", "fc"]
    for f, (a, g), t in zip(got.values(), brute_factors(model, x, labels), (36, 4, 1)):
        assert f.positions == t and f.num_samples == N
        torch.testing.assert_close(f.A, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f.G, g, rtol=1e-12, atol=1e-12)


def test_true_fisher_differs_from_empirical(model, data):
    loader = batches(*data)
    true, emp = estimate(model, loader), estimate(model, loader, fisher="empirical")
    assert not torch.allclose(true["fc"].G, emp["fc"].G)


def test_bad_options_are_refused(model, data):
    with pytest.raises(NapkitError, match=r"'bogus'.*empirical, true"):
        estimate(model, batches(*data), fisher="bogus")
    with pytest.raises(NapkitError, match="chunk_size must be >= 1, got 0"):
        estimate(model, batches(*data), chunk_size=0)
    with pytest.raises(NapkitError, match=r"\[.grouped.\] have no K-FAC estimate"):
        estimate(model, batches(*data), layers={"grouped": nn.Conv2d(2, 2, 3, groups=2)})
    with pytest.raises(NapkitError, match="no examples"):
        estimate(model, [])


# --- 2. one example, one position: kron(G, A) is the exact Fisher block ---------------------


class OneByOneConv(nn.Module):
    """Conv on a 3x3 input with a 3x3 kernel: one output position."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def exact_weight_grads(model: nn.Module, name: str, x: Tensor, y: Tensor) -> Tensor:
    """Per-example ``vec(dL_n/dW_h)`` (row-major, bias as last column) of layer ``name``, shape [N, d_out*d_in_h]."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, {**params, **p}, (xi[None],))
        return F.cross_entropy(logits, yi[None], reduction="sum")

    own = {k: v for k, v in params.items() if k.startswith(name + ".")}
    grads = vmap(grad(loss), in_dims=(None, 0, 0))(own, x, y)
    w = grads[f"{name}.weight"].flatten(2)
    if f"{name}.bias" in grads:
        w = torch.cat([w, grads[f"{name}.bias"][:, :, None]], 2)
    return w.flatten(1)


@pytest.mark.parametrize(
    ("net", "shape", "name"),
    [(TinyNet, (2, 6, 6), "fc"), (OneByOneConv, (2, 3, 3), "conv"), (OneByOneConv, (2, 3, 3), "fc")],
)
def test_single_example_kron_is_exact_fisher(net, shape, name):
    model = net().double()
    x, y = torch.randn(1, *shape, dtype=torch.float64), torch.tensor([1])
    f = estimate(model, [(x, y)], fisher="empirical")[name]
    assert f.positions == 1
    v = exact_weight_grads(model, name, x, y)[0]
    torch.testing.assert_close(f.kron_dense(), torch.outer(v, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)),
        nn.Conv2d(2, 3, 1, bias=False, padding_mode="circular"),
    ],
)
def test_conv_patches_reproduce_conv(conv):
    conv = conv.double()
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    out = conv(x)
    s = conv_patches(conv, x).transpose(1, 2) @ conv.weight.view(3, -1).T.detach()
    if conv.bias is not None:
        s = s + conv.bias.detach()
    torch.testing.assert_close(s, out.flatten(2).transpose(1, 2).detach())


@pytest.mark.parametrize(("h", "w", "cap", "step"), [(6, 6, None, 1), (6, 6, 36, 1), (6, 6, 9, 2), (6, 6, 4, 3),
                                                     (32, 32, 64, 4), (7, 5, 1, 7)])
def test_lattice_step_is_the_smallest_that_fits(h, w, cap, step):
    assert lattice_step(h, w, cap) == step
    if cap is not None:
        assert math.ceil(h / step) * math.ceil(w / step) <= cap
        assert step == 1 or math.ceil(h / (step - 1)) * math.ceil(w / (step - 1)) > cap


def test_lattice_patches_are_the_lattice_positions_of_all_patches():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    x = torch.randn(2, 2, 11, 9, dtype=torch.float64)
    full = conv_patches(conv, x)  # output grid 6 x 5
    sub = conv_patches(conv, x, lattice=3)
    keep = [i * 5 + j for i in range(0, 6, 3) for j in range(0, 5, 3)]
    torch.testing.assert_close(sub, full[:, :, keep], rtol=0, atol=0)


def test_a_max_positions_uses_the_lattice_for_a_and_every_position_for_g(model, data):
    """conv1 has a 6x6 output grid: a cap of 9 keeps positions (0,2,4)^2 for A; G is unchanged."""
    x, y = data
    loader = batches(x, y)
    full = estimate(model, loader, fisher="empirical")
    capped = estimate(model, loader, fisher="empirical", a_max_positions=9)
    a1 = brute_inputs(model, x)[0]  # [N, 36, d_in + 1]
    keep = [i * 6 + j for i in range(0, 6, 2) for j in range(0, 6, 2)]
    lattice = a1[:, keep]
    torch.testing.assert_close(capped["conv1"].A, torch.einsum("nti,ntj->ij", lattice, lattice) / (N * 9))
    for name in full:
        torch.testing.assert_close(capped[name].G, full[name].G, rtol=0, atol=0)
        assert capped[name].positions == full[name].positions
    for name in ("conv2", "fc"):  # T = 4 and 1: under the cap, untouched
        torch.testing.assert_close(capped[name].A, full[name].A, rtol=0, atol=0)


def test_wide_layers_accumulate_the_upper_blocks_and_mirror_them():
    """d_in = 300 and d_out = 260 go through the block-triangular GEMMs; A and G must equal x^T x."""
    fc = nn.Linear(300, 260, bias=False).double()
    x = torch.randn(40, 300, dtype=torch.float64)
    y = torch.randint(0, 260, (40,))
    got = estimate(fc, [(x[:24], y[:24]), (x[24:], y[24:])], fisher="empirical")[""]
    torch.testing.assert_close(got.A, x.T @ x / 40)
    g = torch.softmax(fc(x), 1).detach() - F.one_hot(y, 260).double()
    torch.testing.assert_close(got.G, g.T @ g / 40)


def test_weight_with_bias_layout(model):
    w = weight_with_bias(model.conv1)
    assert w.shape == (3, 19)
    torch.testing.assert_close(w[:, :-1], model.conv1.weight.detach().view(3, -1))
    torch.testing.assert_close(w[:, -1], model.conv1.bias.detach())
    assert weight_with_bias(model.conv2).shape == (4, 27)


# --- 3. KFC scale for conv layers (T lives in G) ---------------------------------------------


def test_conv_kfc_scale(model, data):
    x, y = data
    f = estimate(model, batches(x, y), fisher="empirical")["conv1"]
    a = brute_inputs(model, x)[0]
    g = brute_output_grads(model, x, y)[0].flatten(2).transpose(1, 2)
    t = a.shape[1]
    abar = torch.einsum("nti,ntj->ij", a, a) / (N * t)
    gbar = torch.einsum("nti,ntj->ij", g, g) / (N * t)
    assert f.positions == t == 36
    torch.testing.assert_close(f.kron_dense(), t * torch.kron(gbar, abar), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["conv1", "conv2", "fc"])
def test_trace_close_to_exact_fisher(model, name):
    n = 512
    x, y = torch.randn(n, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (n,))
    f = estimate(model, batches(x, y, 128), fisher="empirical")[name]
    exact = exact_weight_grads(model, name, x, y).pow(2).sum(1).mean()
    ratio = float(torch.diagonal(f.A).sum() * torch.diagonal(f.G).sum() / exact)
    assert 1 / 2 < ratio < 2, ratio
    if f.positions > 1:  # without T the trace would be off by the number of positions
        assert not 1 / 2 < ratio / f.positions < 2


# --- 4. inverse diagonals -------------------------------------------------------------------


def test_inverse_diagonal_identity(model, data):
    for f in estimate(model, batches(*data)).values():
        d = f.damped(1e-2)
        full_inv = torch.linalg.inv(d.kron_dense())
        torch.testing.assert_close(torch.diagonal(full_inv), torch.kron(d.g_inv_diag(), d.a_inv_diag()), rtol=1e-8, atol=0)
        torch.testing.assert_close(d.a_inv_diag(), torch.diagonal(torch.linalg.inv(d.A)), rtol=1e-10, atol=0)
        torch.testing.assert_close(d.g_inv_diag(), torch.diagonal(torch.linalg.inv(d.G)), rtol=1e-10, atol=0)
        torch.testing.assert_close(d.a_inverse() @ d.A, torch.eye(d.d_in_h, dtype=torch.float64), rtol=0, atol=1e-8)
        torch.testing.assert_close(d.g_inverse() @ d.G, torch.eye(d.d_out, dtype=torch.float64), rtol=0, atol=1e-8)


# --- 5. damping -------------------------------------------------------------------------------


@pytest.mark.parametrize("l", [0.0, 1e-3, 0.5])
def test_pi_damping_closed_form(model, data, l):
    for f in estimate(model, batches(*data)).values():
        d = f.damped(l)
        mean_a = torch.trace(f.A) / f.A.shape[0]
        mean_g = torch.trace(f.G) / f.G.shape[0]
        lam, pi = l * mean_a * mean_g, mean_a / mean_g
        eye_a, eye_g = torch.eye(f.A.shape[0], dtype=f.A.dtype), torch.eye(f.G.shape[0], dtype=f.G.dtype)
        torch.testing.assert_close(d.A, f.A + torch.sqrt(lam * pi) * eye_a)
        torch.testing.assert_close(d.G, f.G + torch.sqrt(lam / pi) * eye_g)
        torch.testing.assert_close(d.A, f.A + math.sqrt(l) * mean_a * eye_a)
        torch.testing.assert_close(d.G, f.G + math.sqrt(l) * mean_g * eye_g)


def test_damping_fixes_singular_last_layer_g(model, data):
    f = estimate(model, batches(*data))["fc"]
    ones = torch.ones(f.d_out, dtype=torch.float64)
    assert torch.allclose(f.G @ ones, torch.zeros_like(ones), atol=1e-12)  # rows sum to zero: singular
    assert torch.linalg.eigvalsh(f.G)[0] < 1e-12 * torch.linalg.eigvalsh(f.G)[-1]
    d = f.damped(1e-3)
    assert torch.linalg.cond(d.G) < 1e3
    inv = d.g_inv_diag()
    torch.testing.assert_close(inv, torch.diagonal(torch.linalg.inv(d.G)))
    assert torch.isfinite(inv).all() and (inv > 0).all()
    with pytest.raises(NapkitError, match="not positive definite"):
        KFACFactors(A=f.A, G=-f.G - torch.eye(3, dtype=f.G.dtype), num_samples=1, has_bias=True, positions=1).g_inv_diag()
    with pytest.raises(NapkitError, match="damping must be >= 0"):
        f.damped(-1.0)


# --- 6. chunking, truncation, determinism, block-diagonal A, storage ---------------------------


def _assert_same(a: dict[str, KFACFactors], b: dict[str, KFACFactors], **tol: float) -> None:
    assert list(a) == list(b)
    for fa, fb in zip(a.values(), b.values()):
        assert (fa.num_samples, fa.positions, fa.has_bias) == (fb.num_samples, fb.positions, fb.has_bias)
        for x, y in ((fa.A, fb.A), (fa.A_blocks, fb.A_blocks), (fa.A_bias, fb.A_bias), (fa.G, fb.G)):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, **tol)


def test_chunk_size_invariance(model, data):
    loader = batches(*data)
    _assert_same(estimate(model, loader, chunk_size=1), estimate(model, loader, chunk_size=64), rtol=1e-12, atol=1e-14)


def test_num_samples_truncates_last_batch(model, data):
    x, y = data
    got = estimate(model, batches(x, y), fisher="empirical", num_samples=13)
    assert all(f.num_samples == 13 for f in got.values())
    want = estimate(model, [(x[:13], y[:13])], fisher="empirical")
    _assert_same(got, want, rtol=1e-12, atol=1e-14)


def test_seed_determinism(model, data):
    loader = batches(*data)
    first, second = estimate(model, loader, seed=3), estimate(model, loader, seed=3)
    _assert_same(first, second, rtol=0, atol=0)
    assert not torch.equal(first["fc"].G, estimate(model, loader, seed=4)["fc"].G)


def test_model_state_restored(model, data):
    model.train()
    model.conv2.weight.requires_grad_(False)
    estimate(model, batches(*data))
    assert model.training and model.conv1.training
    assert not model.conv2.weight.requires_grad and model.conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_block_diagonal_a_matches_dense_blocks(model, data):
    loader = batches(*data)
    dense, block = estimate(model, loader), estimate(model, loader, max_dense_dim=10)
    for name, b in zip(["conv1", "conv2", "fc"], [9, 9, 4]):  # conv: kh*kw; fc: 16 inputs / 4 channels
        f, g = dense[name], block[name]
        assert g.is_block_diagonal and g.A is None and g.A_blocks.shape[1:] == (b, b)
        assert g.d_in_h == f.d_in_h
        for k, blk in enumerate(g.A_blocks):
            torch.testing.assert_close(blk, f.A[k * b : (k + 1) * b, k * b : (k + 1) * b], rtol=1e-12, atol=1e-14)
        if f.has_bias:
            assert float(g.A_bias) == 1.0 == float(f.A[-1, -1])
        torch.testing.assert_close(g.G, f.G, rtol=1e-12, atol=1e-14)


def test_block_diagonal_linear_algebra(model, data):
    for f in estimate(model, batches(*data), max_dense_dim=10).values():
        d = f.damped(1e-2)
        a = d.a_dense()
        assert a.shape == (d.d_in_h, d.d_in_h)
        x = torch.randn(5, d.d_in_h, dtype=torch.float64)
        torch.testing.assert_close(d.mul_a(x), x @ a)
        torch.testing.assert_close(d.mul_a_inverse(x), x @ torch.linalg.inv(a))
        torch.testing.assert_close(d.a_inv_diag(), torch.diagonal(torch.linalg.inv(a)))
        idx = torch.tensor([d.d_in_h - 1, 0, 5, 4])
        torch.testing.assert_close(d.a_block(idx), a[idx][:, idx])
        torch.testing.assert_close(d.a_block(slice(2, 7)), a[2:7, 2:7])
        torch.testing.assert_close(d.kron_dense(), torch.kron(d.G, a))


def test_dense_products_and_a_block(model, data):
    f = estimate(model, batches(*data))["conv1"].damped(1e-2)
    x = torch.randn(4, f.d_in_h, dtype=torch.float64)
    torch.testing.assert_close(f.mul_a(x), x @ f.A)
    torch.testing.assert_close(f.mul_a_inverse(x), x @ torch.linalg.inv(f.A))
    torch.testing.assert_close(f.a_block([9, 10, 18]), f.A[[9, 10, 18]][:, [9, 10, 18]])


def test_a_block_size_rules():
    assert a_block_size(nn.Linear(16, 3), 16, None) is None
    assert a_block_size(nn.Linear(16, 3), 10, 4) == 4
    assert a_block_size(nn.Linear(12, 3), 5, None) == 4  # largest divisor of 12 not above 5
    assert a_block_size(nn.Linear(12, 3), 5, 2) == 4  # 12 / 2 = 6 does not fit
    assert a_block_size(nn.Conv2d(8, 2, (3, 5)), 100, None) == 15


@pytest.mark.parametrize("max_dense_dim", [8192, 10])
def test_save_load_round_trip(tmp_path, model, data, max_dense_dim):
    factors = estimate(model, batches(*data), max_dense_dim=max_dense_dim)
    meta = {"model": "tiny", "num_samples": N, "fisher": "true"}
    path = tmp_path / "kfac.safetensors"
    save_factors(path, factors, meta)
    loaded, got_meta = load_factors(path, model)
    _assert_same(factors, loaded, rtol=0, atol=0)
    assert got_meta == meta | {"fingerprint": model_fingerprint(model)}


def test_load_refuses_other_model(tmp_path, model, data):
    path = tmp_path / "kfac.safetensors"
    save_factors(path, estimate(model, batches(*data)), {"model": "tiny"})
    with pytest.raises(NapkitError, match=r"layer 'fc'.*\(5, 17\).*\(3, 17\)"):
        load_factors(path, TinyNet(fc_out=5))
    with pytest.raises(NapkitError, match="has layer 'conv1', which the model lacks"):
        load_factors(path, OneByOneConv())
    with pytest.raises(NapkitError, match="not a napkit K-FAC factor file"):
        from napkit.io import save_tensors

        save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)})
        load_factors(tmp_path / "other.safetensors")


# --- 7. data-parallel reduction -------------------------------------------------------------


@pytest.mark.parametrize("max_dense_dim", [8192, 10])
def test_merge_shards_equals_union(model, data, max_dense_dim):
    x, y = data
    opts = {"fisher": "empirical", "max_dense_dim": max_dense_dim}
    shards = [estimate(model, batches(x[:12], y[:12]), **opts), estimate(model, batches(x[12:], y[12:]), **opts)]
    merged = merge_factors(shards)
    assert all(f.num_samples == N for f in merged.values())
    _assert_same(merged, estimate(model, batches(x, y), **opts), rtol=0, atol=1e-10)


def test_all_reduce_single_process(tmp_path, model, data):
    import torch.distributed as dist

    factors = estimate(model, batches(*data))
    assert all_reduce_factors(factors) is factors  # not initialised: no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        _assert_same(all_reduce_factors(factors), factors, rtol=1e-14, atol=1e-14)
    finally:
        dist.destroy_process_group()
