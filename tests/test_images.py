"""The image helpers shared by the AffectNet readers and prediction (affect_jax.data.images)."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from affect_jax import predict
from affect_jax.data import images
from affect_jax.data.affectnet import detect_layout, readers

PIL_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
}
COLOUR = (200, 40, 60)


def _write(path, ext, size=(12, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8) + np.array(COLOUR, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=PIL_FORMATS[ext])
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


@pytest.mark.parametrize("ext", images.IMAGE_EXTENSIONS)
def test_every_listed_extension_decodes(tmp_path, ext):
    path = str(tmp_path / f"face{ext}")
    _write(path, ext)
    image = images.read_image(path)
    assert image.dtype == np.uint8 and image.shape == (8, 12, 3)
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), COLOUR, atol=8)


def test_image_names():
    for ext in images.IMAGE_EXTENSIONS:
        assert images.is_image_name(f"a{ext}") and images.is_image_name(f"a{ext.upper()}")
    assert not images.is_image_name(".hidden.jpg")
    assert not images.is_image_name("a.tif") and not images.is_image_name("a.txt")


def test_data_readers_and_prediction_accept_the_same_files(tmp_path):
    root = tmp_path / "faces"
    for ext in images.IMAGE_EXTENSIONS:
        _write(str(root / "happy" / f"x{ext}"), ext)
    (root / "happy" / "notes.txt").write_text("not an image")

    plan = detect_layout(str(root), "folders")
    read = [item for spec in plan.splits for item in readers.read_split(spec, plan)]
    assert all(isinstance(item, readers.Candidate) for item in read)
    assert sorted(os.path.basename(c.image_path) for c in read) == sorted(
        f"x{ext}" for ext in images.IMAGE_EXTENSIONS
    )
    kinds = {os.path.basename(p): kind for p, kind, _ in predict.expand_inputs([str(root)])}
    assert kinds == {f"x{ext}": "image" for ext in images.IMAGE_EXTENSIONS}


def test_crop_box_clips_and_rejects():
    assert images.crop_box((10, 6, 24, 20), 0.0, 64, 48) == (10, 6, 34, 26)
    assert images.crop_box((10, 6, 24, 20), 0.5, 64, 48) == (0, 0, 46, 36)
    assert images.crop_box((60, 40, 30, 30), 0.0, 64, 48) == (60, 40, 64, 48)
    assert images.crop_box((70, 10, 5, 5), 0.0, 64, 48) is None


def test_unreadable_file_message_is_one_plain_line(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(tf.errors.OpError) as raised:
        images.read_image(str(path))
    assert "{{function_node" in str(raised.value)  # What the text below strips.
    text = images.decode_error_text(raised.value)
    assert text.startswith("Unknown image file format")
    assert "{{" not in text and "[Op:" not in text and "\n" not in text
    assert images.decode_error_text(ValueError("empty image (0, 4, 3)\nmore")) == (
        "empty image (0, 4, 3)"
    )
