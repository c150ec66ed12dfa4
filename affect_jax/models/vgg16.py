"""VGG16 in Flax NNX, layer for layer the same as `keras.applications.VGG16`.

Submodules carry the Keras layer names (`block1_conv1`, ..., `fc1`, `fc2`, `predictions`) so
that Keras weight files map onto them by name (see `affect_jax.weights`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from affect_jax.ops import max_pool as pool_ops
from affect_jax.ops.conv import Conv
from affect_jax.ops.conv_pool import conv_relu_max_pool

# (block, number of convs, channels) as in keras.applications.vgg16.
_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
_FC_UNITS = 4096
TOP_LAYER_NAMES = ("fc1", "fc2", "predictions")
# Keras's default kernel initializer, so random-init runs start like the study's Keras models.
KERNEL_INIT = nnx.initializers.glorot_uniform()


def _scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def feature_side(image_size: int) -> int:
    """The side of the last feature map (block5_pool) for a square input: 0 if too small."""
    size = image_size
    for _ in _BLOCKS:
        size //= 2
    return size


def keras_layer_names(include_top: bool) -> tuple[str, ...]:
    """Names of the Keras layers that hold weights, in `model.layers` order."""
    names = [f"block{b}_conv{i}" for b, n, _ in _BLOCKS for i in range(1, n + 1)]
    if include_top:
        names += list(TOP_LAYER_NAMES)
    return tuple(names)


def _conv_relu_max_pool_2x2(conv: Conv, x: jax.Array, pool_impl: str) -> jax.Array:
    """A block's last conv + bias + ReLU, then Keras's MaxPooling2D((2, 2), strides=(2, 2)) with
    'valid' padding (odd sizes floor), differentiated without keeping the ReLU's output
    (`ops.conv_pool`)."""
    kernel = conv.kernel[...]
    return conv_relu_max_pool(
        x,
        kernel,
        conv.bias[...],
        conv.padding,
        conv.impl,
        conv.dtype or jnp.result_type(x, kernel),
        (2, 2),
        (2, 2),
        pool_impl,
    )


class VGG16(nnx.Module):
    """VGG16 backbone (optionally with the 1000-way ImageNet classifier).

    Args:
      include_top: add flatten, fc1, fc2 and predictions (logits, no softmax).
      width: channel multiplier (1.0 = Keras architecture; also scales fc1/fc2).
      input_size: square input side; only needed with the top, whose fc1 input size
        depends on it (224 for the ImageNet weights).
      dtype: compute dtype; parameters are always float32.
      activation_dtype: dtype of the activations between layers (default: `dtype`); float32
        with a bfloat16 `dtype` rounds only inside the convolutions. The returned feature map
        is float32 either way (the last convolution writes float32).
      conv_impl: convolution path (`affect_jax.ops.conv.IMPLS`); all compute the same function.
      pool_impl: max-pool path (`affect_jax.ops.max_pool.IMPLS`); all compute the same function.
      rngs: initialisation randomness.
    """

    arch = "vgg16"
    top_layer_names = TOP_LAYER_NAMES

    def __init__(
        self,
        include_top: bool = False,
        width: float = 1.0,
        *,
        input_size: int = 224,
        dtype: Any = jnp.float32,
        activation_dtype: Any = None,
        conv_impl: str = "auto",
        pool_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.include_top = include_top
        self.width = float(width)
        self.dtype = dtype
        self.act_dtype = activation_dtype or dtype
        pool_ops.resolve_impl(pool_impl)  # validate early
        self.pool_impl = pool_impl
        conv_names = []
        in_ch = 3
        for block, n_convs, channels in _BLOCKS:
            out_ch = _scaled(channels, width)
            for i in range(1, n_convs + 1):
                name = f"block{block}_conv{i}"
                conv = Conv(
                    in_ch,
                    out_ch,
                    (3, 3),
                    padding="SAME",
                    dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=KERNEL_INIT,
                    impl=conv_impl,
                    rngs=rngs,
                )
                setattr(self, name, conv)
                conv_names.append(name)
                in_ch = out_ch
        self._conv_names = tuple(conv_names)
        self.num_features = in_ch
        if include_top:
            h, w, c = self.feature_shape(input_size)
            if h < 1 or w < 1:
                raise ValueError(f"input_size {input_size} too small for VGG16 (minimum 32)")
            fc = _scaled(_FC_UNITS, width)
            self.fc1 = nnx.Linear(h * w * c, fc, dtype=dtype, kernel_init=KERNEL_INIT, rngs=rngs)
            self.fc2 = nnx.Linear(fc, fc, dtype=dtype, kernel_init=KERNEL_INIT, rngs=rngs)
            self.predictions = nnx.Linear(fc, 1000, dtype=dtype, kernel_init=KERNEL_INIT, rngs=rngs)

    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        """(h, w, c) of the last feature map (block5_pool) for a square input."""
        size = feature_side(image_size)
        return size, size, self.num_features

    def prepare_inference(self, image_size: int) -> None:
        """Prepares the parameters, in place, for ``folded=True`` inference on square images of
        side `image_size` (VGG16 has no BatchNorm to fold): each convolution's kernel packed for
        oneDNN's inference kernel where it runs on oneDNN (`Conv.pack_for_inference`)."""
        side, idx = image_size, 0
        for _, n_convs, _ in _BLOCKS:
            for _ in range(n_convs):
                getattr(self, self._conv_names[idx]).pack_for_inference((side, side))
                idx += 1
            side //= 2  # the block's 2x2/2 max-pool

    def __call__(self, x: jax.Array, *, train: bool = False, folded: bool = False) -> jax.Array:
        """Runs the network on preprocessed NHWC images.

        Returns the float32 block5_pool feature map [B, h, w, C], or 1000 logits with the top.
        `folded=True`: inference on the parameters `prepare_inference` prepared (ResNet50's
        interface; VGG16 has no BatchNorm, so it only changes the kernels' layout).
        """
        if folded and train:
            raise ValueError("folded=True is inference only (train must be False)")
        x = x.astype(self.act_dtype)
        idx = 0
        for _, n_convs, _ in _BLOCKS:
            for i in range(n_convs):
                if idx == len(self._conv_names) - 1:
                    # The last convolution writes float32 (its input's dtype; the cast is
                    # exact), so the feature map the head pools keeps full precision.
                    x = x.astype(jnp.float32)
                conv = getattr(self, self._conv_names[idx])
                idx += 1
                if i < n_convs - 1:
                    # conv + bias + ReLU: one oneDNN kernel, no pre-activation kept.
                    x = conv(x, relu=True)
                elif folded:  # inference: no gradient to save memory for
                    x = pool_ops.max_pool(conv(x, relu=True), (2, 2), (2, 2), self.pool_impl)
                else:
                    x = _conv_relu_max_pool_2x2(conv, x, self.pool_impl)
        if not self.include_top:
            return x
        # Keras Flatten on channels_last flattens in (h, w, c) order, as reshape does.
        x = x.reshape((x.shape[0], -1))
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.predictions(x)
