"""A conv + bias + ReLU layer followed by max pooling (VGG16's block ends), differentiated
without keeping the ReLU's output.

Separately, the layer keeps its output for the ReLU's gradient mask (y > 0) and the pool keeps
its window positions. But the pool sends each output's gradient only to its window's maximum,
and there y equals the pool's output p: masking the pool's output gradient with p > 0 before
routing it gives exactly the masked gradient, so the layer's output (four times the size of p
for a 2x2 pool) need not be kept; the next layer keeps p anyway.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from affect_jax.ops import conv as conv_ops
from affect_jax.ops import max_pool as pool_ops


def conv_relu_max_pool(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    conv_padding: conv_ops.Padding,
    conv_impl: str,
    compute_dtype: Any,
    window: tuple[int, int],
    strides: tuple[int, int],
    pool_impl: str = "auto",
) -> jax.Array:
    """`max_pool(relu(conv2d(x, kernel) + bias), window, strides)` (stride-1 convolution).

    With the native pool the backward pass keeps only the pool's output and window positions
    (module docstring); with the 'xla' pool it is the two ops one after the other.
    """
    if bias is None:
        bias = jnp.zeros((kernel.shape[-1],), kernel.dtype)
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else None
    conv_args = (
        conv_ops.explicit_padding(
            conv_padding, tuple(x.shape[1:3]), tuple(kernel.shape[:2]), (1, 1)
        ),
        conv_impl,
        dtype,
    )
    window, strides = tuple(int(k) for k in window), tuple(int(s) for s in strides)
    if pool_ops.resolve_impl(pool_impl, x.dtype) != "native":
        y = _conv(x, kernel, bias, conv_args, True)
        return pool_ops.max_pool(y, window, strides, pool_impl)
    y_shape = jax.eval_shape(lambda: _conv(x, kernel, bias, conv_args, True)).shape
    pool_ops.check_native(y_shape, x.dtype, window, strides)
    return _conv_relu_max_pool(x, kernel, bias, conv_args, (window, strides, y_shape[1:3]))


def _conv(x, kernel, bias, conv_args, relu):
    pads, impl, dtype = conv_args
    return conv_ops.conv2d(x, kernel, (1, 1), pads, impl, compute_dtype=dtype, bias=bias, relu=relu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_relu_max_pool(x, kernel, bias, conv_args, pool_args):
    window, strides, _ = pool_args
    return pool_ops.native_forward(_conv(x, kernel, bias, conv_args, True), window, strides)[0]


def _fwd(x, kernel, bias, conv_args, pool_args):
    window, strides, _ = pool_args
    p, argmax = pool_ops.native_forward(_conv(x, kernel, bias, conv_args, True), window, strides)
    return p, (x, kernel, bias, p, argmax)


def _bwd(conv_args, pool_args, residuals, dp):
    x, kernel, bias, p, argmax = residuals
    window, strides, conv_hw = pool_args
    # The ReLU's mask at each window's maximum (the only place the pool routes a gradient to).
    dp = jnp.where(p > 0, dp, jnp.zeros((), dp.dtype))
    dy = pool_ops.native_backward(argmax, dp, window, strides, conv_hw)
    # The convolution's gradients without its ReLU (the mask is applied); XLA drops the unused
    # forward convolution this traces.
    _, conv_vjp = jax.vjp(lambda a, k, b: _conv(a, k, b, conv_args, False), x, kernel, bias)
    return conv_vjp(dy)


_conv_relu_max_pool.defvjp(_fwd, _bwd)
