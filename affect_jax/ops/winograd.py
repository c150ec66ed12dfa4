"""3x3 stride-1 float32 convolutions by Winograd's F(4x4, 3x3) (kernels: `winograd.cc`).

Each 4x4 output tile is computed from a 6x6 input tile with 36 instead of 144 multiplications
per channel pair (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), so
the forward pass and both gradients need a quarter of the direct convolution's multiply-adds;
the tile transforms are cheap, memory-bound passes. The result is the same convolution up to
float32 rounding (the transforms' points 0, +-1, +-2 keep the error near 1e-6 relative; tests
check it against `lax.conv` and TensorFlow).

`conv3x3` is differentiable (custom VJP): the input gradient is the same algorithm run on the
output gradient with the kernel rotated by 180 degrees and its channels swapped, the weight
gradient a sum over tiles in the transformed domain mapped back by G^T . G.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.ops import native

# The FFI targets of winograd.cc: direction -> target name.
TARGETS = {
    "forward": "affect_jax_winograd_forward",
    "backward_weights": "affect_jax_winograd_backward_weights",
    "pack": "affect_jax_winograd_pack",
}
native.register_targets(
    {
        TARGETS["forward"]: "AffectJaxWinogradForward",
        TARGETS["backward_weights"]: "AffectJaxWinogradBackwardWeights",
        TARGETS["pack"]: "AffectJaxWinogradPack",
    }
)
Pads = tuple[tuple[int, int], tuple[int, int]]
# Transformed tiles per batched matrix product: ~8 MB of transformed input or output in flight
# (36 positions x tiles x channels x 4 bytes), enough rows for oneDNN's matmul blocking.
_CHUNK_BYTES = 8 << 20


# Where F(4x4, 3x3) beats oneDNN's direct float32 convolution (forward + both gradients,
# measured by layer: docs/performance.md): from 14x14 outputs up (its 4x4 tiles pad a 7x7
# output to 8x8) and not for 3 input channels (VGG16's first layer: matrix products over 3
# channels waste the transforms).
MIN_OUTPUT_SIZE = 14
MIN_IN_CHANNELS = 16


def applicable(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    strides: tuple[int, int],
    pads: Pads,
    compute_dtype: Any,
) -> bool:
    """Whether `conv3x3` computes this convolution: a 3x3 kernel, stride 1, padding 0-2 on
    every side, float32 compute."""
    return (
        len(x_shape) == 4
        and len(kernel_shape) == 4
        and tuple(kernel_shape[:2]) == (3, 3)
        and x_shape[-1] == kernel_shape[2]
        and tuple(strides) == (1, 1)
        and all(0 <= p <= 2 for side in pads for p in side)
        and jnp.dtype(compute_dtype) == jnp.float32
    )


def preferred(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    strides: tuple[int, int],
    pads: Pads,
    compute_dtype: Any,
) -> bool:
    """Whether `conv3x3` is applicable and faster than the direct convolution here."""
    if not applicable(x_shape, kernel_shape, strides, pads, compute_dtype):
        return False
    (pt, pb), (pl, pr) = pads
    out_h, out_w = x_shape[1] + pt + pb - 2, x_shape[2] + pl + pr - 2
    return min(out_h, out_w) >= MIN_OUTPUT_SIZE and x_shape[-1] >= MIN_IN_CHANNELS


def chunk_tiles(in_channels: int, out_channels: int) -> int:
    """Tiles per batched matrix product for these channel counts (a multiple of 16)."""
    tiles = _CHUNK_BYTES // (36 * 4 * max(in_channels, out_channels))
    return int(max(64, min(2048, tiles // 16 * 16)))


def _forward(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    out_hw: tuple[int, int],
    pad_top: int,
    pad_left: int,
    relu: bool,
    flip: bool,
    chunk: int,
) -> jax.Array:
    """The kernel's forward; `flip`: by the kernel rotated 180 degrees, channels swapped."""
    k = kernel.shape[2] if flip else kernel.shape[3]
    out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, k), jnp.float32)
    return native.call_kernel(
        "winograd conv",
        TARGETS["forward"],
        out,
        x,
        kernel,
        bias,
        pad_top=np.int64(pad_top),
        pad_left=np.int64(pad_left),
        relu=np.int64(relu),
        flip=np.int64(flip),
        chunk_tiles=np.int64(chunk),
    )


def conv3x3(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    pads: Pads,
    relu: bool = False,
    chunk: int | None = None,
) -> jax.Array:
    """NHWC x HWIO 3x3 stride-1 convolution (+ `bias` [K], then a ReLU if `relu`) in float32.

    `pads` as `lax` takes ((top, bottom), (left, right)), each 0-2; `chunk`: tiles per batched
    matrix product (default `chunk_tiles`; only speed and memory depend on it). Inputs are cast
    to float32; the result and the gradients come back in the inputs' dtypes.
    """
    if not applicable(x.shape, kernel.shape, (1, 1), pads, jnp.float32):
        raise ValueError(
            f"winograd conv3x3 needs NHWC x and a [3, 3, C, K] kernel with padding "
            f"0-2, got {x.shape}, {kernel.shape}, pads {pads}"
        )
    if bias is None:
        bias = jnp.zeros((kernel.shape[-1],), jnp.float32)
    chunk = chunk or chunk_tiles(kernel.shape[2], kernel.shape[3])
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _conv3x3(x, kernel, bias, pads, bool(relu), int(chunk))


def pack_kernel(kernel: jax.Array, in_hw: tuple[int, int], pads: Pads, batch: int) -> jax.Array:
    """The HWIO 3x3 `kernel` transformed once (U = G g G^T) and laid out as the batched matrix
    product of a `batch` x `in_hw` input wants it: a uint8 vector that
    `onednn_conv.conv2d_packed` runs by Winograd (inference; other batch or image sizes get one
    reorder per call). It spares each call the kernel transform, which at batch 1 costs more than
    the convolution itself."""
    if not applicable((batch, *in_hw, kernel.shape[2]), kernel.shape, (1, 1), pads, jnp.float32):
        raise ValueError(f"winograd pack_kernel needs a [3, 3, C, K] kernel, got {kernel.shape}")
    (pt, pb), (pl, pr) = pads
    tiles = batch * -(-(in_hw[0] + pt + pb - 2) // 4) * -(-(in_hw[1] + pl + pr - 2) // 4)
    cin, cout = int(kernel.shape[2]), int(kernel.shape[3])
    chunk = chunk_tiles(cin, cout)
    rows = min(chunk, tiles)
    fn = native.library().affect_jax_winograd_packed_bytes
    fn.restype = ctypes.c_int64
    size = fn(ctypes.c_int64(cin), ctypes.c_int64(cout), ctypes.c_int64(rows))
    if size < 0:
        raise ValueError(f"oneDNN has no matrix product for a Winograd kernel {kernel.shape}")
    return native.call_kernel(
        "winograd conv",
        TARGETS["pack"],
        jax.ShapeDtypeStruct((int(size),), jnp.uint8),
        kernel.astype(jnp.float32),
        rows=np.int64(rows),
        chunk_tiles=np.int64(chunk),
    )


def _out_hw(x: jax.Array, pads: Pads) -> tuple[int, int]:
    (pt, pb), (pl, pr) = pads
    return x.shape[1] + pt + pb - 2, x.shape[2] + pl + pr - 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv3x3(x, kernel, bias, pads, relu, chunk):
    y = _forward(
        x.astype(jnp.float32),
        kernel.astype(jnp.float32),
        bias.astype(jnp.float32),
        _out_hw(x, pads),
        pads[0][0],
        pads[1][0],
        relu,
        False,
        chunk,
    )
    return y.astype(x.dtype)


def _conv3x3_fwd(x, kernel, bias, pads, relu, chunk):
    y = _conv3x3(x, kernel, bias, pads, relu, chunk)
    # With a ReLU its mask is y > 0, so the pre-activation is not kept.
    return y, (x, kernel, bias, y if relu else None)


def _conv3x3_bwd(pads, relu, chunk, residuals, dy):
    x, kernel, bias, y = residuals
    dy = dy.astype(jnp.float32)
    if relu:
        dy = jnp.where(y > 0, dy, 0.0)
    (pt, _), (pl, _) = pads
    k32 = kernel.astype(jnp.float32)
    # dx: the convolution of dy by the kernel rotated 180 degrees with its channels swapped
    # (flip); padding 2 - p before maps dy's size back to x's.
    dx = _forward(
        dy,
        k32,
        jnp.zeros((x.shape[-1],), jnp.float32),
        x.shape[1:3],
        2 - pt,
        2 - pl,
        False,
        True,
        chunk,
    )
    dk, db = native.call_kernel(
        "winograd conv",
        TARGETS["backward_weights"],
        (
            jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
            jax.ShapeDtypeStruct(bias.shape, jnp.float32),
        ),
        x.astype(jnp.float32),
        dy,
        pad_top=np.int64(pt),
        pad_left=np.int64(pl),
        chunk_tiles=np.int64(chunk),
    )
    return dx.astype(x.dtype), dk.astype(kernel.dtype), db.astype(bias.dtype)


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
