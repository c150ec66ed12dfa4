"""Command-line tools on a finished run or a weight file, and every command's entry point.

One module per tool (``make_report``, ``compare_runs``, ``port_weights``), each installed as a
console script (``pyproject.toml`` ``[project.scripts]``) and runnable as
``python -m affect_jax.tools.NAME``. A command's flags are defined only when it runs
(``console_script``): absl flags are process-wide, and the library modules a tool calls
(``report``, ``weights``) are imported by other commands with flags of the same names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import app


def console_script(define_flags: Callable[[], None],
                   main: Callable[[Sequence[str]], int | None]) -> Callable[[], None]:
    """A command's entry point: defines its flags, then runs ``main`` under absl's app.run
    (which exits with ``main``'s return value)."""

    def run() -> None:
        define_flags()
        app.run(main)

    return run
