"""``affect-jax-compare``: the study's comparison table for several runs, as Markdown.

    affect-jax-compare runs/vgg16 runs/resnet50 [--no-reference]

One row per run (named by its directory) plus the Keras study's reference rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags, logging

from affect_jax import cli, report, run_dir

FLAGS = flags.FLAGS


def run_names(workdirs: Sequence[Path]) -> list[str]:
    """Directory names, or the paths as given when two runs share a name."""
    names = [d.resolve().name or str(d) for d in workdirs]
    return names if len(set(names)) == len(names) else [str(d) for d in workdirs]


def comparison(workdirs: Sequence[str | os.PathLike], reference: bool = True) -> str:
    """The Markdown table of the runs in ``workdirs``, with the study's rows if ``reference``.

    Raises FileNotFoundError naming every workdir without its final metrics.
    """
    workdirs = [Path(d) for d in workdirs]
    missing = [str(d) for d in workdirs if not (d / run_dir.FINAL_METRICS).is_file()]
    if missing:
        raise FileNotFoundError(f"no {run_dir.FINAL_METRICS} in: {', '.join(missing)}")
    finals = [run_dir.load_final_metrics(d) for d in workdirs]
    return report.comparison_table(finals, run_names(workdirs), reference=reference)


def define_flags() -> None:
    flags.DEFINE_bool("no-reference", False, "Omit the Keras study's reference rows.")


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise app.UsageError("give the run directories to compare")
    try:
        table = comparison(argv[1:], reference=not FLAGS["no-reference"].value)
    except FileNotFoundError as e:
        logging.error("%s", e)
        return 1
    print(table, end="")
    return 0


run = cli.console_script(define_flags, main)


if __name__ == "__main__":
    run()
