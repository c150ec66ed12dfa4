"""``python -m affect_jax.predict``: see ``affect_jax.predict.cli``."""

from absl import app

from affect_jax.predict import cli

cli.define_flags()
app.run(cli.main)
