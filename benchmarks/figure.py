"""Reproduce a published figure: run its experiment preset through the pipeline, then the report.

A thin wrapper over the two commands a user runs by hand (nothing here prunes or trains):

    python pipelines/run.py -m +experiment=<preset> [overrides]
    python -m napkit.report --latest --out reports/<preset>.html

The report's last line is the figure (``nap_vs_magnitude=...``, ``one_shot_nap_vs_magnitude=...``,
``nap_minus_l1_uniform=...``, ``chex_minus_nap=...``); this script prints it last too.

    python benchmarks/figure.py fine_grained_mnist
    python benchmarks/figure.py fine_grained_cifar10 data.format=imagefolder data.root=/data/cifar10 data.download=false
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    presets = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=presets)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to the preset's sweep")
    args = parser.parse_args(argv)
    sweep = subprocess.run([sys.executable, "pipelines/run.py", "-m", f"+experiment={args.preset}", *args.overrides],
                           cwd=ROOT)
    if sweep.returncode:
        return sweep.returncode
    report = subprocess.run([sys.executable, "-m", "napkit.report", "--latest", "--out",
                             f"reports/{args.preset}.html"], cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(report.stderr)
    print(report.stdout, end="")
    return report.returncode


if __name__ == "__main__":
    sys.exit(main())
