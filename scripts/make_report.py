r"""Regenerates a run's reports from its workdir, without retraining.

    python scripts/make_report.py --workdir=/tmp/run

Writes training_curves.png, confusion_matrix.png and report.md into the workdir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from affect_jax import report, run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help=f"Run directory (with its {run_dir.FINAL_METRICS}).")
    args = parser.parse_args(argv)
    try:
        written = report.write_reports(args.workdir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
