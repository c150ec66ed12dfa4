"""``python -m affect_jax.serve``: see ``affect_jax.serve.cli``."""

from absl import app

from affect_jax.serve import cli

if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main)
