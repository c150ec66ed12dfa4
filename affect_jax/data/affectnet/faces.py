"""The image check: ``load_face`` opens a candidate's image, checks that it decodes as the input
pipeline will decode it, crops the face (official layout) and returns the example to store, or
raises ``DropError`` with the drop reason."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from affect_jax.data.affectnet.rows import Candidate
from affect_jax.data.images import crop_box, decode_image, decodes_the_same_in_the_pipeline

JPEG_QUALITY = 95


class DropError(Exception):
    """An example dropped by the image check: ``reason`` (a drop reason) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def load_face(candidate: Candidate, margin: float) -> dict:
    """The stored example of ``candidate`` (face box grown by ``margin``), or a DropError."""
    if candidate.pixels is not None:  # FER2013, FER+: the face itself, stored losslessly.
        data = tf.io.encode_png(candidate.pixels[..., None]).numpy()
    else:
        data = _read(candidate.image_path)
    # An image is turned upright by its EXIF orientation, as predict turns photos, unless the
    # label file gives coordinates (a face box, landmarks): those refer to the stored pixels.
    turn_upright = candidate.box is None and bool(np.isnan(candidate.landmarks).all())
    try:
        image = decode_image(data, turn_upright)
    except ValueError as e:
        raise DropError("dropped_undecodable_image", str(e)) from None
    height, width = image.shape[:2]
    landmarks = candidate.landmarks
    if candidate.box is None:
        box = (0, 0, width, height)
        if not decodes_the_same_in_the_pipeline(data, turn_upright):
            data = tf.io.encode_png(image).numpy()  # other formats, turned images: losslessly
    else:
        box = crop_box(candidate.box, margin, width, height)
        if box is None:
            raise DropError(
                "dropped_malformed_row",
                f"face box {candidate.box} lies outside the {width}x{height} image",
            )
        x0, y0, x1, y1 = box
        # Full-resolution chroma: faces are small and colour edges matter more than bytes.
        data = tf.io.encode_jpeg(
            image[y0:y1, x0:x1], quality=JPEG_QUALITY, chroma_downsampling=False
        ).numpy()
        landmarks = landmarks - np.array([x0, y0], np.float32)
    return {
        "image": data,
        "expression": candidate.expression,
        "valence": np.float32(candidate.valence),
        "arousal": np.float32(candidate.arousal),
        "landmarks": landmarks.astype(np.float32),
        "box": np.array(box, np.int32),
        "path": _display_path(candidate.image_path),
    }


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise DropError("dropped_missing_image", "no such file") from None
    except OSError as e:
        raise DropError("dropped_undecodable_image", f"unreadable ({e})") from None


def _display_path(path: str) -> str:
    # File names that are not UTF-8 must still fit a Text feature.
    return os.fsencode(path).decode("utf-8", "backslashreplace")
