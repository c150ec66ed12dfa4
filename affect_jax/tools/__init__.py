"""Command-line tools on a finished run or a weight file, and every command's entry point.

One module per tool (``make_report``, ``compare_runs``, ``port_weights``), each installed as a
console script (``pyproject.toml`` ``[project.scripts]``) and runnable as
``python -m affect_jax.tools.NAME``. A command's flags are defined only when it runs
(``cli.console_script``): absl flags are process-wide, and the library modules a tool calls
(``report``, ``weights``) are imported by other commands with flags of the same names.
"""
