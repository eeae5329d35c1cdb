"""Do the criteria predict the loss increase of removing one weight? And what does the curvature cost?

LeNet-5 trained on MNIST (cached dense model of ``common.dense_model``). K-FAC (true Fisher) on
``--kfac-samples`` training images; a disjoint set of ``--heldout`` training images measures the real
loss increase of removing each of ``--per-layer`` sampled weights per layer, (1) zeroed alone and
(2) removed with the OBS update of that one weight (``napkit.pruning.compensation.obs_compensate_``),
in float64. Predictions: the library's criteria ``nap`` (OBS-KFAC ``w^2 / (2 [G^-1]_ii [A^-1]_jj)``),
``nap_obd`` (``0.5 w^2 G_ii A_jj``) and ``magnitude`` (|w|, rank-equivalent to w^2). Prints the Spearman
rank correlation per layer and pooled over all layers (what a GLOBAL ranking needs) for each damping.

Then the curvature cost ratio on ``vgg16_small`` (CIFAR-10 32x32, width 0.25): wall time of
``estimate_kfac`` over N=1024 images over one forward+backward pass of the same images, batch 128,
with the exact conv A and with the stage's default lattice cap (``--a-max-positions``).

    python benchmarks/saliency.py [--dampings 1e-3 1e-2 0.1 1] [--per-layer 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.nn import functional as F
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_model, load_splits, log, print_table, pyplot, save_figure  # noqa: E402

from napkit.curvature import estimate_kfac  # noqa: E402
from napkit.data import make_loader  # noqa: E402
from napkit.layers import prunable_layers  # noqa: E402
from napkit.pruning.compensation import obs_compensate_  # noqa: E402
from napkit.pruning.importance import create_importance  # noqa: E402


@torch.no_grad()
def mean_loss(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return F.cross_entropy(model(x), y).item()


def stages(model) -> list:
    """LeNet-5 as one flat sequence of modules (its forward is classifier(features(x).flatten(1)))."""
    return list(model.features) + [torch.nn.Flatten()] + list(model.classifier)


@torch.no_grad()
def layer_inputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Input of every stage on the held-out batch, so a change in stage k only reruns stages k..end."""
    out, h = [], x
    for s in stages(model):
        out.append(h)
        h = s(h.clone())  # the ReLUs are in-place
    return out


def measure(model, layers, samples, x, y, base: float, factors=None, damping: float = 0.0,
            symmetric: bool = False) -> dict:
    """Measured loss increase per sampled weight: zeroed alone, or with its OBS update if factors given.

    ``symmetric``: the second-order part alone, ``(L(w_i = 0) + L(w_i = 2 w_i)) / 2 - L(w)``, which
    cancels the first-order term ``-g_i w_i`` that no saliency criterion models (the held-out
    gradient is not zero).
    """
    out = {}
    seq = stages(model)
    inputs = layer_inputs(model, x)
    for name, idx in samples.items():
        layer = layers[name]
        k = next(i for i, s in enumerate(seq) if s is layer)

        @torch.no_grad()
        def loss_from_layer(k: int = k) -> float:
            h = inputs[k]
            for s in seq[k:]:
                h = s(h)
            return F.cross_entropy(h, y).item()

        w0 = layer.weight.detach().clone()
        b0 = None if layer.bias is None else layer.bias.detach().clone()
        vals = []
        for i in idx.tolist():
            with torch.no_grad():
                if factors is not None:
                    one = torch.zeros_like(w0, dtype=torch.bool)
                    one.view(-1)[i] = True
                    obs_compensate_(layer, factors[name].to(torch.float64).damped(damping), one)
                w_i = float(layer.weight.view(-1)[i])
                layer.weight.view(-1)[i] = 0.0
            value = loss_from_layer() - base
            if symmetric:
                with torch.no_grad():
                    layer.weight.view(-1)[i] = 2 * w_i
                value = 0.5 * (value + loss_from_layer() - base)
            vals.append(value)
            with torch.no_grad():
                layer.weight.copy_(w0)
                if b0 is not None:
                    layer.bias.copy_(b0)
        out[name] = np.array(vals)
    return out


def rho(a, b) -> float:
    return float(spearmanr(a, b).statistic)


def curvature_cost(repeats: int, a_max_positions: int | None, n: int = 1024,
                   batch: int = 128) -> tuple[float, float, float]:
    """(kfac seconds, forward+backward seconds, ratio) on vgg16_small for CIFAR-10 shapes."""
    torch.manual_seed(0)
    model = build_model_vgg()
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 3, 32, 32, generator=gen)
    ys = torch.randint(0, 10, (n,), generator=gen)
    batches = [(xs[i:i + batch], ys[i:i + batch]) for i in range(0, n, batch)]
    model.eval()
    kfac_t, fb_t = [], []
    for _ in range(repeats):  # alternate so load changes on the shared machine hit both alike
        t0 = time.perf_counter()
        estimate_kfac(model, batches, num_samples=n, a_max_positions=a_max_positions, progress=False)
        kfac_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for xb, yb in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb, reduction="sum").backward()
        fb_t.append(time.perf_counter() - t0)
    k, f = statistics.median(kfac_t), statistics.median(fb_t)
    return k, f, k / f


def build_model_vgg():
    from napkit.models import create_model

    return create_model("vgg16_small", num_classes=10, in_channels=3, input_size=32, width=0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dampings", nargs="+", type=float, default=[1e-3, 1e-2, 0.1, 1.0])
    ap.add_argument("--per-layer", type=int, default=64)
    ap.add_argument("--kfac-samples", type=int, default=1024)
    ap.add_argument("--heldout", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4, help="dense LeNet-5 training epochs")
    ap.add_argument("--cost-repeats", type=int, default=3)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--a-max-positions", type=int, default=64,
                    help="conv A lattice cap (the curvature stage's default); the exact A is reported beside it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on the shared 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    splits = load_splits("mnist")
    dense = dense_model("lenet5", "mnist", splits, epochs=args.epochs, lr=0.05, subset_train=None)
    # curvature on the first kfac_samples of a seeded permutation of train, held-out on the next ones
    perm = torch.randperm(len(splits.train_plain), generator=torch.Generator().manual_seed(123))
    curv_idx = perm[: args.kfac_samples].tolist()
    held_idx = perm[args.kfac_samples: args.kfac_samples + args.heldout].tolist()
    curv_loader = make_loader(Subset(splits.train_plain, curv_idx), batch_size=128, shuffle=False, seed=0)
    held = [b for b in make_loader(Subset(splits.train_plain, held_idx), batch_size=len(held_idx), shuffle=False,
                                   seed=0)][0]
    model = copy.deepcopy(dense).double().eval()
    x, y = held[0].double(), held[1]
    factors = estimate_kfac(dense.eval(), curv_loader, num_samples=args.kfac_samples, fisher="true",
                            a_max_positions=args.a_max_positions, progress=False)
    exact = estimate_kfac(dense.eval(), curv_loader, num_samples=args.kfac_samples, fisher="true", progress=False)
    log("A with the lattice cap vs exact, relative Frobenius error per layer: " + ", ".join(
        f"{n}={float((factors[n].A - exact[n].A).norm() / exact[n].A.norm()):.3f}" for n in factors))
    layers = prunable_layers(model)
    base = mean_loss(model, x, y)
    log(f"held-out loss {base:.5f} on {len(y)} training images; K-FAC on {args.kfac_samples} others")

    g = torch.Generator().manual_seed(0)
    samples = {n: torch.randperm(l.weight.numel(), generator=g)[: args.per_layer] for n, l in layers.items()}
    names = list(layers)
    zeroed = measure(model, layers, samples, x, y, base)
    second = measure(model, layers, samples, x, y, base, symmetric=True)
    mag = {n: create_importance("magnitude")(n, layers[n], None).flatten()[samples[n]].numpy() for n in names}

    def pooled(pred: dict, meas: dict) -> float:
        return rho(np.concatenate([pred[n] for n in names]), np.concatenate([meas[n] for n in names]))

    headers = ["criterion", "vs measured", "damping"] + names + ["POOLED"]
    rows = [["magnitude |w|", "zeroed", "-"] + [f"{rho(mag[n], zeroed[n]):.3f}" for n in names]
            + [f"{pooled(mag, zeroed):.3f}"]]
    rows.append(["magnitude |w|", "2nd-order part", "-"] + [f"{rho(mag[n], second[n]):.3f}" for n in names]
                + [f"{pooled(mag, second):.3f}"])
    plot_data = {"magnitude": (mag, zeroed)}
    for d in args.dampings:
        obs = {n: create_importance("nap", damping=d)(n, layers[n], factors[n]).flatten()[samples[n]].numpy()
               for n in names}
        obd = {n: create_importance("nap_obd", damping=d)(n, layers[n], factors[n]).flatten()[samples[n]].numpy()
               for n in names}
        comp = measure(model, layers, samples, x, y, base, factors=factors, damping=d)
        obs_exact = {n: create_importance("nap", damping=d)(n, layers[n], exact[n]).flatten()[samples[n]].numpy()
                     for n in names}
        rows.append(["OBS-KFAC (nap)", "2nd-order part", f"{d:g}"] + [f"{rho(obs[n], second[n]):.3f}" for n in names]
                    + [f"{pooled(obs, second):.3f}"])
        rows.append(["OBS-KFAC, exact A", "zeroed", f"{d:g}"] + [f"{rho(obs_exact[n], zeroed[n]):.3f}" for n in names]
                    + [f"{pooled(obs_exact, zeroed):.3f}"])
        rows.append(["OBD-KFAC (nap_obd)", "2nd-order part", f"{d:g}"]
                    + [f"{rho(obd[n], second[n]):.3f}" for n in names] + [f"{pooled(obd, second):.3f}"])
        rows.append(["OBS-KFAC (nap)", "zeroed", f"{d:g}"] + [f"{rho(obs[n], zeroed[n]):.3f}" for n in names]
                    + [f"{pooled(obs, zeroed):.3f}"])
        rows.append(["OBS-KFAC (nap)", "OBS-updated", f"{d:g}"] + [f"{rho(obs[n], comp[n]):.3f}" for n in names]
                    + [f"{pooled(obs, comp):.3f}"])
        rows.append(["OBD-KFAC (nap_obd)", "zeroed", f"{d:g}"] + [f"{rho(obd[n], zeroed[n]):.3f}" for n in names]
                    + [f"{pooled(obd, zeroed):.3f}"])
        gain = {n: zeroed[n] - comp[n] for n in names}
        allz, allc = np.concatenate(list(zeroed.values())), np.concatenate(list(comp.values()))
        log(f"damping {d:g}: OBS update lowers the measured increase for {np.mean(allc < allz) * 100:.0f}% of "
            f"weights; mean increase zeroed {allz.mean():.2e}, OBS-updated {allc.mean():.2e}; "
            f"median gain {np.median(np.concatenate(list(gain.values()))):.2e}")
        if d == 0.1 or d == args.dampings[-1] and "OBS-KFAC" not in plot_data:
            plot_data["OBS-KFAC"] = (obs, comp)
            plot_data["OBD-KFAC"] = (obd, zeroed)
    print()
    print_table(headers, rows, title=f"Spearman rank correlation, predicted vs measured loss increase "
                                     f"(LeNet-5/MNIST, {args.per_layer} weights per layer, true Fisher, "
                                     f"N={args.kfac_samples}, {args.heldout} held-out train images)")
    sizes = {n: layers[n].weight.numel() for n in names}
    print("layer sizes: " + ", ".join(f"{n}={s}" for n, s in sizes.items()))

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, (pred, meas)) in zip(axes, plot_data.items()):
        for n in names:
            p = np.asarray(pred[n], dtype=float) ** (2 if title == "magnitude" else 1)
            m = np.asarray(meas[n])
            ax.scatter(np.clip(p, 1e-12, None), np.clip(m, 1e-9, None), s=8, label=n)
        ax.set_xscale("log")
        ax.set_yscale("log")
        kind = "OBS-updated" if title == "OBS-KFAC" else "zeroed"
        ax.set_title(f"{title} (rho pooled {pooled(pred, meas):.2f})")
        ax.set_xlabel("predicted" + (" (w^2)" if title == "magnitude" else " dL (damping 0.1)"))
        ax.set_ylabel(f"measured dL, {kind} (clipped at 1e-9)")
        ax.legend(fontsize=7)
    print(f"scatter plot: {save_figure(fig, 'saliency_scatter.png')}")
    log(f"saliency part: {time.perf_counter() - t_start:.0f}s")

    if not args.skip_cost:
        ratio = 0.0
        for cap in (None, args.a_max_positions):
            k, f, ratio = curvature_cost(args.cost_repeats, cap)
            print(f"curvature cost (vgg16_small width 0.25, CIFAR-10 32x32, N=1024, batch 128, median of "
                  f"{args.cost_repeats}, a_max_positions={cap}): estimate_kfac {k:.2f}s, forward+backward {f:.2f}s, "
                  f"ratio {ratio:.2f}x")
        print(f"curvature_cost_ratio={ratio:.2f}")
    log(f"total: {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
