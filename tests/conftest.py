"""Shared fixtures: tiny configurations (used for testing only) and paths."""

import collections
import logging
import os
import runpy
import tempfile
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import pytest

from affect_jax import sharding, steps
from affect_jax.data import pipeline
from affect_jax.ops import conv as conv_ops
from affect_jax.ops import native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
# One persistent XLA cache for the whole suite (this process and the runs it starts): most of a
# tiny run's time is compiling, and every run compiles the same programs.
XLA_CACHE = os.path.join(tempfile.gettempdir(), f"affect_jax_tests_xla_{os.getuid()}")
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# Tests that need the C++ extension skip with this one reason, so the summary counts them
# together (`pytest_terminal_summary`).
NATIVE_SKIP_REASON = f"needs the C++ extension: {native.unavailable_reason()}"
needs_native = pytest.mark.skipif(not native.available(), reason=NATIVE_SKIP_REASON)


def skip_counts(skipped_reports) -> collections.Counter:
    """Skipped test reports counted per reason (pytest's -rs groups them per location)."""
    counts = collections.Counter()
    for report in skipped_reports:
        if isinstance(report.longrepr, tuple):
            counts[report.longrepr[2].removeprefix("Skipped: ")] += 1
    return counts


def pytest_terminal_summary(terminalreporter):
    """The number of skipped tests per reason, after pytest's short summary."""
    counts = skip_counts(terminalreporter.stats.get("skipped", []))
    if counts:
        terminalreporter.write_sep("=", "skips per reason")
        for reason, n in counts.most_common():
            terminalreporter.write_line(f"{n} skipped: {reason}")


def load_config(name: str) -> ml_collections.ConfigDict:
    return runpy.run_path(os.path.join(CONFIGS, f"{name}.py"))["get_config"]()


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """A few-second run: a 1/16-width VGG16 on 32-px synthetic faces."""
    config = load_config("default")
    config.model.name = "vgg16"
    config.model.width = 1 / 16
    config.model.init = "random"
    config.model.hidden_sizes = (16,)
    config.model.dropout = 0.1
    config.data.source = "synthetic"
    config.data.synthetic_size = 120
    config.data.image_size = 32
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_epochs = 2
    config.steps_per_epoch = 4
    config.log_every_steps = 2
    config.compilation_cache_dir = XLA_CACHE
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture
def tiny():
    return tiny_config()


def one_batch(config: ml_collections.ConfigDict, n: int = 8) -> dict[str, np.ndarray]:
    """The first training batch of ``config``'s data (epoch 0)."""
    splits = pipeline.make_splits(config)
    return next(pipeline.train_batches(splits.train, config, 0, n).as_numpy_iterator())


def stack_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches stacked on a leading axis, as the driver feeds ``steps.make_train_steps``."""
    return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


def tiny_run(name: str):
    """(config, mesh, (graphdef, tx, state), splits) of a 1/16-width `name` on tiny data."""
    config = tiny_config()
    config.model.name = name
    config.model.width = 1 / 16
    state = steps.create_train_state(config, steps.create_initial_model(config))
    return config, sharding.make_mesh(), state, pipeline.make_splits(config)


def bit_identical(config: ml_collections.ConfigDict) -> bool:
    """Whether a loop over batches reproduces single calls bit for bit: with the extension's
    convolutions (deterministic kernels); XLA's may fuse the loop body differently."""
    return conv_ops.resolve_impl(config.conv_impl) in ("onednn", "winograd")


def randomize_keras_weights(
    keras,
    model,
    rng: np.random.Generator,
    gamma_range: Callable[[str], tuple[float, float]] = lambda name: (0.5, 1.5),
) -> None:
    """Random biases and BatchNorm parameters/statistics of a Keras model (Keras initialises
    them constant, which would hide a mis-mapped tensor). ``gamma_range(layer name)``: the
    uniform range of a BatchNorm's scale. ``keras`` is passed in: not every test imports it."""
    for layer in model.layers:
        values = layer.get_weights()
        if not values:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = values[0].shape
            values = [
                rng.uniform(*gamma_range(layer.name), shape),
                rng.normal(0, 0.1, shape),
                rng.normal(0, 0.1, shape),
                rng.uniform(0.5, 1.5, shape),
            ]
        else:
            values = [values[0], rng.normal(0, 0.05, values[1].shape)]
        layer.set_weights([v.astype(np.float32) for v in values])


def report_measurements(
    request, cache_key: str, results: dict, summary: Callable[[dict], list[str]]
) -> None:
    """Shows ``summary(results)``, a test module's measured errors, in the terminal summary
    (with or without output capture) and logs it; stores ``results`` in the pytest cache
    under ``cache_key``. Nothing when no test measured anything."""
    if not results:
        return
    lines = summary(results)
    logger = logging.getLogger(request.module.__name__)
    for line in lines:
        logger.info(line)
    if getattr(request.config, "cache", None) is not None:  # None under -p no:cacheprovider
        request.config.cache.set(cache_key, results)
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # Visible without -s.
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)


# Flags that turn configs/default.py into the tiny config above on the command line.
TINY_FLAGS = [
    "--config.model.name=vgg16",
    "--config.model.width=0.0625",
    "--config.model.init=random",
    "--config.model.hidden_sizes=(16,)",
    "--config.model.dropout=0.1",
    "--config.data.source=synthetic",
    "--config.data.synthetic_size=120",
    "--config.data.image_size=32",
    "--config.batch_size=8",
    "--config.eval_batch_size=16",
    "--config.num_epochs=3",
    "--config.steps_per_epoch=4",
    "--config.log_every_steps=2",
    f"--config.compilation_cache_dir={XLA_CACHE}",
]
