"""Training-time augmentation, stateless: the same seed always gives the same image.

The trainer relies on this for exact resume (each example's seed is a pure function of the run
seed, the epoch and its position). Only ``tf.image.stateless_*`` / ``tf.random.stateless_*`` ops
are used, with sub-seeds split off the example's seed. Works eagerly and inside ``tf.data.map``.
"""

from __future__ import annotations

import math

import ml_collections
import tensorflow as tf


def augment_image(image: tf.Tensor, seed: tf.Tensor, cfg: ml_collections.ConfigDict) -> tf.Tensor:
    """Randomly flips, crops+rotates and colour-jitters ``image``.

    Args:
      image: float32 ``[S, S, 3]`` in [0, 255], already at the model's size.
      seed: int32/int64 ``[2]``, the example's stateless seed.
      cfg: ``config.augment``: ``flip`` (bool), ``crop_scale`` ((min, max) area fraction of a
        square crop resized back to S), ``rotation_degrees`` (max absolute angle),
        ``color_jitter`` (brightness/contrast/saturation strength).

    Returns:
      float32 ``[S, S, 3]`` clipped to [0, 255].
    """
    image = tf.convert_to_tensor(image, tf.float32)
    # One sub-seed per random draw: flip, crop area, crop offset, angle, and three colour ones.
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=7)
    if cfg.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    lo, hi = _crop_range(cfg.crop_scale)
    max_angle = math.radians(float(cfg.rotation_degrees))
    if lo < 1.0 or max_angle > 0:
        image = _crop_and_rotate(image, lo, hi, max_angle, seeds[1], seeds[2], seeds[3])
    strength = float(cfg.color_jitter)
    if strength > 0:
        image = _color_jitter(image, strength, seeds[4], seeds[5], seeds[6])
    return tf.clip_by_value(image, 0.0, 255.0)


def _crop_range(crop_scale) -> tuple[float, float]:
    if crop_scale is None:
        return 1.0, 1.0
    lo, hi = (float(v) for v in crop_scale)
    return lo, hi


def _crop_and_rotate(
    image: tf.Tensor,
    lo: float,
    hi: float,
    max_angle: float,
    area_seed: tf.Tensor,
    offset_seed: tf.Tensor,
    angle_seed: tf.Tensor,
) -> tf.Tensor:
    """A random square crop of area fraction in [lo, hi], rotated about its centre and resized
    back to the full size: one projective transform, so pixels are interpolated once."""
    shape = tf.shape(image)
    height = tf.cast(shape[0], tf.float32)
    width = tf.cast(shape[1], tf.float32)
    area = tf.random.stateless_uniform([], area_seed, lo, hi)
    scale = tf.sqrt(area)  # Crop side / image side, the same for both axes (no distortion).
    offset = tf.random.stateless_uniform([2], offset_seed, 0.0, 1.0) * (1.0 - scale)
    angle = tf.random.stateless_uniform([], angle_seed, -max_angle, max_angle)
    # Output pixel p (centre-relative) samples input c_in + scale * R(angle) p, in pixel-index
    # coordinates (pixel centres at integers, as resize with half-pixel centres maps them).
    cx_out, cy_out = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    cx_in = offset[0] * width + scale * width / 2.0 - 0.5
    cy_in = offset[1] * height + scale * height / 2.0 - 0.5
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    a0, a1, b0, b1 = cos, -sin, sin, cos
    transform = tf.stack(
        [
            a0,
            a1,
            cx_in - a0 * cx_out - a1 * cy_out,
            b0,
            b1,
            cy_in - b0 * cx_out - b1 * cy_out,
            0.0,
            0.0,
        ]
    )
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=shape[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        # Rotated corners repeat the edge pixels rather than show black wedges; 'NEAREST' is
        # faster than 'REFLECT' in this kernel, which dominates augmentation time.
        fill_mode="NEAREST",
    )
    return tf.ensure_shape(out[0], image.shape)


def _color_jitter(
    image: tf.Tensor,
    strength: float,
    brightness_seed: tf.Tensor,
    contrast_seed: tf.Tensor,
    saturation_seed: tf.Tensor,
) -> tf.Tensor:
    """Brightness +-strength (of full scale), contrast and saturation factors 1 +- strength."""
    lower = max(0.0, 1.0 - strength)
    image = tf.image.stateless_random_brightness(image, strength * 255.0, brightness_seed)
    image = tf.image.stateless_random_contrast(image, lower, 1.0 + strength, contrast_seed)
    image = tf.clip_by_value(image, 0.0, 255.0)
    # Saturation as a blend with the grey image (torchvision's ColorJitter): the HSV round trip
    # of tf.image's saturation op costs ~4x more and changes the same thing.
    factor = tf.random.stateless_uniform([], saturation_seed, lower, 1.0 + strength)
    grey = tf.image.rgb_to_grayscale(image)
    return grey + factor * (image - grey)
