"""A face crop as the network takes it (affect_jax.predict.network_input), against the
evaluation pipeline's TensorFlow resize and preprocessing."""

import numpy as np
import pytest
import tensorflow as tf

from affect_jax.data import pipeline
from affect_jax.predict import network_input

# float32 sums in another order: TensorFlow's own resize is this far from a float64 one.
PIXEL_ATOL = 0.01


@pytest.mark.parametrize(
    "shape", [(500, 333), (1000, 1200), (100, 80), (37, 51), (3, 5), (224, 225), (224, 224)]
)
@pytest.mark.parametrize("mode", ["caffe", "unit"])
def test_crops_become_what_the_eval_pipeline_feeds(shape, mode):
    """Down- and upscaled, by uneven factors, or already the size; both preprocessings."""
    crop = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = pipeline.preprocess(pipeline.resize_image(tf.constant(crop), 224), mode).numpy()
    got = network_input.network_input(crop, 224, mode)
    assert got.dtype == np.float32 and got.shape == (224, 224, 3) and got.flags.c_contiguous
    scale = 1.0 if mode == "caffe" else 1 / 127.5
    np.testing.assert_allclose(got, expected, rtol=0, atol=PIXEL_ATOL * scale)
