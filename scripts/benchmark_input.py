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

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from affect_jax.data import affectnet  # noqa: E402
from affect_jax.data.augment import augment_image  # noqa: E402

SIZE = 224
BATCH = 32


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
            os.path.join(images, f"{i}.jpg"), np.clip(image, 0, 255).astype(np.uint8),
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )
        for kind, value in (
            ("exp", str(i % 8)), ("val", f"{rng.uniform(-1, 1):.3f}"),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="Images generated.")
    parser.add_argument("--runs", type=int, default=5, help="Timed epochs after one warm-up.")
    parser.add_argument("--no-augment", action="store_true", help="Time without augmentation.")
    parser.add_argument("--chain", choices=("pipeline", "own"), default="pipeline")
    args = parser.parse_args(argv)

    from configs import default  # noqa: PLC0415 (configs/ is importable from the checkout)

    config = default.get_config()
    config.data.image_size = SIZE
    config.data.preprocessing = "caffe"
    config.augment.enabled = not args.no_augment
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "affectnet")
        write_npy_release(data_dir, args.images)
        config.data.dir = data_dir
        config.data.tfds_data_dir = os.path.join(tmp, "tfds")
        pool = affectnet.load_source(config, None).pools["train"]
        if args.chain == "pipeline":
            from affect_jax.data import pipeline  # noqa: PLC0415

            def epoch_batches(epoch):
                return pipeline.train_batches(pool, config, epoch, BATCH)
        else:
            files = sorted(
                str(p) for p in Path(data_dir, "val_set", "images").glob("*.jpg")
            )

            def epoch_batches(epoch):
                return own_chain(files, config, epoch)

        rates = []
        for epoch in range(args.runs + 1):  # Epoch 0 warms up (tracing, autotuning, caches).
            start = time.perf_counter()
            images = sum(int(b["image"].shape[0] if isinstance(b, dict) else b.shape[0])
                         for b in epoch_batches(epoch))
            elapsed = time.perf_counter() - start
            if epoch:
                rates.append(images / elapsed)
    median = statistics.median(rates)
    print(
        f"input pipeline ({args.chain}, augment={'off' if args.no_augment else 'on'}, "
        f"{SIZE} px, batch {BATCH}, {os.cpu_count()} cores): median {median:.0f} images/s "
        f"over {args.runs} epochs of {args.images // BATCH * BATCH} images (min {min(rates):.0f}, "
        f"max {max(rates):.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
