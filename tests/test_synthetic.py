"""Tests of the synthetic face source."""

import dataclasses

import cv2
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from affect_jax.data import pipeline, synthetic
from affect_jax.data.source import AFFECTNET_CLASS_NAMES, ExamplePool, Source, decode_raw_image
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def faces():
    return synthetic.draw_faces(160, 48, 8, seed=3)


def test_shapes_dtypes_ranges(faces):
    assert faces["image"].shape == (160, 48, 48, 3) and faces["image"].dtype == np.uint8
    for key in ("expression", "valence", "arousal"):
        assert faces[key].shape == (160,)
    assert faces["expression"].dtype == np.int32
    assert faces["valence"].dtype == faces["arousal"].dtype == np.float32
    for key in ("valence", "arousal"):
        assert np.all(np.abs(faces[key]) <= 1.0)
    # Images are not blank: they use a good part of the intensity range.
    assert faces["image"].std() > 20


def test_balanced_and_shuffled(faces):
    np.testing.assert_array_equal(np.bincount(faces["expression"], minlength=8), [20] * 8)
    assert not np.array_equal(faces["expression"], np.arange(160) % 8)


def test_valence_arousal_vary_within_class(faces):
    for c in range(8):
        mask = faces["expression"] == c
        centre = synthetic.CLASS_VA_CENTRES[c]
        for k, key in enumerate(("valence", "arousal")):
            values = faces[key][mask]
            assert values.std() > 0.05
            assert np.all(np.abs(values - centre[k]) <= synthetic.VA_JITTER + 1e-6)


def test_deterministic():
    a = synthetic.draw_faces(24, 32, 8, seed=5)
    b = synthetic.draw_faces(24, 32, 8, seed=5)
    c = synthetic.draw_faces(24, 32, 8, seed=6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["valence"], c["valence"])


def test_seven_classes_drop_contempt():
    faces = synthetic.draw_faces(70, 32, 7, seed=0)
    np.testing.assert_array_equal(np.bincount(faces["expression"]), [10] * 7)


@pytest.mark.parametrize("size", [16, 32, 224])
def test_sizes(size):
    assert synthetic.draw_faces(8, size, 8, seed=0)["image"].shape == (8, size, size, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=6), "num_classes"),
        (dict(num_classes=9), "num_classes"),
        (dict(image_size=15), "image_size"),
        (dict(image_size=32.5), "image_size"),
        (dict(num_examples=0), "num_examples"),
    ],
)
def test_argument_errors(kwargs, match):
    args = dict(num_examples=8, image_size=32, num_classes=8, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        synthetic.draw_faces(**args)


def _clean_params(expression: int) -> synthetic.FaceParams:
    p = synthetic.sample_params(1, 8, seed=0)[0]
    v, a = synthetic.CLASS_VA_CENTRES[expression]
    return dataclasses.replace(
        p,
        expression=expression,
        valence=float(v),
        arousal=float(a),
        centre=(0.5, 0.5),
        scale=0.3,
        angle=0.0,
        light_strength=0.0,
        noise_std=0.0,
    )


SIZE = 64


def _change(expression: int, field: str) -> tuple[int, np.ndarray]:
    """Same class, same pose, ``field`` (valence or arousal) -0.2 and +0.2: the summed pixel
    change and the rows that visibly change."""
    p = _clean_params(expression)
    low, high = (
        synthetic.draw_face(dataclasses.replace(p, **{field: getattr(p, field) + d}), SIZE)
        for d in (-0.2, 0.2)
    )
    diff = np.abs(low.astype(np.int32) - high.astype(np.int32)).sum(-1)
    return diff.sum(), np.nonzero(diff.sum(1) > 30)[0]


@pytest.mark.parametrize("expression", range(8))
def test_valence_changes_only_the_mouth(expression):
    total, rows = _change(expression, "valence")
    assert total > 500
    # The mouth sits 0.58 face half-widths (0.3 * size) below the centre.
    mouth_row = int(SIZE * (0.5 + 0.3 * 0.58))
    assert rows.min() >= mouth_row - 8 and rows.max() <= mouth_row + 8


@pytest.mark.parametrize("expression", range(8))
def test_arousal_changes_eyes_and_brows(expression):
    total, rows = _change(expression, "arousal")
    assert total > 500
    # Eyes and brows are above the nose, 0.2 face half-widths below the centre.
    assert rows.max() < SIZE * (0.5 + 0.3 * 0.2)


def test_load_source():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(
        dict(synthetic_size=50, image_size=32, num_classes=7, split_seed=1)
    )
    source = synthetic.load_source(config)
    assert isinstance(source, Source)
    assert source.name == "synthetic" and source.has_valence_arousal
    assert source.class_names == AFFECTNET_CLASS_NAMES[:7]
    assert len(source.pools["train"]) == 50 and len(source.pools["test"]) == 10
    assert source.counts == {"kept": 50}
    train = synthetic.pool_images(source.pools["train"])
    test = synthetic.pool_images(source.pools["test"])
    assert train.shape == (50, 32, 32, 3)
    assert source.pools["train"].labels.max() == 6
    assert not np.array_equal(train[:10], test)
    # The data depends on data.split_seed, not on the model seed.
    config.seed = 1
    np.testing.assert_array_equal(
        synthetic.pool_images(synthetic.load_source(config).pools["train"]), train
    )
    config.data.split_seed = 2
    assert not np.array_equal(
        synthetic.pool_images(synthetic.load_source(config).pools["train"]), train
    )


def test_source_draws_only_the_faces_read_and_the_same_faces(monkeypatch):
    """Faces are drawn once, when the pipeline first reads them, identical to ``draw_faces``'s."""
    reference = synthetic.draw_faces(40, 32, 8, seed=4)
    drawn = []
    draw_face = synthetic.draw_face
    monkeypatch.setattr(synthetic, "draw_face", lambda p, s: drawn.append(p) or draw_face(p, s))
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(
        dict(synthetic_size=40, image_size=32, num_classes=8, split_seed=4)
    )
    source = synthetic.load_source(config)
    pool = source.pools["train"]
    assert pool.decode.num_drawn == 0  # nothing drawn before the data are read
    for key in ("expression", "valence", "arousal"):
        np.testing.assert_array_equal(pool.columns[key], reference[key])
    # Through the tf.data decode, out of order: only the faces read are drawn.
    for face in (7, 3, 7):
        row = {k: tf.constant(v[face]) for k, v in pool.columns.items()}
        np.testing.assert_array_equal(pool.decode(row).numpy(), reference["image"][face])
    assert pool.decode.num_drawn == len(drawn) == 2
    np.testing.assert_array_equal(synthetic.pool_images(pool), reference["image"])
    test_faces = synthetic.draw_faces(8, 32, 8, synthetic._derived_seed(4, synthetic._TEST_POOL))
    np.testing.assert_array_equal(synthetic.pool_images(source.pools["test"]), test_faces["image"])


def test_lazy_faces_give_the_eager_pipeline_batches():
    """The training pipeline's batches over a lazy pool are those over the drawn images."""
    config = tiny_config(**{"data.synthetic_size": 24})
    pool = synthetic.lazy_pool(24, config.data.image_size, 8, seed=9)
    eager = ExamplePool(
        synthetic.draw_faces(24, config.data.image_size, 8, seed=9), decode_raw_image
    )
    lazy_batches = list(pipeline.train_batches(pool, config, 1, 8).as_numpy_iterator())
    eager_batches = list(pipeline.train_batches(eager, config, 1, 8).as_numpy_iterator())
    assert len(lazy_batches) == len(eager_batches) == 3
    for a, b in zip(lazy_batches, eager_batches, strict=True):
        for key in b:
            np.testing.assert_array_equal(a[key], b[key])


def test_linear_baseline_beats_chance():
    """Gradient-orientation features + linear models learn class and valence/arousal."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    size, cells = 48, 8
    train = synthetic.draw_faces(640, size, 8, seed=10)
    val = synthetic.draw_faces(240, size, 8, seed=11)

    def features(images: np.ndarray) -> np.ndarray:
        # Cheap HOG: gradient magnitude binned by orientation (8 bins) over an 8x8 grid of cells.
        cell = np.arange(size) * cells // size
        cell_index = (cell[:, None] * cells + cell[None, :]) * 8
        out = []
        for im in images:
            g = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY).astype(np.float32)
            gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
            mag, ang = cv2.cartToPolar(gx, gy)
            bins = (ang % np.pi / np.pi * 8).astype(int) % 8
            hist = np.bincount((cell_index + bins).ravel(), mag.ravel(), cells * cells * 8)
            out.append(np.sqrt(hist))
        return np.stack(out)

    x_train, x_val = features(train["image"]), features(val["image"])
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    clf = LogisticRegression(C=0.01, max_iter=500).fit(x_train, train["expression"])
    accuracy = (clf.predict(x_val) == val["expression"]).mean()
    assert accuracy > 0.4, accuracy  # Chance is 0.125.
    for key in ("valence", "arousal"):
        pred = Ridge(alpha=300.0).fit(x_train, train[key]).predict(x_val)
        corr = np.corrcoef(pred, val[key])[0, 1]
        assert corr > 0.5, (key, corr)
