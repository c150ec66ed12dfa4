"""2-D convolution with faster CPU paths than XLA's own convolution kernels.

XLA:CPU (jaxlib 0.10) runs its plain matrix product at ~200 GFLOP/s on this class of machine but
its convolutions far slower, the weight gradient worst of all (10-25 GFLOP/s for a 1x1 conv,
docs/performance.md). A 1x1 convolution *is* a matrix product over batch*height*width, and a
kxk convolution's weight gradient is one over the im2col patches; the paths here express them
as `dot_general` so that XLA's matmul kernels run them.

`impl` values of `conv2d` (and `Conv`):

* ``'xla'``: plain `lax.conv_general_dilated` (reference).
* ``'dot1x1'``: 1x1 convolutions as a strided slice + dot; others as 'xla'.
* ``'dot'``: 'dot1x1', plus kxk convolutions with XLA's forward and input gradient but the
  weight gradient as one patches^T @ dy matrix product (custom VJP).
* ``'im2col'``: every convolution as patches @ kernel (forward, and both gradients as dots).
* ``'onednn'``: every convolution (forward and both gradients) by oneDNN through an XLA FFI
  custom call (`ops.onednn`; AVX-512 float32, AMX bfloat16). CPU only; one device per process.
* ``'winograd'``: 'onednn', except float32 3x3 stride-1 convolutions whose output is at least
  `winograd.MIN_OUTPUT_SIZE` wide and high and whose input has at least
  `winograd.MIN_IN_CHANNELS` channels: those by Winograd's F(4x4, 3x3) (`ops.winograd`; a
  quarter of the multiply-adds, the same result to float32 rounding; VGG16's float32 train
  step 1.95x 'onednn'). bfloat16 convolutions are 'onednn''s.
* ``'auto'``: the fastest correct path on this backend: on CPU 'winograd' when the extension
  is available and the process has one device, else 'dot1x1' (ResNet50 train step 1.5-2.2x
  'xla'; 'dot' and 'im2col' add ~1.5 GB for no reliable gain); 'xla' elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from affect_jax.ops import onednn, winograd

IMPLS = ('auto', 'xla', 'dot1x1', 'dot', 'im2col', 'onednn', 'winograd')
Padding = str | Sequence[tuple[int, int]]
_DN = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str) -> str:
    """Maps 'auto' to the fastest measured path for the default backend."""
    if impl not in IMPLS:
        raise ValueError(f'conv impl must be one of {IMPLS}, got {impl!r}')
    if impl in ('onednn', 'winograd') and not onednn.available():
        raise ValueError(f'conv impl {impl!r} is unavailable: {onednn.unavailable_reason()}; '
                         "use 'auto' to fall back to XLA's convolutions")
    if impl != 'auto':
        return impl
    # The winners of scripts/benchmark.py on XLA:CPU (docs/performance.md); on GPU/TPU XLA's
    # own convolutions win. The custom call has no partitioning rule, so with several devices
    # XLA would gather the batch onto each: there 'dot1x1' is faster.
    if jax.default_backend() != 'cpu':
        return 'xla'
    return 'winograd' if onednn.available() and jax.device_count() == 1 else 'dot1x1'


def explicit_padding(
    padding: Padding, in_hw: tuple[int, int], kernel_hw: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """'SAME'/'VALID'/explicit pairs -> ((top, bottom), (left, right)) as lax computes them."""
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2:
        raise ValueError(f'padding needs 2 (low, high) pairs, got {padding!r}')
    return pads  # type: ignore[return-value]


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)


def _out_hw(in_hw: tuple[int, int], k: tuple[int, int], s: tuple[int, int],
            pads: tuple[tuple[int, int], tuple[int, int]]) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (n + lo + hi - kk) // ss + 1 for n, kk, ss, (lo, hi) in zip(in_hw, k, s, pads, strict=True)
    )


def _patches(x: jax.Array, k: tuple[int, int], s: tuple[int, int],
             pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """im2col: [B, Ho, Wo, kh*kw*C] with (kh, kw, C) order, matching an HWIO kernel reshape."""
    ho, wo = _out_hw(x.shape[1:3], k, s, pads)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    cols = [
        xp[:, i:i + s[0] * (ho - 1) + 1:s[0], j:j + s[1] * (wo - 1) + 1:s[1], :]
        for i in range(k[0]) for j in range(k[1])
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _dot_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Convolution as patches @ kernel; autodiff gives dots (and a col2im for dx)."""
    kh, kw, cin, cout = kernel.shape
    p = _patches(x, (kh, kw), strides, pads)
    return jax.lax.dot_general(p, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_dot_wgrad(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                    pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    return _xla_conv(x, kernel, strides, pads)


def _cdw_fwd(x, kernel, strides, pads):
    return _xla_conv(x, kernel, strides, pads), (x, kernel)


def _cdw_bwd(strides, pads, res, dy):
    x, kernel = res
    # Input gradient: XLA's transposed convolution (about as fast as its forward conv).
    _, vjp_x = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, pads), x)
    (dx,) = vjp_x(dy)
    # Weight gradient: one matrix product over batch*height*width (XLA's conv wgrad is slow).
    kh, kw, cin, cout = kernel.shape
    p = _patches(x, (kh, kw), strides, pads)
    dw = jax.lax.dot_general(p, dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return dx, dw.reshape(kernel.shape).astype(kernel.dtype)


_conv_dot_wgrad.defvjp(_cdw_fwd, _cdw_bwd)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Padding = 'VALID',
    impl: str = 'xla',
    compute_dtype: Any = None,
    bias: jax.Array | None = None,
    relu: bool = False,
) -> jax.Array:
    """NHWC x HWIO convolution (no dilation, no groups) through the chosen `impl` path.

    Every path computes the same function and gradients as `lax.conv_general_dilated`
    (tests/test_ops.py); they differ only in which kernels run it. The result has `x`'s dtype;
    `compute_dtype` (default: `x`'s) is the dtype the convolution runs in; `bias` [O] is added,
    then `jax.nn.relu` applied if `relu` (fused into the convolution on the 'onednn' path).
    """
    impl = resolve_impl(impl)
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f'conv2d needs NHWC x and HWIO kernel, got {x.shape} and {kernel.shape}')
    s = (int(strides[0]), int(strides[1]))
    k = (int(kernel.shape[0]), int(kernel.shape[1]))
    pads = explicit_padding(padding, tuple(x.shape[1:3]), k, s)
    if impl == 'winograd' and winograd.preferred(x.shape, kernel.shape, s, pads,
                                                 compute_dtype or x.dtype):
        return winograd.conv3x3(x, kernel, bias, pads, relu)
    if impl in ('onednn', 'winograd'):  # adds the bias and applies the ReLU in its kernel
        return onednn.conv2d(x, kernel, s, pads, compute_dtype, bias, relu)
    out_dtype = x.dtype
    if compute_dtype is not None:
        x, kernel = x.astype(compute_dtype), kernel.astype(compute_dtype)
    y = _conv_xla_paths(x, kernel, s, pads, k, impl)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if relu:
        y = jax.nn.relu(y)
    return y.astype(out_dtype)


def _conv_xla_paths(x: jax.Array, kernel: jax.Array, s: tuple[int, int],
                    pads: tuple[tuple[int, int], tuple[int, int]], k: tuple[int, int],
                    impl: str) -> jax.Array:
    if impl == 'xla':
        return _xla_conv(x, kernel, s, pads)
    if k == (1, 1) or impl == 'im2col':
        return _dot_conv(x, kernel, s, pads)
    if impl == 'dot':
        return _conv_dot_wgrad(x, kernel, s, pads)
    return _xla_conv(x, kernel, s, pads)  # 'dot1x1' on a kxk kernel


_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()  # nnx.Conv's defaults
_DEFAULT_BIAS_INIT = nnx.initializers.zeros_init()


class Conv(nnx.Module):
    """Drop-in for the `nnx.Conv` uses in this package: same `kernel` (HWIO) and `bias` params.

    Only what the backbones need: 2-D, no dilation, no feature groups. The convolution computes
    in `dtype` (compute dtype) as `nnx.Conv`'s does, but its result keeps the input's dtype, so
    float32 activations can surround a bfloat16 convolution; parameters stay `param_dtype`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        strides: Sequence[int] = (1, 1),
        padding: Padding = 'SAME',
        use_bias: bool = True,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Any = _DEFAULT_KERNEL_INIT,
        bias_init: Any = _DEFAULT_BIAS_INIT,
        impl: str = 'auto',
        rngs: nnx.Rngs,
    ):
        resolve_impl(impl)  # validate early
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.strides = tuple(int(s) for s in strides)
        self.padding = padding
        self.dtype = dtype
        self.impl = impl
        shape = (*self.kernel_size, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias
            else None
        )

    def __call__(self, x: jax.Array, *, relu: bool = False,
                 stop_bias_gradient: bool = False) -> jax.Array:
        """`relu`: return `jax.nn.relu` of the result (one kernel on the oneDNN path).
        `stop_bias_gradient`: the bias gets an exactly zero gradient (for a caller that knows
        its effect cancels, e.g. before a BatchNorm that normalises with batch statistics)."""
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        # conv2d casts to `dtype` inside (oneDNN inside its custom VJP), so float32
        # activations around a bfloat16 convolution get float32 gradients.
        bias = self.bias[...] if self.bias is not None else None
        if bias is not None and stop_bias_gradient:
            bias = jax.lax.stop_gradient(bias)
        return conv2d(x, kernel, self.strides, self.padding, self.impl, compute_dtype=dtype,
                      bias=bias, relu=relu)
