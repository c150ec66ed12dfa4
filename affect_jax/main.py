"""Command line entry point: train (and evaluate) or evaluate a run.

This file is intentionally kept short; the logic is in ``train``, ``evaluate`` and the modules
they use, which can be tested and imported.

  python -m affect_jax.main --config=configs/resnet50.py --workdir=/tmp/run \\
      --config.data.dir=/data/AffectNet --config.model.weights=/weights/resnet50

The console shows progress, one line per epoch and warnings; ``<workdir>/run.log`` keeps every
log line of every library. Mistakes (a config value, the data, a missing file, a full disk) are
one line and exit code 1 (2 for the command line itself); ``--traceback`` shows where they were
raised. ``TF_CPP_MIN_LOG_LEVEL=0`` shows TensorFlow's and XLA's C++ logs again.
"""

import concurrent.futures
import os

from absl import app, flags, logging
from ml_collections import config_flags

from affect_jax import cli, console

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "'train' trains (resuming from workdir) then evaluates; 'eval' scores a saved checkpoint.",
)
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Checkpoint scored by --mode=eval.")
flags.DEFINE_enum(
    "split",
    "validation",
    ["validation", "test", "train"],
    "Split scored by --mode=eval ('test': the source's held-out pool).",
)
flags.DEFINE_bool("flip_tta", False, "--mode=eval: average over a horizontally flipped copy.")
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Multi-process run (docs/scaling.md): 'auto' when the three flags below (or "
    "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) are set or a "
    "SLURM/Open MPI/TPU job of several processes is detected; 'on' always lets "
    "jax.distributed.initialize() find the cluster; 'off' never.",
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same for every process."
)
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    config = FLAGS.config
    training = FLAGS.mode == "train"
    # Imported here, after cli.run has quieted the C++ loggers; their start-up lines go to the
    # run's log file.
    with console.native_startup_logs():
        import jax

        from affect_jax import config_checks, distributed, run_dir, steps, train_call

        # Before any JAX computation: joins the processes of a multi-process run.
        distributed.initialize(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, mode=FLAGS.distributed
        )
        devices = jax.devices()
    config_checks.validate(config, training=training)  # before anything is written or built
    if config.compilation_cache_dir:
        jax.config.update(
            "jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir)
        )
        # Keep even sub-second programs: model initialisation compiles one per tensor shape.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="train_start") as pool:
        # The model is built and the train call compiled while TensorFlow (the input pipeline)
        # is imported, side by side.
        initial_state = early_call = None
        if training:
            # A run with checkpoints is restored straight into place (train.setup).
            if not run_dir.has_checkpoints(FLAGS.workdir):
                initial_state = pool.submit(steps.initial_train_state, config)
            # Not for a finished run, which trains no more.
            epochs_left = run_dir.saved_epochs(FLAGS.workdir) < config.num_epochs
            if train_call.compiles_before_data(config) and epochs_left:
                early_call = pool.submit(train_call.compile_early, config)
        with console.native_startup_logs():
            import tensorflow as tf

            from affect_jax import evaluate, graceful_stop, train

            # tf.data only feeds the input pipeline: keep TensorFlow off any accelerator.
            tf.config.experimental.set_visible_devices([], "GPU")
        if jax.process_index() == 0 and (training or os.path.isdir(FLAGS.workdir)):
            os.makedirs(FLAGS.workdir, exist_ok=True)
            console.log_to_file(os.path.join(FLAGS.workdir, run_dir.RUN_LOG))
        logging.info(
            "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), devices
        )
        logging.info("Config:\n%s", config, extra=console.FILE_ONLY)
        if training:
            with graceful_stop.exit_on_stop():  # SIGINT/SIGTERM: one line, exit 130/143
                train.train_and_evaluate(config, FLAGS.workdir, initial_state, early_call)
        else:
            evaluate.evaluate(
                config,
                FLAGS.workdir,
                checkpoint=FLAGS.checkpoint,
                split=FLAGS.split,
                flip_tta=FLAGS.flip_tta,
            )


def run() -> None:
    """The affect-jax-train console script (this module's flags are defined at import)."""
    cli.run(main, output_flag="workdir")


if __name__ == "__main__":
    run()
