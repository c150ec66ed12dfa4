r"""Prints the study's comparison table for several runs as Markdown.

    python scripts/compare_runs.py /tmp/run_vgg16 /tmp/run_resnet50 [--no-reference]

One row per run (named by its directory) plus the Keras study's reference rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from affect_jax import report, run_dir


def run_names(workdirs: list[Path]) -> list[str]:
    """Directory names, or the paths as given when two runs share a name."""
    names = [d.resolve().name or str(d) for d in workdirs]
    return names if len(set(names)) == len(names) else [str(d) for d in workdirs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path, help="Run directories.")
    parser.add_argument("--no-reference", action="store_true",
                        help="Omit the Keras study's reference rows.")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.workdirs if not (d / run_dir.FINAL_METRICS).is_file()]
    if missing:
        print(f"error: no {run_dir.FINAL_METRICS} in: {', '.join(missing)}", file=sys.stderr)
        return 1
    finals = [run_dir.load_final_metrics(d) for d in args.workdirs]
    print(report.comparison_table(finals, run_names(args.workdirs),
                                  reference=not args.no_reference), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
