"""``python -m affect_jax.serve``: see ``affect_jax.serve.cli``."""

from affect_jax.serve import cli

cli.run()
