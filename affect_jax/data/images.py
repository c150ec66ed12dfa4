"""Image files as training and prediction read them: extensions, decoding, face crops, errors.

The AffectNet readers (preparation) and prediction both use these, so a file one of them reads
the other reads too, decoded the same way.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # loaded only for the formats and files decode_image leaves to it
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


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """TensorFlow's JPEG decode without TensorFlow, or None for a file to leave to it.

    ``tf.io.decode_image`` runs libjpeg-turbo with the fast integer DCT and fancy chroma
    upsampling; simplejpeg with the same two settings gives the same pixels bit for bit for
    colour (YCbCr, RGB) and grey JPEGs (tests/test_images.py). TensorFlow converts CMYK itself,
    and decides alone about files libjpeg warns about or rejects (truncated, stray bytes).
    """
    import simplejpeg

    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in ("YCbCr", "RGB", "Gray"):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    except ValueError:
        return None


def _decode_png(data: bytes) -> np.ndarray | None:
    """TensorFlow's PNG decode without TensorFlow (every colour type and bit depth gives the
    same pixels: alpha dropped, grey repeated, 16 bits cut to the high byte), or None."""
    import cv2

    image = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    )
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# JPEG and PNG, the formats photos and data sets come in, decode without TensorFlow, whose
# import would otherwise dominate a one-photo prediction's start-up.
_DECODERS_BY_SIGNATURE = ((b"\xff\xd8\xff", _decode_jpeg), (b"\x89PNG\r\n\x1a\n", _decode_png))


def decode_image(data: bytes) -> np.ndarray:
    """uint8 RGB [H, W, 3] of encoded image bytes, decoded as the input pipeline decodes them.

    JPEG and PNG without TensorFlow, other formats and files libjpeg or libpng reject with
    ``tf.io.decode_image``. Raises ``ValueError`` with one line (``decode_error_text``) for
    bytes that are no image and for an image without pixels.
    """
    decode = next((d for sig, d in _DECODERS_BY_SIGNATURE if data.startswith(sig)), None)
    image = decode(data) if decode else None
    if image is None:
        image = _decode_with_tensorflow(data)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image {image.shape}")
    return image


@functools.cache
def _tensorflow_off_accelerators():
    """TensorFlow, imported on first need and, where this process set up no devices yet, kept
    off any accelerator: it only decodes here."""
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):  # the devices are set up already
        tf.config.experimental.set_visible_devices([], "GPU")
    return tf


def _decode_with_tensorflow(data: bytes) -> np.ndarray:
    """``tf.io.decode_image`` as an array; its errors as a ValueError of one line."""
    tf = _tensorflow_off_accelerators()
    try:
        return decode_image_tensor(data).numpy()
    except tf.errors.OpError as e:
        raise ValueError(decode_error_text(e)) from None


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
