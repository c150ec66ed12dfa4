"""ResNet50 (v1) in Flax NNX, layer for layer the same as `keras.applications.ResNet50`.

Keras specifics kept here (they differ from torchvision's ResNet50): every conv has a bias,
the stem is ZeroPadding2D(3) + 7x7/2 'valid' conv and ZeroPadding2D(1) + 3x3/2 max-pool, the
bottleneck stride sits on the first 1x1 conv (and the projection shortcut), BatchNorm uses
epsilon 1.001e-5 and momentum 0.99. Submodules carry the Keras layer names (`conv1_conv`,
`conv2_block1_1_conv`, `conv2_block1_0_bn`, ..., `predictions`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from affect_jax.ops import max_pool as pool_ops
from affect_jax.ops.batch_norm import BatchNorm
from affect_jax.ops.conv import Conv

# (stage name, filters, blocks, stride of the first block) as in keras resnet.stack1 calls.
_STAGES = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
_EXPANSION = 4
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.99
TOP_LAYER_NAMES = ("predictions",)
# Keras's default kernel initializer, so random-init runs start like the study's Keras models.
KERNEL_INIT = nnx.initializers.glorot_uniform()


def _scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def feature_side(image_size: int) -> int:
    """The side of the last feature map (conv5_block3_out) for a square input."""
    size = (image_size + 6 - 7) // 2 + 1  # conv1_pad + conv1_conv
    size = (size + 2 - 3) // 2 + 1  # pool1_pad + pool1_pool
    for _, _, _, stride in _STAGES:
        size = (size - 1) // stride + 1  # strided 1x1 'valid' conv
    return size


def keras_layer_names(include_top: bool) -> tuple[str, ...]:
    """Names of the Keras layers that hold weights, in `model.layers` order.

    Keras's functional graph orders the first block of a stage as 1_conv, 1_bn, 2_conv, 2_bn,
    0_conv, 3_conv, 0_bn, 3_bn (topological order); this matters only for Keras 3 weight
    files that lack layer-name metadata.
    """
    names = ["conv1_conv", "conv1_bn"]
    for stage, _, blocks, _ in _STAGES:
        for b in range(1, blocks + 1):
            p = f"{stage}_block{b}"
            if b == 1:
                names += [
                    f"{p}_1_conv",
                    f"{p}_1_bn",
                    f"{p}_2_conv",
                    f"{p}_2_bn",
                    f"{p}_0_conv",
                    f"{p}_3_conv",
                    f"{p}_0_bn",
                    f"{p}_3_bn",
                ]
            else:
                names += [
                    f"{p}_1_conv",
                    f"{p}_1_bn",
                    f"{p}_2_conv",
                    f"{p}_2_bn",
                    f"{p}_3_conv",
                    f"{p}_3_bn",
                ]
    if include_top:
        names += list(TOP_LAYER_NAMES)
    return tuple(names)


def _zero_pad(x: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


class ResNet50(nnx.Module):
    """ResNet50 backbone (optionally with the 1000-way ImageNet classifier).

    Args:
      include_top: add global average pooling and `predictions` (logits, no softmax).
      width: channel multiplier (1.0 = Keras architecture).
      dtype: compute dtype; parameters and BatchNorm statistics are always float32.
      activation_dtype: dtype of the activations between layers (default: `dtype`); float32
        with a bfloat16 `dtype` rounds only inside the convolutions.
      conv_impl: convolution path (`affect_jax.ops.conv.IMPLS`); all compute the same function.
      batch_norm_impl: training-mode BatchNorm path (`affect_jax.ops.batch_norm.IMPLS`); all
        compute the same function.
      pool_impl: the stem's max-pool path (`affect_jax.ops.max_pool.IMPLS`); all compute the
        same function.
      rngs: initialisation randomness.
    """

    arch = "resnet50"
    top_layer_names = TOP_LAYER_NAMES

    def __init__(
        self,
        include_top: bool = False,
        width: float = 1.0,
        *,
        dtype: Any = jnp.float32,
        activation_dtype: Any = None,
        conv_impl: str = "auto",
        batch_norm_impl: str = "auto",
        pool_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.include_top = include_top
        self.width = float(width)
        self.dtype = dtype
        act_dtype = activation_dtype or dtype
        self.act_dtype = act_dtype
        pool_ops.resolve_impl(pool_impl)  # validate early
        self.pool_impl = pool_impl

        def conv(name: str, cin: int, cout: int, k: int, stride: int, padding: str) -> None:
            setattr(
                self,
                name,
                Conv(
                    cin,
                    cout,
                    (k, k),
                    strides=(stride, stride),
                    padding=padding,
                    use_bias=True,
                    dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=KERNEL_INIT,
                    impl=conv_impl,
                    rngs=rngs,
                ),
            )

        def bn(name: str, c: int) -> None:
            # Two-pass variance, as Keras computes it: E[x^2] - E[x]^2 loses precision on the
            # large activations of caffe-range (ImageNet-preprocessed) inputs.
            setattr(
                self,
                name,
                BatchNorm(
                    c,
                    momentum=BN_MOMENTUM,
                    epsilon=BN_EPSILON,
                    dtype=act_dtype,
                    param_dtype=jnp.float32,
                    use_fast_variance=False,
                    impl=batch_norm_impl,
                    rngs=rngs,
                ),
            )

        stem = _scaled(64, width)
        conv("conv1_conv", 3, stem, 7, 2, "VALID")
        bn("conv1_bn", stem)
        blocks = []  # (prefix, stride, has_shortcut)
        in_ch = stem
        for stage, filters, n_blocks, stride in _STAGES:
            f = _scaled(filters, width)
            out = _EXPANSION * f
            for b in range(1, n_blocks + 1):
                p = f"{stage}_block{b}"
                s = stride if b == 1 else 1
                if b == 1:  # Keras stack1: conv_shortcut=True on the first block only.
                    conv(f"{p}_0_conv", in_ch, out, 1, s, "VALID")
                    bn(f"{p}_0_bn", out)
                conv(f"{p}_1_conv", in_ch, f, 1, s, "VALID")
                bn(f"{p}_1_bn", f)
                conv(f"{p}_2_conv", f, f, 3, 1, "SAME")
                bn(f"{p}_2_bn", f)
                conv(f"{p}_3_conv", f, out, 1, 1, "VALID")
                bn(f"{p}_3_bn", out)
                blocks.append((p, b == 1))
                in_ch = out
        self._blocks = tuple(blocks)
        self.num_features = in_ch
        if include_top:
            self.predictions = nnx.Linear(
                in_ch, 1000, dtype=dtype, kernel_init=KERNEL_INIT, rngs=rngs
            )

    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        """(h, w, c) of the last feature map (conv5_block3_out) for a square input."""
        size = feature_side(image_size)
        return size, size, self.num_features

    def _conv_bn(
        self,
        name: str,
        x: jax.Array,
        train: bool,
        relu: bool = False,
        residual: jax.Array | None = None,
    ) -> jax.Array:
        """`{name}_conv`, `{name}_bn`, plus `residual`, then a ReLU if `relu` (the sum and the
        ReLU are fused into the BatchNorm).

        In training mode the BatchNorm subtracts the batch mean, so the conv bias cancels and
        its exact gradient is zero. Computed, it is float32 round-off, which Adam (~lr * g /
        (|g| + eps)) turns into moves of up to lr: a random walk of the bias away from the
        BatchNorm's running mean. The bias still shifts the batch mean (and so the running
        mean) in the forward pass, as in Keras.
        """
        conv = getattr(self, f"{name}_conv")
        bn = getattr(self, f"{name}_bn")
        return bn(
            conv(x, stop_bias_gradient=train),
            use_running_average=not train,
            relu=relu,
            residual=residual,
        )

    def _conv_bn_folded(
        self, name: str, x: jax.Array, relu: bool = False, residual: jax.Array | None = None
    ) -> jax.Array:
        """`_conv_bn` at inference once `prepare_inference` folded `{name}_bn` into
        `{name}_conv`: one convolution (+ residual, ReLU), one kernel on the native path."""
        return getattr(self, f"{name}_conv")(x, relu=relu, residual=residual)

    def prepare_inference(self, image_size: int) -> None:
        """Prepares the parameters, in place, for ``folded=True`` inference on square images of
        side `image_size`: every BatchNorm folded into the convolution before it, then each
        convolution's kernel packed for oneDNN's inference kernel where it runs on oneDNN
        (`Conv.pack_for_inference`; other sizes still work, with one reorder per call).

        BatchNorm at inference is ``(y - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``,
        per channel: on ``y = conv(x, k) + b`` it is the convolution with kernel ``k * s`` and
        bias ``(b - mean) * s + beta`` (computed in float32). Afterwards the model must be
        called with ``folded=True`` (and only for inference); the BatchNorms keep their
        variables but are no longer read.
        """
        for name, side in self._conv_input_sides(image_size):
            conv, bn = getattr(self, f"{name}_conv"), getattr(self, f"{name}_bn")
            scale = bn.scale[...].astype(jnp.float32) * jax.lax.rsqrt(
                bn.var[...].astype(jnp.float32) + bn.epsilon
            )
            kernel = conv.kernel[...]
            conv.kernel[...] = (kernel.astype(jnp.float32) * scale).astype(kernel.dtype)
            bias = conv.bias[...]
            conv.bias[...] = (
                (bias.astype(jnp.float32) - bn.mean[...]) * scale + bn.bias[...]
            ).astype(bias.dtype)
            conv.pack_for_inference((side, side))

    def _conv_input_sides(self, image_size: int) -> list[tuple[str, int]]:
        """(layer name without `_conv`, side of its square input) for every convolution."""
        side = image_size + 6  # conv1_pad
        sides = [("conv1", side)]
        side = (side - 7) // 2 + 1 + 2  # conv1 (7x7/2 'valid'), pool1_pad
        side = (side - 3) // 2 + 1  # pool1 (3x3/2)
        strides = {f"{stage}_block1": stride for stage, _, _, stride in _STAGES}
        for prefix, shortcut in self._blocks:
            inner = (side - 1) // strides.get(prefix, 1) + 1  # after the strided 1x1 conv
            if shortcut:
                sides.append((f"{prefix}_0", side))
            sides += [(f"{prefix}_1", side), (f"{prefix}_2", inner), (f"{prefix}_3", inner)]
            side = inner
        return sides

    def _block(
        self, x: jax.Array, prefix: str, shortcut: bool, train: bool, folded: bool
    ) -> jax.Array:
        if folded:
            sc = self._conv_bn_folded(f"{prefix}_0", x) if shortcut else x
            y = self._conv_bn_folded(f"{prefix}_1", x, relu=True)
            y = self._conv_bn_folded(f"{prefix}_2", y, relu=True)
            return self._conv_bn_folded(f"{prefix}_3", y, relu=True, residual=sc)
        sc = self._conv_bn(f"{prefix}_0", x, train) if shortcut else x
        y = self._conv_bn(f"{prefix}_1", x, train, relu=True)
        y = self._conv_bn(f"{prefix}_2", y, train, relu=True)
        return self._conv_bn(f"{prefix}_3", y, train, relu=True, residual=sc)

    def __call__(self, x: jax.Array, *, train: bool = False, folded: bool = False) -> jax.Array:
        """Runs the network on preprocessed NHWC images.

        Returns the conv5_block3_out feature map [B, h, w, C], or 1000 logits with the top.
        `train=True` normalises with batch statistics and updates the running averages.
        `folded=True`: inference with the BatchNorms folded by `prepare_inference`.
        """
        if folded and train:
            raise ValueError("folded=True is inference only (train must be False)")
        x = _zero_pad(x.astype(self.act_dtype), 3)
        if folded:
            x = self._conv_bn_folded("conv1", x, relu=True)
        else:
            x = self._conv_bn("conv1", x, train, relu=True)
        # Zero padding before the max-pool matches Keras (inputs are >= 0 after the ReLU).
        x = _zero_pad(x, 1)
        x = pool_ops.max_pool(x, (3, 3), (2, 2), self.pool_impl)
        for prefix, shortcut in self._blocks:
            x = self._block(x, prefix, shortcut, train, folded)
        if not self.include_top:
            return x
        x = jnp.mean(x, axis=(1, 2))
        return self.predictions(x)
