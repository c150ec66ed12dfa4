"""Data sources (synthetic, AffectNet) and the tf.data input pipeline.

The names the config is checked against and the batches' shapes live here, apart from
TensorFlow (``pipeline``), so that checking a config, compiling a train call
(``train_call``) or preparing a photo for prediction does not import it.
"""

import numpy as np

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


def example_shapes(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each field of one example as the batches hold it: what a step can be
    compiled for before any example is read."""
    size = config.data.image_size
    return {
        "image": ((size, size, 3), np.dtype(np.float32)),
        "expression": ((), np.dtype(np.int32)),
        "valence_arousal": ((2,), np.dtype(np.float32)),
        "has_va": ((), np.dtype(np.float32)),
        "mask": ((), np.dtype(np.float32)),
    }
