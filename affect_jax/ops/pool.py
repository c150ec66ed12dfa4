"""Max pooling whose gradient XLA:CPU runs fast.

`lax.reduce_window(max)` differentiates into a variadic reduce-window over (value, index)
pairs that XLA:CPU runs slowly: the ResNet50 stem's 3x3/2 max-pool gradient alone took 1.5 s of
a 6.7 s bfloat16 train step at batch 32, 224 px (docs/performance.md). Here the pool is the
elementwise maximum of its kh*kw strided window views, and the gradient routes each output's
cotangent to the first maximal element of its window (row-major), as TensorFlow's MaxPoolGrad
does, through kh*kw strided pads that XLA fuses into one loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _window_views(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]):
    """The kh*kw strided views [B, Ho, Wo, C] of NHWC `x` ('VALID' windows), row-major order."""
    (kh, kw), (sh, sw) = window, strides
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    views = [
        jax.lax.slice(x, (0, i, j, 0), (x.shape[0], i + sh * (ho - 1) + 1,
                                        j + sw * (wo - 1) + 1, x.shape[3]), (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]
    return views, (ho, wo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    """'VALID' max pooling of NHWC `x` (pad first for other paddings)."""
    if x.ndim != 4:
        raise ValueError(f'max_pool needs NHWC input, got shape {x.shape}')
    if x.shape[1] < window[0] or x.shape[2] < window[1]:
        raise ValueError(f'max_pool window {window} is larger than the input {x.shape[1:3]}')
    # The maximum is exact in any dtype; XLA:CPU computes it far faster in float32.
    views, _ = _window_views(x.astype(jnp.float32), window, strides)
    return functools.reduce(jnp.maximum, views).astype(x.dtype)


def _max_pool_fwd(x, window, strides):
    y = max_pool(x, window, strides)
    return y, (x, y)


def _max_pool_bwd(window, strides, residuals, dy):
    x, y = residuals
    views, (ho, wo) = _window_views(x.astype(jnp.float32), window, strides)
    y = y.astype(jnp.float32)
    (_, kw), (sh, sw) = window, strides
    taken = jnp.zeros(y.shape, bool)
    # Accumulate in float32: XLA:CPU runs bfloat16 pads/adds an order of magnitude slower.
    dy32 = dy.astype(jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    dx = jnp.zeros(x.shape, jnp.float32)
    for k, view in enumerate(views):
        i, j = divmod(k, kw)
        first = (view == y) & ~taken
        taken = taken | first
        # Scatter this window position's share back to its strided input locations.
        share = jnp.where(first, dy32, zero)
        dx = dx + jax.lax.pad(share, zero, (
            (0, 0, 0),
            (i, x.shape[1] - i - sh * (ho - 1) - 1, sh - 1),
            (j, x.shape[2] - j - sw * (wo - 1) - 1, sw - 1),
            (0, 0, 0)))
    return (dx.astype(dy.dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
