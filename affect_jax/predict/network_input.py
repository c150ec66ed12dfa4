"""A face crop as the network takes it, without TensorFlow: the evaluation pipeline's resize
(``pipeline.resize_image``) and preprocessing (``pipeline.preprocess``) in NumPy.

TensorFlow's antialiased bilinear resize is a separable filter: each output pixel along an
axis is a normalised triangle-weighted sum of the input pixels its footprint covers, the
triangle widened by the downscaling factor. The weights along each axis form a matrix, so the
resize is two matrix products. Written by hand because no NumPy-level library has TensorFlow's
kernel (OpenCV's and Pillow's antialiasing weigh pixels differently); its outputs are tested
against ``pipeline.resize_image`` (tests/test_network_input.py).
"""

from __future__ import annotations

import numpy as np

from affect_jax.data import CAFFE_BGR_MEAN


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """float32 [out_size, in_size]: TensorFlow's antialiased triangle-filter weights (its
    ``ComputeSpans`` with translation 0), each row summing to 1."""
    inv_scale = np.float32(in_size / out_size)
    kernel_scale = max(inv_scale, np.float32(1.0))  # antialias: widen when downscaling
    centres = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * inv_scale
    # Sources whose centres lie within the widened triangle's radius (kernel_scale) of a centre.
    first = np.clip(np.ceil(centres - kernel_scale - np.float32(0.5)), 0, in_size - 1)
    last = np.clip(np.floor(centres + kernel_scale - np.float32(0.5)), 0, in_size - 1)
    sources = np.arange(in_size, dtype=np.float32)
    distance = (sources[None, :] + np.float32(0.5) - centres[:, None]) / kernel_scale
    weights = np.maximum(np.float32(0.0), np.float32(1.0) - np.abs(distance))
    inside = (sources[None, :] >= first[:, None]) & (sources[None, :] <= last[:, None])
    weights = np.where(inside, weights, np.float32(0.0)).astype(np.float32)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 or float [H, W, 3] -> float32 [size, size, 3], bilinear and antialiased as in
    training (an image already that size is only cast)."""
    image = np.asarray(image, np.float32)
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    rows = resize_weights(height, size) @ image.reshape(height, width * 3)  # [size, W * 3]
    rows = rows.reshape(size, width, 3).transpose(0, 2, 1)  # [size, 3, W]
    return np.ascontiguousarray((rows @ resize_weights(width, size).T).transpose(0, 2, 1))


def preprocess(image: np.ndarray, mode: str) -> np.ndarray:
    """RGB float32 in [0, 255] -> network input, as ``pipeline.preprocess``: 'caffe' (BGR minus
    the ImageNet BGR mean) or 'unit' ([-1, 1])."""
    if mode == "caffe":
        return image[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, np.float32)
    return image / np.float32(127.5) - np.float32(1.0)


def network_input(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """float32 [size, size, 3] network input of a uint8 RGB crop of any size."""
    return np.ascontiguousarray(preprocess(resize_image(image, size), mode), np.float32)
