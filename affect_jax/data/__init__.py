"""Data sources (synthetic, AffectNet) and the tf.data input pipeline.

The names the config is checked against live here, apart from TensorFlow (``pipeline``), so
that checking a config does not import it.
"""

# config.data.preprocessing: 'auto' resolves by config.model.init (``pipeline.preprocessing_mode``).
PREPROCESSING_MODES = ("auto", "caffe", "unit")

# Data sources by name: module path whose `load_source(config, workdir)` returns a Source.
SOURCES = {
    "synthetic": "affect_jax.data.synthetic",
    "affectnet": "affect_jax.data.affectnet",
}
