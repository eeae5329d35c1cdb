"""``params.yaml`` is ``conf/`` composed exactly as DVC's Hydra integration composes it.

``python -m napkit.config`` rewrites it after editing ``conf/`` (``dvc exp run -S ...`` does the
same on its own); a test checks the two never drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dvc.utils.hydra import compose_and_dump


def write_params(root: Path, output: Path | None = None, overrides: list[str] | None = None) -> Path:
    """Compose ``root/conf/config.yaml`` with ``overrides`` and dump it (resolved) to ``output``."""
    output = output or root / "params.yaml"
    compose_and_dump(output, str((root / "conf").resolve()), None, "config", str(root / ".dvc" / "plugins"),
                     overrides or [])
    return output


if __name__ == "__main__":
    print(write_params(Path.cwd(), overrides=sys.argv[1:]))
