"""Stage 5, evaluate: test accuracy, size, FLOPs and latency of the final model against the dense one.

Writes ``metrics.json`` for ``dvc metrics show`` and CSV tables for ``dvc plots show``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from napkit.artifacts import load_model
from napkit.data import make_loader
from napkit.distributed import world
from napkit.evaluation.cost import compare_to_dense, input_shape, layer_flops
from napkit.evaluation.plots import plot_layer_ratios
from napkit.layers import prunable_layers
from napkit.pruning.masks import MaskSet
from napkit.stages.common import load_splits, seed_everything, stage_dir, write_csv, write_metrics
from napkit.tracking import stage_run
from napkit.training.engine import evaluate, resolve_device


def run(cfg: DictConfig) -> dict[str, float]:
    """Measure the fine-tuned pruned model and the dense pretrained one on the test split (rank 0 only)."""
    if not world().is_main:
        return {}
    seed_everything(int(cfg.seed))
    e = cfg.evaluate
    dense, spec, _ = load_model(stage_dir(cfg, "pretrain"))
    model, _, masks = load_model(stage_dir(cfg, "finetune"))
    masks = masks or MaskSet.dense(model)
    splits = load_splits(cfg)
    device = resolve_device(cfg.device)
    loader = make_loader(splits.test, batch_size=int(cfg.data.eval_batch_size), shuffle=False, seed=0)
    shape = input_shape(spec.in_channels, spec.input_size)
    out = stage_dir(cfg, "evaluate")
    with stage_run(cfg, "evaluate") as tracker:
        test = evaluate(model.to(device), loader, device=device, desc="test")
        test_dense = evaluate(dense.to(device), loader, device=device, desc="test dense")
        metrics = {
            "top1": test["top1"], "top5": test["top5"], "loss": test["loss"],
            "top1_dense": test_dense["top1"], "top5_dense": test_dense["top5"], "sparsity": masks.sparsity(),
            **compare_to_dense(model.cpu(), dense.cpu(), shape, masks,
                               int(e.latency_repeats) if e.latency else None),
        }
        _, flops = layer_flops(model, shape)
        layers = prunable_layers(model)
        density = masks.layer_density()
        rows = [{"layer": n, "type": type(m).__name__, "weights": m.weight.numel(),
                 "density": density.get(n, 1.0), "sparsity": 1.0 - density.get(n, 1.0),
                 "flops": flops.get(n, 0), "flops_effective": flops.get(n, 0) * density.get(n, 1.0)}
                for n, m in layers.items()]
        write_csv(out / "layers.csv", rows)
        plot_layer_ratios(density, out / "layer_ratios.png", title=f"{spec.name}: kept weights per layer")
        write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out)
    return metrics
