"""Data sources (synthetic, AffectNet) and the tf.data input pipeline.

The names the config is checked against live here, apart from TensorFlow (``pipeline``), so
that checking a config (or preparing a photo for prediction) does not import it.
"""

# config.data.preprocessing: 'auto' resolves by config.model.init (``preprocessing_mode``).
PREPROCESSING_MODES = ("auto", "caffe", "unit")

# Keras "caffe" preprocessing for the ImageNet weights of VGG16/ResNet50: BGR means.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# Data sources by name: module path whose `load_source(config, workdir)` returns a Source.
SOURCES = {
    "synthetic": "affect_jax.data.synthetic",
    "affectnet": "affect_jax.data.affectnet",
}


def preprocessing_mode(config) -> str:
    """'caffe' or 'unit' (resolves 'auto' from the model's initialisation)."""
    mode = config.data.preprocessing
    if mode == "auto":
        return "caffe" if config.model.init == "imagenet" else "unit"
    return mode
