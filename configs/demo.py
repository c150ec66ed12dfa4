r"""Demo: the real pipeline on drawn faces (`synthetic`), small images and model, random init.

About 3 minutes on a quiet 2-core CPU:

  python -m affect_jax.main --config=configs/demo.py --workdir=runs/demo
"""

import os
import runpy

import ml_collections

# Loaded by path so the config works from any working directory.
default = runpy.run_path(os.path.join(os.path.dirname(__file__), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    # An eighth of VGG16's channels: from scratch it learns the drawn faces several times
    # faster than a narrow ResNet50 (whose 7x7/2 stem and max-pool discard the small details).
    config.model.name = "vgg16"
    config.model.init = "random"
    config.model.width = 0.125
    config.model.hidden_sizes = (128,)
    config.model.dropout = 0.1
    config.data.source = "synthetic"
    config.data.synthetic_size = 4000
    config.data.image_size = 48
    config.learning_rate = 1e-3  # from scratch, a higher rate than fine-tuning's 1e-4
    config.num_epochs = 15
    config.log_every_steps = 25
    return config
