"""An uploaded image, checked: the request's content type, body size, the ``image`` field, the
file's format and pixel count; every problem is an ``UploadError`` with its HTTP status."""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import AsyncIterator

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from affect_jax.data.images import decode_image, register_heif

FIELD = "image"
# What Pillow calls the formats accepted (data.images.decode_image's, as training decodes them).
FORMATS = {
    "JPEG": "JPEG",
    "PNG": "PNG",
    "WEBP": "WebP",
    "BMP": "BMP",
    "GIF": "GIF",
    "TIFF": "TIFF",
    "HEIF": "HEIC",
    "AVIF": "AVIF",
}
# Part content types taken as they come (the bytes decide): what browsers and curl send for
# a file whose type they do not know.
UNTYPED = ("", "application/octet-stream")


class UploadError(Exception):
    """A request the server cannot use: ``status`` (4xx) and a message saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _formats_text() -> str:
    names = list(FORMATS.values())
    return ", ".join(names[:-1]) + " or " + names[-1]


async def read_body(request: Request, max_bytes: int, idle_timeout_s: float) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``max_bytes``, and
    given up (408) when the client sends nothing for ``idle_timeout_s``."""
    too_large = UploadError(
        413, f"request body over the limit of {max_bytes} bytes (the server's --max_upload_mb)"
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise UploadError(
                408, f"the upload stalled: nothing received for {idle_timeout_s:g} s"
            ) from None
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, max_bytes: int, idle_timeout_s: float) -> bytes:
    """The bytes of the multipart file field ``image`` of a POST."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise UploadError(
            415,
            f"Content-Type {content_type or 'missing'!r}: expected "
            f"multipart/form-data with a file field {FIELD!r}",
        )
    body = await read_body(request, max_bytes, idle_timeout_s)
    if not body:
        raise UploadError(400, f"empty request body: expected a file field {FIELD!r}")

    async def replay() -> AsyncIterator[dict]:
        yield {"type": "http.request", "body": body, "more_body": False}

    replayed = Request(request.scope, receive=replay().__anext__)
    try:
        form = await replayed.form(max_files=1, max_fields=16)
    except MultiPartException as e:
        raise UploadError(400, f"malformed multipart body: {e.message}") from None
    try:
        field = form.get(FIELD)
        if field is None:
            names = sorted(set(form.keys()))
            raise UploadError(
                400, f"missing the file field {FIELD!r} (the form has {names or 'no fields'})"
            )
        if not isinstance(field, UploadFile):
            raise UploadError(
                400,
                f"field {FIELD!r} is text, not a file: send it as a file "
                f"(curl -F {FIELD}=@photo.jpg)",
            )
        part_type = (field.content_type or "").split(";")[0].strip().lower()
        if part_type not in UNTYPED and not part_type.startswith("image/"):
            raise UploadError(
                415,
                f"field {FIELD!r} has content type {part_type!r}: expected "
                f"an image ({_formats_text()})",
            )
        data = await field.read()
    finally:
        await form.close()
    if not data:
        raise UploadError(400, f"the file in field {FIELD!r} is empty")
    return data


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an uploaded file, decoded as the training pipeline decodes.

    The format and size are read from the header first, so no other format and no image over
    ``max_pixels`` is decoded.
    """
    register_heif()  # Pillow reads the header of every accepted format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                fmt, (width, height) = header.format, header.size
    except Image.DecompressionBombError as e:
        raise UploadError(413, f"image too large: {e}") from None
    except Exception:  # Pillow raises various errors for bytes that are no image
        raise UploadError(400, f"the file is not a {_formats_text()} image") from None
    if fmt not in FORMATS:
        raise UploadError(415, f"image format {fmt} is not accepted: expected {_formats_text()}")
    if width * height > max_pixels:
        raise UploadError(
            413, f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels"
        )
    try:
        return decode_image(data, turn_upright=True)
    except ValueError as e:
        raise UploadError(400, f"cannot decode the {FORMATS[fmt]} image: {e}") from None
