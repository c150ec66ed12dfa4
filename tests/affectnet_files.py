"""Writers of tiny AffectNet files in the real formats (npy release, official lists and
images), shared by the AffectNet tests."""

import csv
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from tests.conftest import load_config

RED, BLUE = (220, 30, 30), (30, 30, 220)


def write_jpeg(path, array_or_colour, size=(32, 32)):
    """A JPEG of an image array, or of one colour at ``size``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = array_or_colour
    if not isinstance(array, np.ndarray):
        array = np.zeros((size[1], size[0], 3), np.uint8) + np.array(array_or_colour, np.uint8)
    Image.fromarray(array).save(path, quality=95, subsampling=0)


def write_bytes(path, data=b"\xff\xd8\xff\xe0 not really a jpeg"):
    """A file holding ``data`` (by default a JPEG header and no image)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_truncated_jpeg(path):
    """The first half of a noise JPEG."""
    write_jpeg(path, np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    with open(path, "rb") as f:
        data = f.read()
    write_bytes(path, data[: len(data) // 2])


def npy_example(
    split_dir,
    example_id,
    exp="0",
    val="0.5",
    aro="-0.25",
    lnd=True,
    image=True,
    colour=(128, 128, 128),
):
    """One npy-release example: its image and annotation files (None leaves a file out)."""
    if image:
        write_jpeg(os.path.join(split_dir, "images", f"{example_id}.jpg"), colour)
    ann = os.path.join(split_dir, "annotations")
    os.makedirs(ann, exist_ok=True)
    for kind, value in (("exp", exp), ("val", val), ("aro", aro)):
        if value is not None:
            np.save(os.path.join(ann, f"{example_id}_{kind}.npy"), np.array(value))
    if lnd is True:
        np.save(os.path.join(ann, f"{example_id}_lnd.npy"), np.arange(136, dtype=np.float64))
    elif lnd is not None:
        np.save(os.path.join(ann, f"{example_id}_lnd.npy"), lnd)


def npy_release(split_dir, per_class=3):
    """per_class good examples of each of the 8 classes; id = class * 100 + k."""
    for c in range(8):
        for k in range(per_class):
            npy_example(
                split_dir,
                str(c * 100 + k),
                exp=str(c),
                val=f"{-0.9 + 0.1 * c:.3f}",
                aro=f"{0.05 * k:.3f}",
                colour=(10 * c, 20 * k, 50),
            )


def official_image(images_dir, rel, size, box, face=RED, background=BLUE):
    """An official-release image: ``face`` in ``box`` on ``background``."""
    width, height = size
    array = np.zeros((height, width, 3), np.uint8) + np.array(background, np.uint8)
    x, y, w, h = box
    array[max(0, y) : y + h, max(0, x) : x + w] = face
    write_jpeg(os.path.join(images_dir, rel), array)


def landmark_text(x, y):
    """68 landmarks as the official lists write them (x;y;x;y;...), offset by (x, y)."""
    points = np.stack([np.arange(68) + x, np.arange(68) * 0.5 + y], axis=1).reshape(-1)
    return ";".join(f"{v:g}" for v in points)


def official_row(rel, box, expression=1, valence=0.5, arousal=-0.5, landmarks=None):
    """A row of training.csv/validation.csv."""
    x, y, w, h = box
    return [
        rel,
        x,
        y,
        w,
        h,
        landmark_text(x, y) if landmarks is None else landmarks,
        expression,
        valence,
        arousal,
    ]


def write_csv(path, rows, header=None):
    """A CSV file of ``rows`` under an optional header."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


OFFICIAL_HEADER = [
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
]


def data_config(data_dir, tfds_dir, **data):
    """The default config reading ``data_dir``, preparing into ``tfds_dir``, with ``data`` set."""
    config = load_config("default")
    config.data.dir = str(data_dir)
    config.data.tfds_data_dir = str(tfds_dir)
    for k, v in data.items():
        config.data[k] = v
    return config


def decoded_example(pool, i):
    """Example ``i`` of a source pool, decoded to its image array."""
    return pool.decode({k: tf.constant(v[i]) for k, v in pool.columns.items()}).numpy()
