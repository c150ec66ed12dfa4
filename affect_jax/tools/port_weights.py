r"""``affect-jax-port-weights``: a Keras ImageNet weight file as an affect_jax backbone directory.

    affect-jax-port-weights --arch=resnet50 \
      --keras_h5=resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 --output=weights/resnet50

The output directory (Orbax checkpoint + ported.json) is what ``config.model.weights`` expects.
Files with the classifier top are accepted: the top is dropped unless --include_top.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging

from affect_jax import cli, weights

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("arch", None, ["resnet50", "vgg16"], "Backbone architecture.")
    flags.DEFINE_string("keras_h5", None, "Keras weight file (.h5 or .weights.h5).")
    flags.DEFINE_string("output", None, "Directory to write.")
    flags.DEFINE_bool("include_top", False, "Keep the 1000-way ImageNet classifier.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
    flags.mark_flags_as_required(["arch", "keras_h5", "output"])


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    try:
        out = weights.port_keras_h5(
            FLAGS.arch,
            FLAGS.keras_h5,
            FLAGS.output,
            include_top=FLAGS.include_top,
            overwrite=FLAGS.overwrite,
        )
    except (weights.WeightFileError, FileExistsError) as e:
        logging.error("%s", e)
        return 1
    logging.info("Wrote %s", out)
    print(out)
    return 0


run = cli.console_script(define_flags, main)


if __name__ == "__main__":
    run()
