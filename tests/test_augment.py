"""Stateless augmentation: determinism per seed, variety across seeds, geometry, graph mode."""

import ml_collections
import numpy as np
import tensorflow as tf

from affect_jax.data.augment import augment_image

SIZE = 48


def _cfg(flip=True, crop_scale=(0.8, 1.0), rotation_degrees=10.0, color_jitter=0.2):
    return ml_collections.ConfigDict(
        dict(
            flip=flip,
            crop_scale=crop_scale,
            rotation_degrees=rotation_degrees,
            color_jitter=color_jitter,
        )
    )


OFF = dict(flip=False, crop_scale=(1.0, 1.0), rotation_degrees=0.0, color_jitter=0.0)


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32))


def _seed(a, b=0, dtype=tf.int64):
    return tf.constant([a, b], dtype)


def test_same_seed_same_output_and_seeds_differ():
    image, cfg = _image(), _cfg()
    a = augment_image(image, _seed(1, 2), cfg)
    np.testing.assert_array_equal(a, augment_image(image, _seed(1, 2), cfg))
    np.testing.assert_array_equal(a, augment_image(image, _seed(1, 2, tf.int32), cfg))
    outputs = [augment_image(image, _seed(1, k), cfg).numpy() for k in range(6)]
    for i in range(len(outputs)):
        for j in range(i):
            assert np.abs(outputs[i] - outputs[j]).mean() > 1.0


def test_shape_dtype_and_range():
    image = _image() * 1.5 - 60  # Out of range on purpose: the output is clipped anyway.
    out = augment_image(image, _seed(3), _cfg(color_jitter=0.9))
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0


def test_everything_off_is_identity():
    image = _image()
    np.testing.assert_array_equal(augment_image(image, _seed(5), _cfg(**OFF)), image)


def test_flip_is_an_exact_mirror_about_half_the_time():
    image, cfg = _image(), _cfg(**{**OFF, "flip": True})
    flipped = 0
    for k in range(40):
        out = augment_image(image, _seed(7, k), cfg).numpy()
        if np.array_equal(out, image.numpy()[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, image)
    assert 8 <= flipped <= 32


def test_crop_zooms_in_without_distortion():
    # A horizontal ramp: a square crop of area a, resized back, is a ramp with slope 1/sqrt(a)
    # (bilinear interpolation of a linear function is exact) and stays constant along y.
    ramp = np.tile(np.arange(SIZE, dtype=np.float32)[None, :, None] * 4.0, (SIZE, 1, 3))
    cfg = _cfg(**{**OFF, "crop_scale": (0.25, 0.25)})
    for k in range(4):
        out = augment_image(tf.constant(ramp), _seed(11, k), cfg).numpy()
        np.testing.assert_allclose(np.diff(out[..., 0], axis=1), 2.0, atol=1e-3)
        np.testing.assert_allclose(out[..., 0], out[:1, :, 0].repeat(SIZE, 0), atol=1e-3)
        assert 0.0 <= out.min() and out.max() <= 4.0 * (SIZE - 1)


def test_rotation_turns_about_the_centre_within_the_limit():
    # A vertical bar through the centre: rotated by t, its pixels move off the column by
    # up to (SIZE/2)*tan(t); the centre pixel stays.
    bar = np.zeros((SIZE + 1, SIZE + 1, 3), np.float32)
    bar[:, SIZE // 2] = 255.0
    cfg = _cfg(**{**OFF, "rotation_degrees": 20.0})
    moved = []
    for k in range(6):
        out = augment_image(tf.constant(bar), _seed(13, k), cfg).numpy()[..., 0]
        assert out[SIZE // 2, SIZE // 2] > 200.0
        top_column = int(np.argmax(out[0]))
        moved.append(abs(top_column - SIZE // 2))
    assert max(moved) > 0  # Some rotation happened ...
    assert max(moved) <= np.ceil(SIZE / 2 * np.tan(np.radians(20.0))) + 1  # ... within 20 deg.


def test_color_jitter_keeps_geometry():
    # Colour ops are per-pixel maps (contrast uses the image mean): a mirror-symmetric image
    # stays mirror-symmetric, while its colours change.
    half = _image().numpy()[:, : SIZE // 2]
    image = tf.constant(np.concatenate([half, half[:, ::-1]], axis=1))
    out = augment_image(image, _seed(17), _cfg(**{**OFF, "color_jitter": 0.3})).numpy()
    assert np.abs(out - image.numpy()).mean() > 1.0
    np.testing.assert_allclose(out, out[:, ::-1], atol=1e-3)


def test_graph_mode_in_tf_data_matches_eager():
    images = tf.stack([_image(i) for i in range(3)])
    seeds = tf.constant([[0, 1], [0, 2], [5, 9]], tf.int64)
    cfg = _cfg()
    ds = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
        lambda x, s: augment_image(x, s, cfg), num_parallel_calls=2
    )
    for i, out in enumerate(ds.as_numpy_iterator()):
        np.testing.assert_allclose(out, augment_image(images[i], seeds[i], cfg), atol=1e-4)
    assert tf.function(lambda x, s: augment_image(x, s, cfg))(images[0], seeds[0]).shape == (
        SIZE,
        SIZE,
        3,
    )
