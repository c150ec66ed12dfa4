"""Max pooling with a fast gradient on CPU.

`lax.reduce_window(max)` differentiates into a variadic reduce-window over (value, index)
pairs that XLA:CPU runs slowly: a large part of a ResNet50 bfloat16 train step went to the
stem's 3x3/2 max-pool gradient (docs/performance.md). Two paths (`impl`), with the same
results: the gradient of each output goes to the first maximal element of its window
(row-major), as TensorFlow's MaxPoolGrad does.

* ``'xla'``: the pool is the elementwise maximum of its kh*kw strided window views, and the
  gradient is routed through kh*kw strided pads that XLA fuses into one loop.
* ``'native'``: the C++ kernels of `max_pool.cc` (in the extension, `ops.native`): one pass
  forward, which also records each maximum's window position (uint8), and one pass backward
  from those positions, so the pool's input is not kept for the gradient. XLA:CPU runs the
  'xla' form's bfloat16 gradient in several float32 passes.

``'auto'`` picks 'native' for float32 and bfloat16 where `native.applies`, else 'xla'.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.ops import native

IMPLS = native.IMPLS
# The FFI targets of max_pool.cc: direction -> target name.
TARGETS = {
    "forward": "affect_jax_max_pool_forward",
    "backward": "affect_jax_max_pool_backward",
}
native.register_targets(
    {
        TARGETS["forward"]: "AffectJaxMaxPoolForward",
        TARGETS["backward"]: "AffectJaxMaxPoolBackward",
    }
)


def resolve_impl(impl: str, dtype: Any = jnp.float32) -> str:
    """Validates `impl`; maps 'auto' to the path for activations of `dtype`."""
    return native.resolve_impl("max pool", impl, dtype)


def max_pool(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], impl: str = "auto"
) -> jax.Array:
    """'VALID' max pooling of NHWC `x` (pad first for other paddings) by the `impl` path."""
    window, strides = tuple(int(k) for k in window), tuple(int(s) for s in strides)
    _check(x.shape, window, strides)
    if resolve_impl(impl, x.dtype) == "native":
        check_native(x.shape, x.dtype, window, strides)
        return _native_max_pool(x, window, strides, x.shape[1:3])
    return _xla_max_pool(x, window, strides)


def _check(shape: tuple[int, ...], window: tuple[int, int], strides: tuple[int, int]) -> None:
    if len(shape) != 4:
        raise ValueError(f"max_pool needs NHWC input, got shape {shape}")
    if min(window + strides) < 1:
        raise ValueError(f"max_pool window {window} and strides {strides} must be >= 1")
    if shape[1] < window[0] or shape[2] < window[1]:
        raise ValueError(f"max_pool window {window} is larger than the input {shape[1:3]}")


def check_native(
    shape: tuple[int, ...], dtype: Any, window: tuple[int, int], strides: tuple[int, int]
) -> None:
    """Raises a clear error unless the native kernels can pool an input of `shape`/`dtype`."""
    _check(shape, window, strides)
    if dtype not in native.DTYPES:
        raise TypeError(f"native max_pool takes float32 or bfloat16, got {dtype}")
    if window[0] * window[1] > 256:
        raise ValueError(f"native max_pool takes windows of at most 256 positions, got {window}")


def _window_views(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]):
    """The kh*kw strided views [B, Ho, Wo, C] of NHWC `x` ('VALID' windows), row-major order."""
    (kh, kw), (sh, sw) = window, strides
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    views = [
        jax.lax.slice(
            x,
            (0, i, j, 0),
            (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, x.shape[3]),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return views, (ho, wo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _xla_max_pool(x, window, strides):
    # The maximum is exact in any dtype; XLA:CPU computes it far faster in float32.
    views, _ = _window_views(x.astype(jnp.float32), window, strides)
    return functools.reduce(jnp.maximum, views).astype(x.dtype)


def _xla_max_pool_fwd(x, window, strides):
    y = _xla_max_pool(x, window, strides)
    return y, (x, y)


def _xla_max_pool_bwd(window, strides, residuals, dy):
    x, y = residuals
    views, (ho, wo) = _window_views(x.astype(jnp.float32), window, strides)
    y = y.astype(jnp.float32)
    (_, kw), (sh, sw) = window, strides
    taken = jnp.zeros(y.shape, bool)
    # Accumulate in float32: XLA:CPU runs bfloat16 pads/adds far slower.
    dy32 = dy.astype(jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    dx = jnp.zeros(x.shape, jnp.float32)
    for k, view in enumerate(views):
        i, j = divmod(k, kw)
        first = (view == y) & ~taken
        taken = taken | first
        # Scatter this window position's share back to its strided input locations.
        share = jnp.where(first, dy32, zero)
        dx = dx + jax.lax.pad(
            share,
            zero,
            (
                (0, 0, 0),
                (i, x.shape[1] - i - sh * (ho - 1) - 1, sh - 1),
                (j, x.shape[2] - j - sw * (wo - 1) - 1, sw - 1),
                (0, 0, 0),
            ),
        )
    return (dx.astype(dy.dtype),)


_xla_max_pool.defvjp(_xla_max_pool_fwd, _xla_max_pool_bwd)


def _native_call(direction, out, *operands, window, strides):
    return native.call_kernel(
        "max pool",
        TARGETS[direction],
        out,
        *operands,
        window_h=np.int64(window[0]),
        window_w=np.int64(window[1]),
        stride_h=np.int64(strides[0]),
        stride_w=np.int64(strides[1]),
    )


def native_forward(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """The native kernel's pooled output and uint8 window positions of its maxima (not
    differentiable; `max_pool` is)."""
    (kh, kw), (sh, sw) = window, strides
    shape = (x.shape[0], (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1, x.shape[3])
    return _native_call(
        "forward",
        (jax.ShapeDtypeStruct(shape, x.dtype), jax.ShapeDtypeStruct(shape, jnp.uint8)),
        x,
        window=window,
        strides=strides,
    )


# `in_hw` (x's height and width) is static so the backward pass needs only the argmax.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _native_max_pool(x, window, strides, in_hw):
    del in_hw
    return native_forward(x, window, strides)[0]


def _native_max_pool_fwd(x, window, strides, in_hw):
    del in_hw
    y, argmax = native_forward(x, window, strides)
    return y, argmax


def native_backward(
    argmax: jax.Array,
    dy: jax.Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    in_hw: tuple[int, int],
) -> jax.Array:
    """The input gradient [B, *in_hw, C] from `native_forward`'s positions and dy."""
    b, _, _, c = dy.shape
    return _native_call(
        "backward",
        jax.ShapeDtypeStruct((b, *in_hw, c), dy.dtype),
        argmax,
        dy,
        window=window,
        strides=strides,
    )


def _native_max_pool_bwd(window, strides, in_hw, argmax, dy):
    return (native_backward(argmax, dy, window, strides, in_hw),)


_native_max_pool.defvjp(_native_max_pool_fwd, _native_max_pool_bwd)
