"""napkit from Python: prune a trained classifier you already have, no pipeline needed.

    import napkit
    result = napkit.prune(model, train_set, val_set, method="nap", mode="structured", target=2.0)
    result.model            # the pruned model (physically smaller when structured)
    result.layer_density    # the per-layer ratios NAP chose
    result.history          # one row per iteration: val top-1, compression / FLOPs reduction, ...

The settings are the pipeline's own (``conf/``, composed with Hydra), so a call does what the prune
stage does with the same options; ``overrides`` takes any other key the same way the command line
does (e.g. ``["prune.finetune_epochs=0.5", "curvature.num_samples=512"]``). The one difference from
the stage: the K-FAC factors are estimated here, on ``train_data``, instead of read from the
curvature stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from napkit.curvature import KFACFactors
from napkit.curvature.sampling import estimate
from napkit.errors import NapkitError
from napkit.pruning.masks import MaskSet
from napkit.pruning.session import MODES, PruneData, run_pruning
from napkit.structured.attention import prunable_attention
from napkit.training.engine import resolve_device

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class PruneResult:
    """What :func:`prune` returns: the kept model and how the run got there."""

    model: nn.Module
    masks: MaskSet | None  # fine-grained keep-masks (None when structured: the model is physically smaller)
    stop_reason: str  # target | tolerance | max_iterations | cannot_prune_further
    kept_iteration: int
    history: list[dict[str, float]] = field(default_factory=list)
    layer_density: dict[str, float] = field(default_factory=dict)

    @property
    def measures(self) -> dict[str, float]:
        """Compression or FLOPs/params reduction, val top-1 and the rest, at the kept iteration."""
        return self.history[self.kept_iteration]


def config(*overrides: str) -> DictConfig:
    """napkit's composed configuration (``conf/config.yaml``) with command-line style overrides."""
    if not CONF_DIR.is_dir():
        raise NapkitError(f"napkit's configuration folder {CONF_DIR} is missing; reinstall napkit")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _settings(method: str, mode: str, target: float | None, tolerance: float, batch_size: int,
              seed: int, overrides: Sequence[str]) -> DictConfig:
    if mode not in MODES:
        raise NapkitError(f"mode={mode!r}: valid choices: {', '.join(MODES)}")
    option = {"nap": "nap_structured"}.get(method, method) if mode == "structured" else method
    keys = [f"prune={option}", f"prune.mode={mode}", f"prune.tolerance={tolerance}",
            f"prune.structured.tolerance={tolerance}", f"seed={seed}", f"data.batch_size={batch_size}",
            f"data.eval_batch_size={max(batch_size, 256)}"]
    if target is not None:
        keys.append(f"prune.structured.target_flops_reduction={target}" if mode == "structured"
                    else f"prune.target_compression={target}")
    elif mode == "structured":
        keys.append("prune.structured.target_flops_reduction=null")
    return config(*keys, *overrides)


def curvature_factors(model: nn.Module, train_data: Dataset, *, seed: int = 0, device: str = "auto",
                      overrides: Sequence[str] = ()) -> dict[str, KFACFactors]:
    """K-FAC factors (A, G) of every Conv2d/Linear of ``model`` on ``train_data`` (a grouped conv: one pair per
    conv group, keyed ``"<layer>#<group>"``; layers that never run as modules are left out, with a warning),
    with the ``curvature`` settings of ``conf/`` (e.g. ``overrides=["curvature.num_samples=2048"]``)."""
    cfg = config(f"seed={seed}", *overrides)
    return estimate(model, train_data, cfg, seed=seed, device=resolve_device(device), progress=False)


def prune(model: nn.Module, train_data: Dataset, val_data: Dataset, *, method: str = "nap",
          mode: str = "fine_grained", target: float | None = None, tolerance: float = 1.0,
          example_input: torch.Tensor | None = None, test_data: Dataset | None = None, batch_size: int = 64,
          seed: int = 0, device: str = "auto", overrides: Sequence[str] = (), progress: bool = False) -> PruneResult:
    """Prune ``model`` (trained, in place) with NAP or a baseline and return the kept state.

    ``method`` is a ``conf/prune`` option (``nap``, ``magnitude``, ``random``, ``l1``, ``l1_uniform``,
    ``slimming`` ...). ``target`` is a compression ratio (fine-grained: total / kept weights) or a
    FLOPs reduction (structured); without it the loop prunes until validation top-1 falls more than
    ``tolerance`` points below the dense model's and keeps the last iteration within it.
    ``train_data`` fine-tunes between steps and feeds the curvature; ``val_data`` takes every decision.
    ``example_input`` (one batch or one sample) fixes the input shape FLOPs are counted at (default: the
    first training sample). Every ``nn.MultiheadAttention`` of ``model`` is swapped for the equivalent
    :class:`~napkit.structured.attention.HeadAttention` (same state-dict keys), whose heads can be pruned.
    """
    cfg = _settings(method, mode, target, tolerance, batch_size, seed, overrides)
    prunable_attention(model)  # nn.MultiheadAttention -> HeadAttention: same function, prunable heads
    torch.manual_seed(seed)
    dev = resolve_device(device)
    sample = example_input if example_input is not None else train_data[0][0]
    shape = (1, *sample.shape[-3:]) if sample.dim() >= 3 else (1, *sample.shape)

    def factors(m: nn.Module, iteration: int) -> dict[str, KFACFactors]:
        return estimate(m, train_data, cfg, seed=seed + iteration, device=dev, progress=False)

    outcome = run_pruning(model, PruneData(train_data, train_data, val_data, test_data), cfg, factors=factors,
                          input_shape=shape, device=dev, progress=progress)
    result = outcome.result
    history = [{k: v for k, v in asdict(r).items() if k not in ("measures", "layer_density")} | r.measures
               for r in result.records]
    return PruneResult(model=outcome.model, masks=outcome.masks, stop_reason=result.stop_reason,
                       kept_iteration=result.best_iteration, history=history,
                       layer_density=dict(result.best.layer_density))
