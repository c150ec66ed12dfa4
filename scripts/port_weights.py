r"""Ports a Keras ImageNet weight file to an affect_jax backbone checkpoint.

    python scripts/port_weights.py --arch=resnet50 \
      --keras_h5=resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 --output=/tmp/resnet50_in

The output directory (Orbax checkpoint + ported.json) is what `config.model.weights` expects.
Files with the classifier top are accepted: the top is dropped unless --include_top.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import app, flags, logging

from affect_jax import weights

_ARCH = flags.DEFINE_enum('arch', None, ['resnet50', 'vgg16'], 'Backbone architecture.')
_KERAS_H5 = flags.DEFINE_string('keras_h5', None, 'Keras weight file (.h5 or .weights.h5).')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write.')
_INCLUDE_TOP = flags.DEFINE_bool('include_top', False, 'Keep the 1000-way ImageNet classifier.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')
flags.mark_flags_as_required(['arch', 'keras_h5', 'output'])


def main(argv: list[str]) -> None:
    del argv
    try:
        out = weights.port_keras_h5(
            _ARCH.value, _KERAS_H5.value, _OUTPUT.value,
            include_top=_INCLUDE_TOP.value, overwrite=_OVERWRITE.value,
        )
    except (weights.WeightFileError, FileExistsError) as e:
        logging.error('%s', e)
        sys.exit(1)
    logging.info('Wrote %s', out)
    print(out)


if __name__ == '__main__':
    app.run(main)
