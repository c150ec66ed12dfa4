"""affect-jax: multi-task facial affect (expression, valence, arousal) in JAX/Flax."""

__version__ = "0.1.0"
