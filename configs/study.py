r"""The study's recipe, shared by ``resnet50.py`` and ``vgg16.py``: ImageNet init, Adam 1e-4,
batch 32, 20 epochs, 224 px, 80/20 split, 8 classes, no augmentation, best checkpoint by mean CCC.

The settings are spelled out, so the runs stay the study's if a default changes
(``default.py`` documents every field; ``docs/study.md`` describes the study).
"""

import os
import runpy

import ml_collections

# Loaded by path so the config works from any working directory.
default = runpy.run_path(os.path.join(os.path.dirname(__file__), "default.py"))


def study_config(backbone: str) -> ml_collections.ConfigDict:
    """The study's run with ``backbone`` ('resnet50' or 'vgg16')."""
    config = default["get_config"]()
    config.model.name = backbone
    config.model.init = "imagenet"  # Keras's ImageNet weights, ported by affect-jax-port-weights
    config.model.pooling = "avg"
    config.model.hidden_sizes = (256,)
    config.model.dropout = 0.5
    config.data.source = "affectnet"
    config.data.num_classes = 8
    config.data.image_size = 224
    config.data.val_fraction = 0.2
    config.augment.enabled = False
    config.batch_size = 32
    config.num_epochs = 20
    config.learning_rate = 1e-4
    config.best_metric = "mean_ccc"
    return config
