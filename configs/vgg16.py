r"""The study's VGG16 run: VGG16 from ImageNet, Adam 1e-4, batch 32, 20 epochs, 224 px, 80/20.

  python -m affect_jax.main --config=configs/vgg16.py --workdir=runs/vgg16 \
      --config.data.dir=/data/AffectNet --config.model.weights=weights/vgg16

The study's settings are spelled out, so the run stays the study's if a default changes
(configs/default.py documents every field).
"""

import os
import runpy

import ml_collections

# Loaded by path so the config works from any working directory.
default = runpy.run_path(os.path.join(os.path.dirname(__file__), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    config.model.name = "vgg16"
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
