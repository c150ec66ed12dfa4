"""tf.data input pipeline: source -> split -> decode, resize, augment, preprocess -> batches.

Determinism (the basis of exact resume): the training order of epoch ``e`` is a NumPy permutation
(or, with ``data.sampling='balanced'``, a class-balanced draw of as many rows) seeded by
``(seed, e)``, and every example's augmentation seed is derived from the same pair and
its position, so an epoch restarted after a crash sees exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterator, Mapping

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from sklearn.model_selection import train_test_split

from affect_jax import imbalance
from affect_jax.data import (  # noqa: F401 (API)
    CAFFE_BGR_MEAN,
    SOURCES,
    example_shapes,
    preprocessing_mode,
)
from affect_jax.data import augment as augment_lib
from affect_jax.data.source import ExamplePool, Source
from affect_jax.errors import UserError


class DataConfigError(UserError, ValueError):
    """A data setting that cannot work, with what to pass instead."""


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """The pools a run trains and evaluates on."""

    source: Source
    train: ExamplePool
    validation: ExamplePool
    test: ExamplePool | None


def load_source(config: ml_collections.ConfigDict, workdir: str | None = None) -> Source:
    """Loads ``config.data.source`` by name (a config ``config_checks.validate`` accepted)."""
    name = config.data.source
    module = importlib.import_module(SOURCES[name])
    source = module.load_source(config, workdir)
    if source.num_classes != config.data.num_classes:
        raise DataConfigError(
            f"source {name!r} has {source.num_classes} classes but config.data.num_classes="
            f"{config.data.num_classes}"
        )
    return source


def subset(pool: ExamplePool, indices: np.ndarray) -> ExamplePool:
    """The rows ``indices`` of ``pool``, in that order."""
    return ExamplePool({k: np.asarray(v)[indices] for k, v in pool.columns.items()}, pool.decode)


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and validation indices, stratified by ``labels`` (scikit-learn);
    ``val_fraction`` in (0, 1)."""
    counts = np.bincount(labels)
    rare = [c for c, n in enumerate(counts) if 0 < n < 2]
    if rare:
        raise DataConfigError(
            f"classes {rare} have fewer than 2 examples: a stratified split needs at least 2 each"
        )
    num_classes = int((counts > 0).sum())
    num_val = math.ceil(val_fraction * len(labels))
    if min(num_val, len(labels) - num_val) < num_classes:
        raise DataConfigError(
            f"config.data.val_fraction={val_fraction} of {len(labels)} examples gives "
            f"{num_val} validation / {len(labels) - num_val} training examples, fewer than the "
            f"{num_classes} classes: a stratified split needs one of each class on both sides"
        )
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, random_state=seed, stratify=labels
    )
    return np.sort(train_idx), np.sort(val_idx)


def make_splits(config: ml_collections.ConfigDict, workdir: str | None = None) -> DataSplits:
    """Loads the source; its 'validation' pool is the validation split when it has one (a
    dataset's standard protocol, e.g. FER2013's PublicTest), else the train pool is split
    (stratified, ``data.val_fraction``)."""
    source = load_source(config, workdir)
    pool = source.pools["train"]
    if "validation" in source.pools:
        train, validation = pool, source.pools["validation"]
        how = "the source's own validation split"
    else:
        train_idx, val_idx = stratified_split(
            pool.labels, config.data.val_fraction, config.data.split_seed
        )
        train, validation = subset(pool, train_idx), subset(pool, val_idx)
        how = f"a stratified {config.data.val_fraction:g} hold-out"
    logging.info(
        "Data %r: %d train / %d validation examples (%s; %d classes)%s; counts %s",
        source.name,
        len(train),
        len(validation),
        how,
        source.num_classes,
        "" if source.has_valence_arousal else ", no valence/arousal",
        dict(source.counts),
    )
    return DataSplits(source, train, validation, source.pools.get("test"))


def preprocess(image: tf.Tensor, mode: str) -> tf.Tensor:
    """RGB float in [0, 255] -> network input.

    'caffe' is Keras's ``imagenet_utils.preprocess_input(mode='caffe')`` (RGB->BGR, minus the
    ImageNet BGR mean, no scaling), which the Keras ImageNet weights expect; 'unit' maps to [-1, 1].
    """
    if mode == "caffe":
        return image[..., ::-1] - tf.constant(CAFFE_BGR_MEAN, image.dtype)
    return image / 127.5 - 1.0


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Any-size image -> float32 ``[size, size, 3]`` (bilinear, antialiased), as in training."""
    image = tf.cast(image, tf.float32)
    same = tf.logical_and(tf.shape(image)[0] == size, tf.shape(image)[1] == size)
    resized = tf.cond(
        same,
        lambda: image,
        lambda: tf.image.resize(image, (size, size), method="bilinear", antialias=True),
    )
    return tf.ensure_shape(resized, (size, size, 3))


def _example_fn(pool: ExamplePool, config: ml_collections.ConfigDict, train: bool):
    size = config.data.image_size
    mode = preprocessing_mode(config)
    augment = train and config.augment.enabled

    def fn(row: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = resize_image(pool.decode(row), size)
        if augment:
            image = augment_lib.augment_image(image, row["_seed"], config.augment)
        va = tf.stack([row["valence"], row["arousal"]])
        has_va = tf.reduce_all(tf.math.is_finite(va))
        return {
            "image": preprocess(image, mode),
            "expression": tf.cast(row["expression"], tf.int32),
            # NaN targets (no annotation) become 0 with has_va=0, so losses can mask them.
            "valence_arousal": tf.where(has_va, tf.cast(va, tf.float32), 0.0),
            "has_va": tf.cast(has_va, tf.float32),
            "mask": tf.ones((), tf.float32),
        }

    return fn


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = 0  # tf.data default pool, sized to the cores.
    return options


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of ``epoch`` (0-based), a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_order(labels: np.ndarray, config: ml_collections.ConfigDict, epoch: int) -> np.ndarray:
    """The training rows of ``epoch`` (0-based), as many as ``labels`` has, by
    ``config.data.sampling``: 'shuffle' (``epoch_permutation``: each example once) or
    'balanced' (``imbalance.balanced_order``: each class drawn equally often). A pure function
    of (seed, epoch) either way, so a resumed epoch reads the same batches."""
    sampling = config.data.get("sampling", "shuffle")
    if sampling == "shuffle":
        return epoch_permutation(len(labels), config.seed, epoch)
    if sampling == "balanced":
        return imbalance.balanced_order(labels, config.seed, epoch)
    raise DataConfigError(
        f"config.data.sampling={sampling!r}; expected one of {imbalance.SAMPLINGS}"
    )


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps per epoch: the last partial batch is dropped (fixed shapes under jit)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise DataConfigError(
            f"the training split has {num_examples} examples, fewer than batch_size={batch_size}"
        )
    return steps


def process_rows(
    num_rows: int, batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
    """Positions this process reads from ``num_rows`` rows cut into global batches.

    Process ``p`` of ``P`` takes rows ``[p * b, (p + 1) * b)`` (``b = batch_size // P``) of every
    global batch, so the processes' local batches together are exactly the single-process batch,
    in the order of the 'data' mesh (devices are ordered by process).
    """
    if batch_size % process_count:
        raise DataConfigError(
            f"batch size {batch_size} is not divisible by the {process_count} processes"
        )
    if num_rows % batch_size:
        raise ValueError(f"{num_rows} rows are not whole batches of {batch_size}")
    local = batch_size // process_count
    batches = np.arange(num_rows).reshape(-1, batch_size)
    return batches[:, process_index * local : (process_index + 1) * local].reshape(-1)


def train_batches(
    pool: ExamplePool,
    config: ml_collections.ConfigDict,
    epoch: int,
    batch_size: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """One epoch of training batches (full batches only) from ``start_step`` on.

    ``batch_size`` is the global batch; with several processes each yields its own
    ``batch_size // process_count`` rows of every global batch (``process_rows``).
    """
    n = len(pool)
    perm = epoch_order(pool.labels, config, epoch)
    # Per-example stateless augmentation seed: (seed, epoch * n + global position), so an
    # example is augmented the same whichever process reads it.
    seeds = np.stack(
        [np.full(n, config.seed, np.int64), epoch * n + np.arange(n, dtype=np.int64)], axis=1
    )
    rows = process_rows(n // batch_size * batch_size, batch_size, process_index, process_count)
    columns = {k: np.asarray(v)[perm[rows]] for k, v in pool.columns.items()}
    columns["_seed"] = seeds[rows]
    local_batch = batch_size // process_count
    ds = tf.data.Dataset.from_tensor_slices(columns)
    ds = ds.skip(start_step * local_batch)
    ds = ds.map(_example_fn(pool, config, train=True), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(2).with_options(_options())


def eval_batches(
    pool: ExamplePool,
    config: ml_collections.ConfigDict,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once; the last batch padded to ``batch_size`` with ``mask`` 0.

    ``batch_size`` is the global batch; with several processes each yields its own slice of
    every (padded) global batch, so all processes yield the same number of batches.
    """
    n = len(pool)
    if n == 0:
        return
    padded = -(-n // batch_size) * batch_size
    rows = process_rows(padded, batch_size, process_index, process_count)
    valid = rows < n
    # Padding rows decode a real example, then are zeroed (mask 0 included) below.
    columns = {k: np.asarray(v)[np.minimum(rows, n - 1)] for k, v in pool.columns.items()}
    columns["_valid"] = valid
    example_fn = _example_fn(pool, config, train=False)

    def fn(row: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        example = example_fn(row)
        return {k: tf.where(row["_valid"], v, tf.zeros_like(v)) for k, v in example.items()}

    ds = tf.data.Dataset.from_tensor_slices(columns)
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size // process_count).prefetch(2).with_options(_options())
    yield from ds.as_numpy_iterator()


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads every field to ``batch_size`` rows with zeros (``mask`` 0 marks the padding)."""
    n = len(batch["mask"])
    if n == batch_size:
        return batch
    return {
        k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
