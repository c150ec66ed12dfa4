"""The NumPy MTCNN (affect_jax.predict.mtcnn_numpy) against the mtcnn package it ports: TensorFlow's
two resize ops, the three nets, and whole detections. That prediction imports neither
TensorFlow nor the package is tests/test_predict.py's."""

import importlib.util

import cv2
import numpy as np
import pytest

from affect_jax.predict import mtcnn_numpy
from tests import face_images


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


@pytest.fixture(scope="module")
def package(tf):
    from mtcnn import MTCNN

    return MTCNN(device="CPU:0")


@pytest.fixture(scope="module")
def ours():
    return mtcnn_numpy.Mtcnn()


@pytest.mark.parametrize(
    "shape, size",
    [
        ((37, 51), (22, 30)),  # About the pyramid's first scale, 0.6, non-integer ratios.
        ((512, 512), (307, 307)),
        ((100, 80), (13, 11)),  # Many input pixels per output pixel.
        ((20, 30), (35, 47)),  # Upscaling (a first scale > 1, min_face_size < 12).
        ((50, 60), (49, 61)),  # Down one way, up the other.
        ((17, 23), (17, 23)),  # Same size: the identity.
    ],
)
def test_area_resize_is_tensorflows(tf, shape, size):
    image = np.random.default_rng(0).uniform(-1, 1, (*shape, 3)).astype(np.float32)
    expected = tf.image.resize(image[None], size, method="area")[0].numpy()
    got = mtcnn_numpy.resize_area(image, *size)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4


def test_crop_and_resize_is_tensorflows(tf):
    from mtcnn.utils.images import extract_patches

    image = np.random.default_rng(1).uniform(-1, 1, (40, 57, 3)).astype(np.float32)
    boxes = np.array(
        [
            [0.1, 0.2, 0.7, 0.9],  # Inside.
            [0.0, 0.0, 1.0, 1.0],  # The whole image.
            [-0.3, 0.5, 0.4, 1.4],  # Partly outside: those samples are 0.
            [-2.0, -2.0, -1.0, -1.0],  # Wholly outside.
            [0.8, 0.9, 0.2, 0.1],  # Flipped: sampled backwards.
            [0.33, 0.41, 0.33, 0.6],  # Zero height.
        ],
        np.float32,
    )
    for size in (24, 48):
        expected = tf.image.crop_and_resize(
            image[None], boxes, np.zeros(len(boxes), np.int32), (size, size)
        ).numpy()
        got = mtcnn_numpy.crop_and_resize(image, boxes, (size, size))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5
    # And the package's patches (its boxes in pixels, divided by H and W) are ours.
    pixel_boxes = np.array(
        [[0, -5.5, 3.2, 30.1, 35.7, 0.9], [0, 20.0, 10.0, 60.0, 50.0, 0.8]], np.float64
    )
    expected = extract_patches(image[None].astype(np.float64), pixel_boxes, (24, 24)).numpy()
    got = mtcnn_numpy.extract_patches(image, pixel_boxes, 24)
    assert np.abs(got - expected).max() <= 1e-5


def test_nets_give_the_keras_models_outputs(package, ours):
    pnet, rnet, onet = (stage.model for stage in package.stages)
    rng = np.random.default_rng(2)

    def normalised(*shape):
        return mtcnn_numpy.normalize_image(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))

    # An odd-sized input: PNet's 'same' pooling pads one column and one row.
    x = normalised(1, 37, 51)
    for got, expected in zip(mtcnn_numpy.pnet(ours._pnet, x), pnet(x), strict=True):
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    x = normalised(5, 24, 24)
    for got, expected in zip(mtcnn_numpy.rnet(ours._rnet, x), rnet(x), strict=True):
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    x = normalised(5, 48, 48)
    for got, expected in zip(mtcnn_numpy.onet(ours._onet, x), onet(x), strict=True):
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


IMAGES = {
    "astronaut": face_images.astronaut,
    "two_astronauts": face_images.two_astronauts,
    "rotated_20": lambda: face_images.rotated_astronaut(20),
    # A second, 0.95-confident "face" at the bottom right, which threshold_onet=0.99 drops.
    "rotated_45": lambda: face_images.rotated_astronaut(45),
    "small_head": face_images.small_face,
    # The face cut by the top and left edges: its box is clipped to the image.
    "cut_face": lambda: face_images.astronaut()[80:320, 200:440],
    "downscaled": lambda: cv2.resize(
        face_images.astronaut(), (200, 200), interpolation=cv2.INTER_AREA
    ),
    "noise": lambda: np.random.default_rng(3).integers(0, 256, (160, 200, 3), dtype=np.uint8),
}


ALL = tuple(IMAGES)


@pytest.mark.parametrize(
    "options, names",
    [
        pytest.param({}, ALL, id="defaults"),
        pytest.param({"threshold_onet": 0.99}, ALL, id="threshold_onet=0.99"),
        # The pyramid's last level is then under PNet's 11 pixels for every image: the package
        # finds nothing at all.
        pytest.param({"min_face_size": 40}, ALL, id="min_face_size=40"),
        # Every ONet candidate, down to ~0.05: more rows, low-confidence ones too.
        pytest.param(
            {"threshold_onet": 0.0},
            ("astronaut", "rotated_20", "rotated_45"),
            id="threshold_onet=0",
        ),
        # On the edge: a last level too small for the small head only.
        pytest.param(
            {"min_face_size": 25}, ("small_head", "downscaled", "astronaut"), id="min_face_size=25"
        ),
    ],
)
def test_detections_are_the_packages(package, ours, options, names):
    for name in names:
        image = IMAGES[name]()
        expected = package.detect_faces(image, output_type="numpy", **options)
        # Empty results may come as [0, 6] from the package (its NMS's empty shape).
        expected = np.asarray(expected, np.float64).reshape(-1, 16)
        got = ours.detect_faces(image, **options)
        assert got.shape == expected.shape, name
        assert (got[:, 0] == 0).all(), name
        np.testing.assert_allclose(got[:, 1:5], expected[:, 1:5], rtol=0, atol=0.05, err_msg=name)
        np.testing.assert_allclose(got[:, 6:], expected[:, 6:], rtol=0, atol=0.05, err_msg=name)
        np.testing.assert_allclose(got[:, 5], expected[:, 5], rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("missing", ["mtcnn", "lz4"])
def test_a_missing_package_says_how_to_install_it(monkeypatch, missing):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == missing else find_spec(name, *args),
    )
    with pytest.raises(RuntimeError) as error:
        mtcnn_numpy.Mtcnn()
    assert str(error.value) == (
        "the MTCNN face detector needs the mtcnn package: pip install -c constraints.txt "
        "mtcnn lz4 (or use --detector=lbp)"
    )
