r"""The study's VGG16 run (the recipe: study.py).

  python -m affect_jax.main --config=configs/vgg16.py --workdir=runs/vgg16 \
      --config.data.dir=/data/AffectNet --config.model.weights=weights/vgg16
"""

import os
import runpy

study = runpy.run_path(os.path.join(os.path.dirname(__file__), "study.py"))


def get_config():
    return study["study_config"]("vgg16")
