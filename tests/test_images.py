"""The image helpers shared by the AffectNet readers and prediction (affect_jax.data.images)."""

import io
import os

import cv2
import numpy as np
import pillow_heif
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from affect_jax import predict
from affect_jax.data import images
from affect_jax.data.affectnet import detect_layout, faces, readers
from affect_jax.data.affectnet.rows import Candidate

PIL_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".heic": "HEIF",
    ".heif": "HEIF",
    ".avif": "AVIF",
}
COLOUR = (200, 40, 60)


def _write(path, ext, size=(12, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8) + np.array(COLOUR, np.uint8)
    buffer = io.BytesIO()
    _save(Image.fromarray(pixels), buffer, PIL_FORMATS[ext])
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
    assert not images.is_image_name("a.psd") and not images.is_image_name("a.txt")


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
        images.decode_image_tensor(path.read_bytes())
    assert "{{function_node" in str(raised.value)  # What the text below strips.
    with pytest.raises(ValueError) as raised:
        images.read_image(str(path))
    text = str(raised.value)
    assert text.startswith("Unknown image file format")
    assert "{{" not in text and "[Op:" not in text and "\n" not in text
    assert images.decode_error_text(ValueError("empty image (0, 4, 3)\nmore")) == (
        "empty image (0, 4, 3)"
    )


def _save(image: Image.Image, buffer: io.BytesIO, fmt: str, **options) -> None:
    if fmt == "HEIF":  # pillow-heif writes it, not registered in Pillow (pi-heif reads)
        pillow_heif.from_pillow(image).save(buffer, **options)
    else:
        image.save(buffer, format=fmt, **options)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    _save(image, buffer, fmt, **options)
    return buffer.getvalue()


def _photo_like() -> np.ndarray:
    """Smooth colour with edges and noise: what chroma subsampling and the DCT act on."""
    from skimage import data

    rng = np.random.default_rng(0)
    image = data.astronaut()[100:197, 150:263].astype(np.int16)  # odd sides: partial blocks
    return np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)


def _jpegs() -> dict[str, bytes]:
    rgb = Image.fromarray(_photo_like())
    cases = {
        f"q{q}-{name}": _encoded(rgb, "JPEG", quality=q, subsampling=sub)
        for q in (50, 100)
        for sub, name in ((0, "444"), (1, "422"), (2, "420"))
    }
    cases["progressive"] = _encoded(rgb, "JPEG", quality=90, progressive=True)
    cases["grey"] = _encoded(rgb.convert("L"), "JPEG", quality=90)
    cases["rgb-colourspace"] = _encoded(rgb, "JPEG", quality=90, keep_rgb=True)
    return cases


def _pngs() -> dict[str, bytes]:
    pixels = _photo_like()
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, pixels.shape[:2], dtype=np.uint8)
    palette = Image.fromarray(pixels).convert("P")
    with_transparency = palette.copy()
    with_transparency.info["transparency"] = 3
    wide = rng.integers(0, 1 << 16, pixels.shape, dtype=np.uint16)
    return {
        "rgb": _encoded(Image.fromarray(pixels), "PNG"),
        "rgba": _encoded(Image.fromarray(np.dstack([pixels, alpha])), "PNG"),
        "grey": _encoded(Image.fromarray(pixels[..., 0]), "PNG"),
        "grey-alpha": _encoded(Image.fromarray(pixels[..., 0]).convert("LA"), "PNG"),
        "palette": _encoded(palette, "PNG"),
        "palette-transparency": _encoded(with_transparency, "PNG"),
        "1-bit": _encoded(Image.fromarray(pixels[..., 0] > 128), "PNG"),
        "16-bit-grey": _encoded(Image.fromarray(wide[..., 0]), "PNG"),
        "16-bit-rgb": cv2.imencode(".png", wide)[1].tobytes(),
    }


@pytest.mark.parametrize("data", [*_jpegs().values(), *_pngs().values()], ids=[*_jpegs(), *_pngs()])
def test_jpeg_and_png_decode_as_tensorflow_without_it(data, monkeypatch):
    """Bit for bit ``tf.io.decode_image``'s pixels, and not by falling back to it."""
    expected = images.decode_image_tensor(data).numpy()

    def no_tensorflow(data):
        raise AssertionError("decoded by TensorFlow")

    monkeypatch.setattr(images, "_decode_with_tensorflow", no_tensorflow)
    decoded = images.decode_image(data)
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected)


def test_jpegs_libjpeg_doubts_are_tensorflows_to_decide():
    """CMYK, a truncated file and stray bytes: TensorFlow's pixels or its error, as training
    gets them."""
    jpeg = _jpegs()["q100-420"]
    cmyk = _encoded(Image.fromarray(_photo_like()).convert("CMYK"), "JPEG")
    at = jpeg.index(b"\xff\xdb")  # a quantisation table's marker
    stray = jpeg[:at] + b"\x00\x00" + jpeg[at:]
    for data in (cmyk, stray):
        np.testing.assert_array_equal(
            images.decode_image(data), images.decode_image_tensor(data).numpy()
        )
    with pytest.raises(ValueError, match="Invalid JPEG data"):
        images.decode_image(jpeg[: len(jpeg) // 2])


def _other_formats() -> dict[str, tuple[bytes, np.ndarray | None]]:
    """Encoded images and the pixels they hold: the source's where the format keeps them
    (alpha dropped), None where the format changed them (palette, grey, lossy): Pillow's."""
    pixels = _photo_like()
    rng = np.random.default_rng(2)
    rgba = Image.fromarray(np.dstack([pixels, rng.integers(0, 256, pixels.shape[:2], np.uint8)]))
    rgb = Image.fromarray(pixels)
    second_frame = Image.fromarray(255 - pixels)
    wide = rng.integers(0, 1 << 16, pixels.shape[:2], dtype=np.uint16)
    high_byte = np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    return {
        "bmp-rgb": (_encoded(rgb, "BMP"), pixels),
        "bmp-rgba": (_encoded(rgba, "BMP"), pixels),
        "bmp-palette": (_encoded(rgb.convert("P"), "BMP"), None),
        "bmp-grey": (_encoded(rgb.convert("L"), "BMP"), None),
        "bmp-1-bit": (_encoded(rgb.convert("1"), "BMP"), None),
        "gif": (_encoded(rgb, "GIF"), None),
        "gif-animated": (_encoded(rgb, "GIF", save_all=True, append_images=[second_frame]), None),
        "webp-lossy": (_encoded(rgb, "WEBP", quality=80), None),
        "webp-lossless": (_encoded(rgb, "WEBP", lossless=True), pixels),
        "webp-lossy-alpha": (_encoded(rgba, "WEBP", quality=80), None),
        "webp-lossless-alpha": (_encoded(rgba, "WEBP", lossless=True, exact=True), pixels),
        "tiff-rgb": (_encoded(rgb, "TIFF"), pixels),
        "tiff-rgba-deflate": (_encoded(rgba, "TIFF", compression="tiff_adobe_deflate"), pixels),
        "tiff-grey-lzw": (
            _encoded(rgb.convert("L"), "TIFF", compression="tiff_lzw"),
            np.repeat(np.asarray(rgb.convert("L"))[..., None], 3, axis=-1),
        ),
        "tiff-16-bit-grey": (_encoded(Image.fromarray(wide), "TIFF"), high_byte),
        "tiff-two-pages": (
            _encoded(rgb, "TIFF", save_all=True, append_images=[second_frame]),
            pixels,
        ),
    }


@pytest.mark.parametrize("name", list(_other_formats()))
def test_other_formats_decode_without_tensorflow(name, monkeypatch):
    """The pixels the file holds (a palette applied, alpha dropped, the first frame; Pillow's
    reading where the format changed them), where TensorFlow returns a BMP's palette indices as
    grey and rejects 1-bit BMPs, WebP with alpha and TIFF."""
    data, expected = _other_formats()[name]
    if expected is None:
        with Image.open(io.BytesIO(data)) as image:
            expected = np.asarray(image.convert("RGB"))

    def no_tensorflow(data):
        raise AssertionError("decoded by TensorFlow")

    monkeypatch.setattr(images, "_decode_with_tensorflow", no_tensorflow)
    np.testing.assert_array_equal(images.decode_image(data), expected)


@pytest.mark.parametrize(
    "name", ["bmp-palette", "webp-lossy-alpha", "tiff-rgb", "gif-animated", "heic", "avif"]
)
def test_preparation_stores_what_the_pipeline_decodes_as_prediction_does(tmp_path, name):
    """A whole image (no face box) in a format TensorFlow decodes differently or not at all is
    stored as PNG, so the input pipeline trains on the pixels prediction sees."""
    path = tmp_path / f"face.{name.split('-')[0]}"
    if name in ("heic", "avif"):
        path.write_bytes(_encoded(Image.fromarray(_photo_like()), PIL_FORMATS[path.suffix]))
    else:
        path.write_bytes(_other_formats()[name][0])
    candidate = Candidate("k", "face", str(path), 1, 0.0, 0.0, np.full((68, 2), np.nan, np.float32))
    stored = faces.load_face(candidate, margin=0.0)["image"]
    np.testing.assert_array_equal(
        images.decode_image_tensor(stored).numpy(), images.read_image(str(path))
    )


def _with_orientation(pixels: np.ndarray, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    options = {"lossless": True} if fmt == "WEBP" else {}
    return _encoded(Image.fromarray(pixels), fmt, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "JPEG", "AVIF"])
def test_turn_upright_follows_exif_orientation_as_pillow(fmt):
    """Every EXIF orientation turns the image as Pillow's ``exif_transpose`` does (JPEG: up to
    the two libraries' DCT round-off; AVIF: Pillow writes it as the rotation and mirror boxes);
    without ``turn_upright`` the stored pixels (TIFF: Pillow's reader has turned them already)."""
    pixels = _photo_like()
    for orientation in range(1, 9):
        data = _with_orientation(pixels, fmt, orientation)
        with Image.open(io.BytesIO(data)) as image:
            expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        turned = images.decode_image(data, turn_upright=True)
        assert turned.shape == expected.shape, orientation
        np.testing.assert_allclose(turned, expected, atol=8 if fmt == "JPEG" else 0)
        stored = images.decode_image(data)
        assert stored.shape == (pixels.shape if fmt != "TIFF" else expected.shape), orientation


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, on the cut-off header
def test_a_broken_tiff_is_one_line_naming_the_format():
    data = _other_formats()["tiff-rgb"][0]
    for broken, reason in ((data[: len(data) // 3], "truncated"), (data[:20], "header")):
        with pytest.raises(ValueError, match=rf"^unreadable TIFF: .*{reason}") as raised:
            images.decode_image(broken)
        assert "\n" not in str(raised.value) and "<" not in str(raised.value)


def test_a_file_without_readable_exif_is_upright():
    assert images.exif_orientation(_pngs()["rgb"]) == 1
    assert images.exif_orientation(_with_orientation(_photo_like(), "PNG", 9)) == 1
    assert images.exif_orientation(b"not an image") == 1


@pytest.mark.parametrize("coordinates", ["none", "box", "landmarks"])
def test_preparation_turns_whole_images_upright_unless_labels_give_coordinates(
    tmp_path, coordinates
):
    """A sideways phone photo (EXIF orientation 6) in a class folder trains upright, as predict
    reads it; a label file's box or landmarks refer to the stored pixels, so it stays as is."""
    pixels = _photo_like()
    path = tmp_path / "face.jpg"
    path.write_bytes(_with_orientation(pixels, "JPEG", 6))
    landmarks = np.full((68, 2), np.nan, np.float32)
    box = None
    if coordinates == "landmarks":
        landmarks[:] = 5.0
    elif coordinates == "box":
        box = (0.0, 0.0, float(pixels.shape[1]), float(pixels.shape[0]))
    candidate = Candidate("k", "face", str(path), 1, 0.0, 0.0, landmarks, box)
    stored = images.decode_image_tensor(faces.load_face(candidate, margin=0.0)["image"]).numpy()
    if coordinates == "none":
        np.testing.assert_array_equal(stored, images.read_image(str(path), turn_upright=True))
        assert stored.shape[:2] == pixels.shape[1::-1]
    else:
        assert stored.shape == pixels.shape


@pytest.mark.parametrize("brand", ["avif", "mif1"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_avif_decodes_without_tensorflow(mode, brand, monkeypatch):
    """AV1-coded: Pillow's pixels of the file, within the codec's loss of the source, alpha
    dropped, turned upright by its rotation box, also when the file's major brand is the
    generic 'mif1' HEIF uses too (AVIF then only among the compatible brands, and pi-heif
    claims the file); a broken file is one line."""
    pixels = _photo_like()
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.full(pixels.shape[:2], 7, np.uint8)))
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6  # on its side: written as the rotation box
    avif = _encoded(image, "AVIF", quality=90, exif=exif.tobytes())
    assert avif[4:12] == b"ftypavif" and b"mif1" in avif[16:32]
    avif = avif[:8] + brand.encode() + avif[12:]
    with Image.open(io.BytesIO(avif), formats=["AVIF"]) as reference:
        stored = np.asarray(reference.convert("RGB"))
        expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))

    def no_tensorflow(data):
        raise AssertionError("decoded by TensorFlow")

    monkeypatch.setattr(images, "_decode_with_tensorflow", no_tensorflow)
    images.register_heif()
    np.testing.assert_array_equal(images.decode_image(avif), stored)
    assert np.abs(stored.astype(int) - pixels).mean() < 8
    np.testing.assert_array_equal(images.decode_image(avif, turn_upright=True), expected)
    assert expected.shape == pixels.shape[1::-1] + (3,)
    with pytest.raises(ValueError, match=r"^unreadable AVIF: ") as raised:
        images.decode_image(avif[: len(avif) // 2])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_heic_decodes_without_tensorflow(mode, monkeypatch):
    """An iPhone's format: HEVC-coded, so within the codec's loss of the source (a photo at
    quality 95: mean error about 1 level of 255), alpha dropped; a broken file is one line."""
    from skimage import data

    pixels = data.astronaut()[100:197, 150:263]
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.full(pixels.shape[:2], 7, np.uint8)))
    heic = _encoded(image, "HEIF", quality=95)
    assert heic[4:12] == b"ftypheic"

    def no_tensorflow(data):
        raise AssertionError("decoded by TensorFlow")

    monkeypatch.setattr(images, "_decode_with_tensorflow", no_tensorflow)
    decoded = images.decode_image(heic, turn_upright=True)
    assert decoded.shape == pixels.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - pixels).mean() < 3
    with pytest.raises(ValueError, match=r"^unreadable HEIF: ") as raised:
        images.decode_image(heic[: len(heic) // 2])
    assert "\n" not in str(raised.value)
