"""Image files as training and prediction read them: extensions, decoding, face crops, errors.

The AffectNet readers (preparation) and prediction both use these, so a file one of them reads
the other reads too, decoded the same way.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # loaded when an image is decoded: prediction imports it in the background
    import tensorflow as tf

# What ``tf.io.decode_image`` decodes (it also reads JPEG XL, which nothing here can write to test).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def is_image_name(name: str) -> bool:
    """True for a file name with an image extension that is not hidden (no leading dot)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def decode_image_tensor(data: tf.Tensor) -> tf.Tensor:
    """uint8 RGB [H, W, 3] of encoded image bytes (an animation's first frame): the input
    pipeline's decode."""
    import tensorflow as tf

    return tf.io.decode_image(data, channels=3, expand_animations=False)


def decode_image(data: bytes) -> np.ndarray:
    """uint8 RGB [H, W, 3] of encoded image bytes, decoded as the input pipeline decodes them.

    Raises ``tf.errors.OpError`` for bytes that are no image and ``ValueError`` for an image
    without pixels (``decode_error_text`` words either).
    """
    image = decode_image_tensor(data).numpy()
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image {image.shape}")
    return image


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of the image file ``path`` (see ``decode_image``; ``OSError`` if it
    cannot be read)."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data)


def decode_error_text(error: Exception) -> str:
    """Why a file did not decode: the error's first line without TF's function-node and op
    decorations."""
    text = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\]$", "", text)


def crop_box(
    box: tuple[float, float, float, float], margin: float, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Integer crop (x0, y0, x1, y1), end-exclusive, of a face box (x, y, width, height) grown by
    ``margin`` of its size on each side and clipped to the image; None if nothing of it lies
    inside the image."""
    x, y, w, h = box
    x0 = max(0, math.floor(x - margin * w))
    y0 = max(0, math.floor(y - margin * h))
    x1 = min(width, math.ceil(x + w + margin * w))
    y1 = min(height, math.ceil(y + h + margin * h))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1
