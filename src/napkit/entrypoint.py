"""Shared body of the ``pipelines/<stage>.py`` Hydra entrypoints: run a stage, report bad input in one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig

from napkit.distributed import init_from_env, shutdown
from napkit.errors import Interrupted, NapkitError
from napkit.guard import output_dir, probe, signals_raise, stage_lock
from napkit.io import clean_stale_temps
from napkit.schema import unknown_override, validate_config
from napkit.stages import stage_runner

log = logging.getLogger("napkit")

_FLAGS_WITH_VALUE = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def bad_group_override(argv: Sequence[str], conf_dirs: Sequence[Path]) -> str | None:
    """One line for the first ``group=option`` override whose option is in none of ``conf_dirs/<group>/``.

    Hydra would report it over many lines; plain values, sweeps (``a,b``), Hydra's own groups and
    keys that are not config groups are left to Hydra.
    """
    args = list(argv)
    for i, arg in enumerate(args):
        if arg.startswith("-") or "=" not in arg or (i and args[i - 1] in _FLAGS_WITH_VALUE):
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~").split("@", 1)[0]
        folders = [d / group for d in conf_dirs if (d / group).is_dir()]
        if not folders or group.startswith("hydra") or not value or any(c in value for c in ",()[]{}$*"):
            continue
        options = sorted({p.stem for f in folders for p in f.glob("*.yaml")})
        if value != "null" and value not in options:
            return (f"invalid override '{arg}': no option '{value}' in config group '{group}'; "
                    f"valid choices: {', '.join(options)}")
    return None


def check_command_line(stage: str, script: str, argv: Sequence[str] | None = None) -> None:
    """Before Hydra composes: a config group option that does not exist exits with status 2 and one line.

    ``script`` is the entrypoint's ``__file__`` (its ``../conf`` is searched, and ``--config-dir``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    dirs = [Path(script).resolve().parents[1] / "conf"]
    dirs += [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a in ("--config-dir", "-cd")]
    message = bad_group_override(args, dirs) or unknown_override(args)
    if message:
        print(f"napkit {stage}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _report(line: str) -> None:
    """The stage's one-line ending on stderr, on a line of its own. Where progress bars ran, a bar the error cut
    short is cleared first, and the line starts with a carriage return: a bar drawn below another one clears
    itself by moving the cursor back up, mid-line, and the message would otherwise follow on that line (a CI run
    caught it)."""
    progress = sys.modules.get("tqdm")  # no tqdm imported: no bar ran
    if progress is not None:
        for bar in list(getattr(progress.tqdm, "_instances", ())):
            bar.close()
        line = "\r" + line
    print(line, file=sys.stderr)


def run_stage(stage: str, cfg: DictConfig,
              runner: Callable[[DictConfig], dict[str, float]] | None = None) -> dict[str, float]:
    """Run ``runner(cfg)`` (default ``napkit.stages.<stage>.run``) under torchrun's process group if any.

    First, before any work: the config is validated against the schema, and what the stage needs is
    probed (device, writable output, data, MLflow store); then rank 0 locks the stage's output and
    removes temporary files that killed runs left there. A NapkitError exits with status 2 and one
    line; SIGTERM / SIGINT end the MLflow run as KILLED, keep the checkpoints and exit 143 / 130.
    """
    if runner is None:
        runner = stage_runner(stage)
    try:
        with signals_raise():
            validate_config(cfg)
            main_rank = init_from_env(str(cfg.get("distributed", {}).get("backend", "auto"))).is_main
            probe(cfg, stage)
            if not main_rank:
                metrics = runner(cfg)
            else:
                with stage_lock(cfg, stage):
                    clean_stale_temps(output_dir(cfg, stage), Path(cfg.paths.artifacts) / "checkpoints",
                                      Path(cfg.paths.get("cache", ".cache/napkit")))
                    metrics = runner(cfg)
    except NapkitError as exc:
        _report(f"napkit {stage}: error: {exc}")
        sys.exit(2)
    except Interrupted as exc:
        _report(f"napkit {stage}: {exc}; the last checkpoint is kept: rerun the same command to resume")
        sys.exit(128 + exc.signum)
    finally:
        shutdown()
    if not metrics or not main_rank:  # one report per job, from rank 0
        return metrics
    from napkit.stages.common import clean_checkpoints  # lazy: a bad command line fails before heavy imports

    clean_checkpoints(cfg, stage)  # completed: its resume state is dead weight (kept on failure)
    log.info("%s done: %s", stage, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics
