r"""The study's ResNet50 run (the recipe: study.py).

  python -m affect_jax.main --config=configs/resnet50.py --workdir=runs/resnet50 \
      --config.data.dir=/data/AffectNet --config.model.weights=weights/resnet50
"""

import os
import runpy

study = runpy.run_path(os.path.join(os.path.dirname(__file__), "study.py"))


def get_config():
    return study["study_config"]("resnet50")
