"""oneDNN's direct 2-D convolutions (kernels: `onednn_conv.cc`, in the extension `ops.native`).

`conv2d` is differentiable (custom VJP: oneDNN's input- and weight-gradient kernels) and
computes `lax.conv_general_dilated`'s function for NHWC x HWIO in float32 or bfloat16.
`conv2d_add` (inference only) adds a residual before the ReLU in the same kernel.

At inference the kernels are constants, so `pack_kernel` reorders one, once, into the blocked
layout oneDNN's inference kernel wants (a uint8 array that carries the geometry it was packed
for), and `conv2d_packed` runs on it without the per-call reorder `conv2d` does. It also runs
kernels `winograd.pack_kernel` packed (the same forward kernel dispatches on the packing).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.ops import native

# The FFI targets of onednn_conv.cc: direction -> target name.
TARGETS = {
    "forward": "affect_jax_onednn_conv_forward",
    "forward_add": "affect_jax_onednn_conv_forward_add",
    "backward_data": "affect_jax_onednn_conv_backward_data",
    "backward_weights": "affect_jax_onednn_conv_backward_weights",
    "pack": "affect_jax_onednn_conv_pack",
}
native.register_targets(
    {
        TARGETS["forward"]: "AffectJaxConvForward",
        TARGETS["forward_add"]: "AffectJaxConvForwardAdd",
        TARGETS["backward_data"]: "AffectJaxConvBackwardData",
        TARGETS["backward_weights"]: "AffectJaxConvBackwardWeights",
        TARGETS["pack"]: "AffectJaxConvPackWeights",
    }
)
Pads = tuple[tuple[int, int], tuple[int, int]]
# The batch a kernel is packed for: the layout oneDNN picks can depend on it, and a single
# image (prediction's latency) is where the per-call reorder weighs most.
PACK_BATCH = 1


def _call(
    direction: str,
    out: Any,
    *operands: jax.Array,
    strides: tuple[int, int],
    pads: Pads,
    aliases: dict[int, int] | None = None,
    **attrs: int,
) -> Any:
    (pt, pb), (pl, pr) = pads
    return native.call_kernel(
        "oneDNN conv",
        TARGETS[direction],
        out,
        *operands,
        aliases=aliases,
        stride_h=np.int64(strides[0]),
        stride_w=np.int64(strides[1]),
        pad_top=np.int64(pt),
        pad_bottom=np.int64(pb),
        pad_left=np.int64(pl),
        pad_right=np.int64(pr),
        **{k: np.int64(v) for k, v in attrs.items()},
    )


def _out_shape(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads
) -> tuple[int, int, int, int]:
    (pt, pb), (pl, pr) = pads
    kh, kw, _, cout = kernel.shape
    ho = (x.shape[1] + pt + pb - kh) // strides[0] + 1
    wo = (x.shape[2] + pl + pr - kw) // strides[1] + 1
    return (x.shape[0], ho, wo, cout)


def _written(dtype: Any, compute: Any) -> Any:
    """oneDNN writes float32 results directly; other dtypes are computed in `compute`."""
    return jnp.float32 if jnp.dtype(dtype) == jnp.float32 else compute


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: Pads,
    compute_dtype: Any = None,
    bias: jax.Array | None = None,
    relu: bool = False,
) -> jax.Array:
    """NHWC x HWIO convolution (+ `bias` [O], then a ReLU if `relu`) by oneDNN; `strides` and
    `pads` as `lax` takes.

    Computes in `compute_dtype` (float32 or bfloat16; default `x.dtype`) and returns `x.dtype`,
    so bfloat16 convolutions can sit between float32 activations: inputs are cast inside,
    float32 results are written by oneDNN directly, and the gradients come back in the dtypes
    of `x`, `kernel` and `bias`. The input gradient is computed in `compute_dtype` (the dtype
    autodiff of a `lax.conv` in that dtype gives it, and Keras's `mixed_bfloat16` uses): with
    float32 activations around a bfloat16 convolution, half the bytes written (bit-identical
    for VGG16, which rounds every input gradient to bfloat16 before using it anyway). The ReLU
    is applied by the convolution kernel to its float32 sums, and its gradient mask comes from
    the output, so no pre-activation is kept.
    """
    compute = jnp.dtype(compute_dtype or x.dtype)
    if compute not in native.DTYPES:
        raise TypeError(f"oneDNN conv computes in float32 or bfloat16, not {compute}")
    if bias is None:
        bias = jnp.zeros((kernel.shape[-1],), jnp.float32)
    return _conv2d(x, kernel, bias, strides, pads, compute, bool(relu))


def conv2d_add(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    residual: jax.Array,
    strides: tuple[int, int],
    pads: Pads,
    compute_dtype: Any = None,
    relu: bool = False,
) -> jax.Array:
    """`conv2d(x, kernel, strides, pads, compute_dtype, bias) + residual`, then a ReLU if `relu`,
    as one oneDNN kernel (a sum post-op on the float32 sums, one rounding): a ResNet block's
    last convolution at inference, its BatchNorm folded in. `residual` has the result's shape;
    XLA hands its buffer to the kernel as the output. Not differentiable (inference only).
    """
    compute = jnp.dtype(compute_dtype or x.dtype)
    if compute not in native.DTYPES:
        raise TypeError(f"oneDNN conv computes in float32 or bfloat16, not {compute}")
    xc, kc = x.astype(compute), kernel.astype(compute)
    out = jax.ShapeDtypeStruct(_out_shape(xc, kc, strides, pads), _written(x.dtype, compute))
    if residual.shape != out.shape:
        raise ValueError(f"residual {residual.shape} is not the output's shape {out.shape}")
    y = _call(
        "forward_add",
        out,
        xc,
        kc,
        bias.astype(jnp.float32),
        residual.astype(out.dtype),
        strides=strides,
        pads=pads,
        aliases={3: 0},
        relu=relu,
    )
    return y.astype(x.dtype)


def packed_kernel_bytes(
    kernel_shape: tuple[int, ...],
    in_hw: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
    compute_dtype: Any,
    relu: bool,
) -> int:
    """The size in bytes of `pack_kernel`'s result for these arguments."""
    (pt, pb), (pl, pr) = pads
    kh, kw, cin, cout = kernel_shape
    geometry = (PACK_BATCH, *in_hw, cin, kh, kw, cout, *strides, pt, pb, pl, pr)
    fn = native.library().affect_jax_conv_packed_bytes
    fn.restype = ctypes.c_int64
    size = fn(
        (ctypes.c_int64 * len(geometry))(*map(int, geometry)),
        ctypes.c_int(jnp.dtype(compute_dtype) == jnp.bfloat16),
        ctypes.c_int(bool(relu)),
    )
    if size < 0:
        raise ValueError(f"oneDNN has no convolution for kernel {kernel_shape} on {in_hw} inputs")
    return int(size)


def pack_kernel(
    kernel: jax.Array,
    in_hw: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
    compute_dtype: Any,
    relu: bool = True,
) -> jax.Array:
    """The HWIO `kernel`, in `compute_dtype`, reordered into the layout oneDNN's inference kernel
    wants for a `PACK_BATCH` x `in_hw` input (and `relu`): a uint8 vector for `conv2d_packed`,
    which also runs correctly (one reorder) on other batch or image sizes."""
    compute = jnp.dtype(compute_dtype)
    if compute not in native.DTYPES:
        raise TypeError(f"oneDNN conv computes in float32 or bfloat16, not {compute}")
    size = packed_kernel_bytes(kernel.shape, in_hw, strides, pads, compute, relu)
    return _call(
        "pack",
        jax.ShapeDtypeStruct((size,), jnp.uint8),
        kernel.astype(compute),
        strides=strides,
        pads=pads,
        batch=PACK_BATCH,
        height=in_hw[0],
        width=in_hw[1],
        relu=relu,
    )


def conv2d_packed(
    x: jax.Array,
    packed: jax.Array,
    kernel_shape: tuple[int, ...],
    bias: jax.Array,
    strides: tuple[int, int],
    pads: Pads,
    compute_dtype: Any,
    relu: bool = False,
    residual: jax.Array | None = None,
) -> jax.Array:
    """`conv2d` (or `conv2d_add` with `residual`) on a kernel of `kernel_shape` (HWIO) that
    `pack_kernel` (or, float32 3x3 stride 1, `winograd.pack_kernel`) packed with the same
    strides, padding and `compute_dtype`; the forward kernel runs the algorithm it was packed
    for. Inference only."""
    compute = jnp.dtype(compute_dtype)
    xc = x.astype(compute)
    out = jax.ShapeDtypeStruct(
        _out_shape(xc, jax.ShapeDtypeStruct(kernel_shape, compute), strides, pads),
        _written(x.dtype, compute),
    )
    operands = [xc, packed, bias.astype(jnp.float32)]
    if residual is not None:
        if residual.shape != out.shape:
            raise ValueError(f"residual {residual.shape} is not the output's shape {out.shape}")
        operands.append(residual.astype(out.dtype))
    y = _call(
        "forward" if residual is None else "forward_add",
        out,
        *operands,
        strides=strides,
        pads=pads,
        aliases=None if residual is None else {3: 0},
        relu=relu,
    )
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv2d(x, kernel, bias, strides, pads, compute, relu):
    xc, kc = x.astype(compute), kernel.astype(compute)
    out = jax.ShapeDtypeStruct(_out_shape(xc, kc, strides, pads), _written(x.dtype, compute))
    y = _call(
        "forward", out, xc, kc, bias.astype(jnp.float32), strides=strides, pads=pads, relu=relu
    )
    return y.astype(x.dtype)


def _conv2d_fwd(x, kernel, bias, strides, pads, compute, relu):
    xc = x.astype(compute)  # saved in the compute dtype: half the memory for bfloat16
    y = _conv2d(x, kernel, bias, strides, pads, compute, relu)
    if not relu:
        return y, (xc, kernel, bias)
    # The ReLU's mask is y > 0, read from y in the compute dtype: the same value (and, after
    # XLA's common-subexpression elimination, the same buffer) a following convolution saves
    # as its input. Rounding to bfloat16 keeps the sign of every normal float32 (bfloat16 has
    # float32's exponent range).
    return y, (xc, kernel, bias, y.astype(compute))


def _conv2d_bwd(strides, pads, compute, relu, residuals, dy):
    xc, kernel, bias = residuals[:3]
    if relu:
        dy = jnp.where(residuals[3] > 0, dy, jnp.zeros((), dy.dtype))
    kc, dyc = kernel.astype(compute), dy.astype(compute)
    dx = _call(
        "backward_data",
        jax.ShapeDtypeStruct(xc.shape, compute),
        dyc,
        kc,
        strides=strides,
        pads=pads,
    )
    dw, db = _call(
        "backward_weights",
        (
            jax.ShapeDtypeStruct(kc.shape, _written(kernel.dtype, compute)),
            jax.ShapeDtypeStruct(bias.shape, jnp.float32),
        ),
        xc,
        dyc,
        strides=strides,
        pads=pads,
    )
    return dx.astype(dy.dtype), dw.astype(kernel.dtype), db.astype(bias.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
