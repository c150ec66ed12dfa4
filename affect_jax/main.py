"""Command line entry point: train (and evaluate) or evaluate a run.

This file is intentionally kept short; the logic is in ``train``, ``evaluate`` and the modules
they use, which can be tested and imported.

  python -m affect_jax.main --config=configs/resnet50.py --workdir=/tmp/run \\
      --config.data.dir=/data/AffectNet --config.model.weights=/weights/resnet50
"""

import os

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from affect_jax import distributed, evaluate, graceful_stop, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "'train' trains (resuming from workdir) then evaluates; 'eval' scores a "
                  "saved checkpoint.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Checkpoint scored by --mode=eval.")
flags.DEFINE_enum("split", "validation", ["validation", "test", "train"],
                  "Split scored by --mode=eval ('test': the source's held-out pool).")
flags.DEFINE_bool("flip_tta", False, "--mode=eval: average over a horizontally flipped copy.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Multi-process run (docs/scaling.md): 'auto' when the three flags below (or "
                  "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) are set or a "
                  "SLURM/Open MPI/TPU job of several processes is detected; 'on' always lets "
                  "jax.distributed.initialize() find the cluster; 'off' never.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, the same for every process.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    # tf.data only feeds the input pipeline: keep TensorFlow off any accelerator.
    tf.config.experimental.set_visible_devices([], "GPU")
    # Before any JAX computation: joins the processes of a multi-process run.
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           mode=FLAGS.distributed)
    config = FLAGS.config
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.expanduser(config.compilation_cache_dir))
        # Keep even sub-second programs: model initialisation compiles one per tensor shape.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    if FLAGS.mode == "train":
        with graceful_stop.exit_on_stop():  # SIGINT/SIGTERM: one line, exit 130/143
            train.train_and_evaluate(config, FLAGS.workdir)
    else:
        evaluate.evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, split=FLAGS.split,
                          flip_tta=FLAGS.flip_tta)


if __name__ == "__main__":
    app.run(main)
