r"""Measures the input pipeline's images/second at 224 px on the npy layout.

    python scripts/benchmark_input.py [--images 320] [--runs 5] [--no-augment] [--chain own]

Writes ``--images`` 224x224 JPEG faces-like images (smooth colour fields plus grain, ~10-20 kB
like the redistributed release's crops) with npy annotations into a temp dir, prepares them with
the AffectNet builder, then times whole training epochs of batches of 32 (decode, resize,
augment, preprocess, batch; tf.data AUTOTUNE threads, i.e. the machine's cores) after one
warm-up epoch. Prints the median and spread over ``--runs`` epochs.

``--chain pipeline`` (default) times ``affect_jax.data.pipeline.train_batches``; ``--chain own``
times an equivalent stand-alone chain (read file, decode_jpeg, resize to 224, augment_image,
batch) that does not depend on the pipeline module.
"""

from __future__ import annotations

import os
import runpy
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf
from absl import app, flags

from affect_jax.data import affectnet
from affect_jax.data.augment import augment_image

ROOT = Path(__file__).resolve().parent.parent
SIZE = 224
BATCH = 32

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 320, "Images generated.", lower_bound=BATCH)
flags.DEFINE_integer("runs", 5, "Timed epochs after one warm-up.", lower_bound=1)
flags.DEFINE_bool("no-augment", False, "Time without augmentation.")
flags.DEFINE_enum(
    "chain",
    "pipeline",
    ["pipeline", "own"],
    "'pipeline': affect_jax.data.pipeline.train_batches; 'own': a stand-alone equivalent chain.",
)


def write_npy_release(root: str, count: int, seed: int = 0) -> None:
    """``count`` 224x224 JPEGs with exp/val/aro/lnd annotations in ``root/val_set``."""
    rng = np.random.default_rng(seed)
    images = os.path.join(root, "val_set", "images")
    annotations = os.path.join(root, "val_set", "annotations")
    os.makedirs(images)
    os.makedirs(annotations)
    for i in range(count):
        coarse = rng.uniform(0, 255, (7, 7, 3)).astype(np.float32)
        image = cv2.resize(coarse, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        image += rng.normal(0, 6, image.shape)
        cv2.imwrite(
            os.path.join(images, f"{i}.jpg"),
            np.clip(image, 0, 255).astype(np.uint8),
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )
        for kind, value in (
            ("exp", str(i % 8)),
            ("val", f"{rng.uniform(-1, 1):.3f}"),
            ("aro", f"{rng.uniform(-1, 1):.3f}"),
        ):
            np.save(os.path.join(annotations, f"{i}_{kind}.npy"), np.array(value))
        np.save(os.path.join(annotations, f"{i}_lnd.npy"), rng.uniform(0, SIZE, 136))


def own_chain(files: list[str], config, epoch: int) -> tf.data.Dataset:
    """Stand-alone equivalent of the training chain (no pipeline module needed)."""
    n = len(files)
    order = np.random.default_rng([config.seed, epoch]).permutation(n)
    seeds = np.stack([np.zeros(n, np.int64), epoch * n + np.arange(n, dtype=np.int64)], 1)

    def load(path, seed):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        image = tf.image.resize(tf.cast(image, tf.float32), (SIZE, SIZE), antialias=True)
        if config.augment.enabled:
            image = augment_image(image, seed, config.augment)
        return image

    ds = tf.data.Dataset.from_tensor_slices((np.array(files)[order], seeds))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(BATCH, drop_remainder=True).prefetch(2)


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    no_augment = FLAGS["no-augment"].value
    # configs/ is a directory, not a package: loaded by path as the configs load each other.
    config = runpy.run_path(str(ROOT / "configs" / "default.py"))["get_config"]()
    config.data.image_size = SIZE
    config.data.preprocessing = "caffe"
    config.augment.enabled = not no_augment
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "affectnet")
        write_npy_release(data_dir, FLAGS.images)
        config.data.dir = data_dir
        config.data.tfds_data_dir = os.path.join(tmp, "tfds")
        pool = affectnet.load_source(config, None).pools["train"]
        if FLAGS.chain == "pipeline":
            from affect_jax.data import pipeline  # noqa: PLC0415

            def epoch_batches(epoch):
                return pipeline.train_batches(pool, config, epoch, BATCH)
        else:
            files = sorted(str(p) for p in Path(data_dir, "val_set", "images").glob("*.jpg"))

            def epoch_batches(epoch):
                return own_chain(files, config, epoch)

        rates = []
        for epoch in range(FLAGS.runs + 1):  # Epoch 0 warms up (tracing, autotuning, caches).
            start = time.perf_counter()
            images = sum(
                int(b["image"].shape[0] if isinstance(b, dict) else b.shape[0])
                for b in epoch_batches(epoch)
            )
            elapsed = time.perf_counter() - start
            if epoch:
                rates.append(images / elapsed)
    median = statistics.median(rates)
    print(
        f"input pipeline ({FLAGS.chain}, augment={'off' if no_augment else 'on'}, "
        f"{SIZE} px, batch {BATCH}, {os.cpu_count()} cores): median {median:.0f} images/s "
        f"over {FLAGS.runs} epochs of {FLAGS.images // BATCH * BATCH} images "
        f"(min {min(rates):.0f}, max {max(rates):.0f})"
    )
    return 0


if __name__ == "__main__":
    app.run(main)
