"""Image files as training and prediction read them: extensions, decoding, face crops, errors.

The AffectNet readers (preparation) and prediction both use these, so a file one of them reads
the other reads too, decoded the same way.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # loaded only for the formats and files decode_image leaves to it
    import tensorflow as tf

# What ``decode_image`` decodes (it also reads JPEG XL, through TensorFlow, which nothing here
# can write to test).
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
    ".avif",
)


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


def _decode_with_opencv(data: bytes) -> np.ndarray | None:
    """PNG, BMP, GIF and WebP without TensorFlow, or None for a file OpenCV rejects.

    Alpha is dropped, grey repeated and more than 8 bits cut to the high byte, as
    ``tf.io.decode_image`` does for a PNG (the same pixels, tests/test_images.py); an animation
    gives its first frame. Unlike TensorFlow's decoders, OpenCV's apply a BMP's palette (TF
    returns the palette indices as grey) and read 1-bit BMPs and WebP with alpha.
    """
    import cv2

    image = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    )
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@functools.cache
def register_heif() -> None:
    """Pillow reads HEIC/HEIF from here on (pi-heif: libheif's decoders, loaded on first need)."""
    import pi_heif

    pi_heif.register_heif_opener()


def _decode_with_pillow(data: bytes, what: str) -> np.ndarray:
    """A TIFF's, HEIF's or AVIF's first image by Pillow, as a PNG decodes: alpha dropped, 16
    bits cut to the high byte; a TIFF or HEIF turned upright by the file's own orientation
    (Pillow's TIFF reader and libheif always turn it), an AVIF as stored. ValueError naming
    ``what`` with Pillow's reason for a file it rejects. (TensorFlow reads none of these
    formats, and OpenCV's TIFF reader premultiplies by alpha.)"""
    from PIL import Image, UnidentifiedImageError

    if what == "HEIF":
        register_heif()
    try:
        with Image.open(io.BytesIO(data), formats=[what]) as image:
            if image.mode.startswith("I;16"):
                grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"unreadable {what}: Pillow cannot identify its header") from None
    except Exception as e:  # Pillow raises various errors for files it cannot parse
        raise ValueError(f"unreadable {what}: {decode_error_text(e)}") from None


def _is_webp(data: bytes) -> bool:
    return data.startswith(b"RIFF") and data[8:12] == b"WEBP"


# HEIF (ISO/IEC 23008-12) and AVIF files are ISO base media files: a leading 'ftyp' box names
# the major brand, then the compatible ones. The brands of HEVC-coded HEIF images, and of AV1
# ones (AVIF); both may give the generic 'mif1' as their major brand.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1")
_AVIF_BRANDS = (b"avif", b"avis")


def _ftyp_brands(data: bytes) -> list[bytes]:
    """The major then the compatible brands of the file's leading 'ftyp' box ([] if none)."""
    if data[4:8] != b"ftyp":
        return []
    # A real box lists a few brands: a larger size field is not scanned to its end.
    end = min(int.from_bytes(data[:4], "big"), len(data), 1024)
    return [data[8:12]] + [data[i : i + 4] for i in range(16, end - 3, 4)]


def _heif_family(data: bytes) -> str | None:
    """'AVIF' (an AVIF brand anywhere in the list), 'HEIF' (a HEIF major brand otherwise), or
    None: Pillow's name of the format, read from one scan of the brands."""
    brands = _ftyp_brands(data)
    if any(brand in _AVIF_BRANDS for brand in brands):
        return "AVIF"
    return "HEIF" if brands and brands[0] in _HEIF_BRANDS else None


# JPEG and PNG, the formats photos and data sets come in, decode without TensorFlow, whose
# import would otherwise dominate a one-photo prediction's start-up; the other formats too,
# because TensorFlow decodes some of their files wrongly or not at all (above).
_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_OPENCV_SIGNATURES = (_PNG, b"BM", b"GIF87a", b"GIF89a")
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")


def _decoder(data: bytes):
    if data.startswith(_JPEG):
        return _decode_jpeg
    if data.startswith(_OPENCV_SIGNATURES) or _is_webp(data):
        return _decode_with_opencv
    if data.startswith(_TIFF_SIGNATURES):
        return functools.partial(_decode_with_pillow, what="TIFF")
    family = _heif_family(data)
    return functools.partial(_decode_with_pillow, what=family) if family else None


# EXIF's Orientation tag: how to turn the stored pixels to show the image upright.
ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: lambda a: a[:, ::-1],  # mirrored
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],  # mirrored upside down
    5: lambda a: a.transpose(1, 0, 2),  # mirrored, on its side
    6: lambda a: np.rot90(a, -1),  # on its side: turned a quarter clockwise to show
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored, on its other side
    8: lambda a: np.rot90(a, 1),  # on its other side: a quarter anticlockwise
}


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) still to apply to ``decode_image``'s pixels of encoded image
    bytes (JPEG, PNG, WebP; AVIF: its rotation and mirror boxes, as Pillow reports them); 1
    when the file has none, or none Pillow can read, and for TIFF and HEIF, whose readers turn
    the pixels themselves. Reads the header only."""
    from PIL import Image

    family = _heif_family(data)
    if data.startswith(_TIFF_SIGNATURES) or family == "HEIF":
        return 1
    # pi-heif, once registered, also claims AVIF files of the generic brand 'mif1'.
    formats = [family] if family else None
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # Pillow raises various errors for files it cannot parse
        return 1
    return orientation if orientation in _UPRIGHT else 1


def upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` [H, W, C] turned as EXIF ``orientation`` says (Pillow's ``exif_transpose``)."""
    turn = _UPRIGHT.get(orientation)
    return image if turn is None else np.ascontiguousarray(turn(image))


def decodes_the_same_in_the_pipeline(data: bytes, turn_upright: bool = False) -> bool:
    """Whether the input pipeline's ``tf.io.decode_image`` gives ``decode_image(data,
    turn_upright)``'s pixels: JPEG and PNG that need no turning (TensorFlow ignores EXIF).
    Preparation stores any other image re-encoded as PNG."""
    if not data.startswith((_JPEG, _PNG)):
        return False
    return not turn_upright or exif_orientation(data) == 1


def decode_image(data: bytes, turn_upright: bool = False) -> np.ndarray:
    """uint8 RGB [H, W, 3] of encoded image bytes, the pixels the input pipeline trains on.

    JPEG (bit for bit as ``tf.io.decode_image``), PNG, BMP, GIF, WebP, TIFF, HEIC/HEIF and
    AVIF without TensorFlow; other bytes, and files these libraries reject, with
    ``tf.io.decode_image``.
    ``turn_upright``: turned by the file's EXIF orientation, as photo viewers show it (phone
    cameras store portraits on their side with that tag); otherwise the stored pixels. Raises
    ``ValueError`` with one line (``decode_error_text``) for bytes that are no image and for an
    image without pixels.
    """
    decode = _decoder(data)
    image = decode(data) if decode else None
    if image is None:
        image = _decode_with_tensorflow(data)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image {image.shape}")
    return upright(image, exif_orientation(data)) if turn_upright else image


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


def read_image(path: str, turn_upright: bool = False) -> np.ndarray:
    """uint8 RGB [H, W, 3] of the image file ``path`` (see ``decode_image``; ``OSError`` if it
    cannot be read)."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data, turn_upright)


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
