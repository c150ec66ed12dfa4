r"""The study's ResNet50 run: ImageNet init, Adam 1e-4, batch 32, 20 epochs, 224 px, 80/20.

  python -m affect_jax.main --config=configs/resnet50.py --workdir=runs/resnet50 \
      --config.data.dir=/data/AffectNet --config.model.weights=weights/resnet50
"""

import os
import runpy

import ml_collections

# Loaded by path so the config works from any working directory.
default = runpy.run_path(os.path.join(os.path.dirname(__file__), 'default.py'))


def get_config() -> ml_collections.ConfigDict:
    config = default['get_config']()
    config.model.name = 'resnet50'
    return config
