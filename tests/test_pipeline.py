"""Input pipeline: split, determinism, exact evaluation, preprocessing (against Keras)."""

import numpy as np
import pytest
import tensorflow as tf

from affect_jax.data import pipeline
from affect_jax.data.source import ExamplePool, decode_raw_image


def _pool(n=50, classes=5, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return ExamplePool(
        {
            "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "expression": (np.arange(n) % classes).astype(np.int32),
            "valence": rng.uniform(-1, 1, n).astype(np.float32),
            "arousal": rng.uniform(-1, 1, n).astype(np.float32),
            "id": np.arange(n),
        },
        decode_raw_image,
    )


def test_stratified_split_is_disjoint_complete_stratified_and_seeded():
    labels = np.repeat(np.arange(8), [50, 40, 30, 20, 20, 20, 20, 10])
    train, val = pipeline.stratified_split(labels, 0.2, seed=3)
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(len(labels)))
    assert len(val) == round(0.2 * len(labels))
    np.testing.assert_allclose(np.bincount(labels[val]), 0.2 * np.bincount(labels), atol=1)
    again, _ = pipeline.stratified_split(labels, 0.2, seed=3)
    other, _ = pipeline.stratified_split(labels, 0.2, seed=4)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_split_errors_are_clear():
    with pytest.raises(pipeline.DataConfigError, match="fewer than 2"):
        pipeline.stratified_split(np.array([0, 0, 0, 1]), 0.5, 0)
    with pytest.raises(
        pipeline.DataConfigError,
        match="7 validation / 25 training examples, fewer than the 8 classes",
    ):
        pipeline.stratified_split(np.arange(32) % 8, 0.2, 0)


def test_train_batches_deterministic_per_epoch_and_resumable(tiny):
    pool = _pool()
    tiny.data.image_size = 8

    def ids(epoch, start=0):
        ds = pipeline.train_batches(pool, tiny, epoch, 8, start_step=start)
        return [b["image"] for b in ds.as_numpy_iterator()]

    first, again = ids(0), ids(0)
    assert len(first) == 50 // 8
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.stack(first), np.stack(ids(1)))
    # Starting mid-epoch gives exactly the remaining batches of the same order.
    for a, b in zip(first[2:], ids(0, start=2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_example_shapes_are_the_batches_fields(tiny):
    """What the first train call is compiled for before any batch is read."""
    tiny.data.image_size = 8
    want = {k: ((8, *shape), dtype) for k, (shape, dtype) in pipeline.example_shapes(tiny).items()}
    spec = pipeline.train_batches(_pool(), tiny, 0, 8).element_spec
    assert {k: (tuple(v.shape), v.dtype.as_numpy_dtype) for k, v in spec.items()} == want
    batch = next(pipeline.eval_batches(_pool(), tiny, 8))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want


def test_eval_batches_score_every_example_exactly_once(tiny):
    pool = _pool(n=37)
    tiny.data.image_size = 8
    batches = list(pipeline.eval_batches(pool, tiny, 16))
    assert [b["image"].shape[0] for b in batches] == [16, 16, 16]
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 37 and mask[:37].all() and not mask[37:].any()
    labels = np.concatenate([b["expression"] for b in batches])[:37]
    np.testing.assert_array_equal(labels, pool.columns["expression"])
    va = np.concatenate([b["valence_arousal"] for b in batches])[:37]
    np.testing.assert_allclose(va[:, 0], pool.columns["valence"])


def test_missing_valence_arousal_is_masked(tiny):
    pool = _pool(n=10)
    cols = dict(pool.columns)
    cols["valence"] = np.full(10, np.nan, np.float32)
    tiny.data.image_size = 8
    (batch,) = pipeline.eval_batches(ExamplePool(cols, decode_raw_image), tiny, 10)
    assert not batch["has_va"].any()
    assert np.isfinite(batch["valence_arousal"]).all()


def test_caffe_preprocessing_matches_keras():
    from keras.applications import imagenet_utils

    rgb = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    expected = imagenet_utils.preprocess_input(rgb.copy(), mode="caffe")
    got = pipeline.preprocess(tf.constant(rgb), "caffe").numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_preprocessing_mode_follows_init(tiny):
    assert pipeline.preprocessing_mode(tiny) == "unit"
    tiny.model.init = "imagenet"
    assert pipeline.preprocessing_mode(tiny) == "caffe"
    tiny.data.preprocessing = "unit"
    assert pipeline.preprocessing_mode(tiny) == "unit"
