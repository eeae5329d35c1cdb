"""The whole chain pretrain -> curvature -> prune -> finetune -> evaluate for one configuration.

    python pipelines/run.py model=alexnet_small prune=magnitude
    python pipelines/run.py -m model=alexnet_small,vgg16_small,resnet50_small prune=nap,magnitude
    python pipelines/run.py -m hydra/launcher=napkit_joblib ...          # jobs in parallel
    python pipelines/run.py -m hydra/launcher=napkit_slurm hydra.launcher.partition=gpu ...

Outputs are content addressed (``paths.content_addressed=true`` is forced): a stage whose folder
already holds its metrics is a cache hit, so a sweep over methods pretrains each model once. In a
multirun, the ``napkit_sweep`` callback (conf/config.yaml) checks every job and opens the MLflow
parent run; each job here is a child run, and a failing job is marked FAILED without stopping the
sweep. Logic: ``napkit.sweep.chain``.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from napkit.errors import NapkitError
from napkit.sweep.chain import method_name, read_sweep_info, run_chain, run_name

log = logging.getLogger("napkit")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    info = read_sweep_info(hc.sweep.dir) if multirun else {}
    choices = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    if cfg.get("pipeline", "nap") == "chex":  # compared as its own method, not as the unused prune default
        choices["prune"] = method_name(cfg)
    name = run_name(choices, list(hc.overrides.task), info.get("jobs") or [])
    tags = {"napkit.overrides": " ".join(hc.overrides.task)[:5000],
            **{f"napkit.choice.{k.split('@', 1)[0]}": v for k, v in choices.items()}}
    if multirun:
        tags["napkit.sweep.job"] = str(hc.job.num)
    try:
        result = run_chain(cfg, parent_run_id=info.get("parent_run_id"), run_name=name, tags=tags, catch=multirun)
    except NapkitError as exc:
        print(f"napkit run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if result.status != "FINISHED":
        return None
    ev = result.metrics.get("evaluate", {})
    log.info("done (cache hits: %s): %s", ", ".join(result.cached) or "none",
             ", ".join(f"{k}={ev[k]:.4g}" for k in ("top1", "top1_dense", "compression_params", "flops_reduction")
                       if k in ev))
    return ev


if __name__ == "__main__":
    main()
