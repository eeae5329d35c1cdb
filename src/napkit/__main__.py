"""``python -m napkit <stage|run> [overrides]``: the pipeline from an installed napkit, with its packaged conf/.

The same stages as ``pipelines/<stage>.py`` (which DVC runs in the repository), for a plain
``pip install napkit``: ``python -m napkit pretrain model=lenet5 data=mnist``; ``run`` runs the
whole chain with content-addressed caching, as ``pipelines/run.py`` does.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from napkit.entrypoint import run_stage
from napkit.errors import NapkitError
from napkit.stages import FLOWS

COMMANDS = ("run", *(s for flow in FLOWS.values() for s in flow))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m napkit {{{','.join(COMMANDS)}}} [overrides]", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)

    @hydra.main(config_path="conf", config_name="config", version_base="1.3")
    def entry(cfg: DictConfig) -> None:
        if command != "run":
            run_stage(command, cfg)
            return
        from napkit.sweep.chain import run_chain

        try:
            run_chain(cfg)
        except NapkitError as exc:
            print(f"napkit run: error: {exc}", file=sys.stderr)
            sys.exit(2)

    entry()


if __name__ == "__main__":
    main()
