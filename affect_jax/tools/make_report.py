"""``affect-jax-report``: regenerates a run's reports from its workdir, without retraining.

    affect-jax-report --workdir=runs/demo

Writes training_curves.png, confusion_matrix.png and report.md into the workdir and prints
their paths.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging

from affect_jax import cli, report, run_dir

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, f"Run directory (with its {run_dir.FINAL_METRICS}).")
    flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    try:
        written = report.write_reports(FLAGS.workdir)
    except (FileNotFoundError, ValueError) as e:
        logging.error("%s", e)
        return 1
    for path in written.values():
        print(path)
    return 0


run = cli.console_script(define_flags, main)


if __name__ == "__main__":
    run()
