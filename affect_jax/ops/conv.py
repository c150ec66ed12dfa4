"""2-D convolution by the fastest correct path on this backend.

`impl` (config.conv_impl) is one of `IMPLS`:

* ``'xla'``: plain `lax.conv_general_dilated`.
* ``'native'``: the extension's kernels (`ops.native`; CPU only, no partitioning rule):
  oneDNN's direct convolutions (`ops.onednn_conv`; AVX-512 float32, AMX bfloat16) for the
  forward pass and both gradients, except the float32 3x3 stride-1 convolutions where Winograd's
  F(4x4, 3x3) is faster (`winograd.preferred`: large enough outputs, more than a few input
  channels), which `ops.winograd` computes with a quarter of the multiply-adds and the same
  result to float32 rounding.
* ``'auto'``: on CPU 'native' where `native.applies` (extension available, one device per
  process), else XLA with the 1x1 convolutions as matrix products; 'xla' on other backends.

Each resolves to one of `PATHS`, the kernels that run: ``'xla'``; ``'dot1x1'`` (1x1
convolutions as a strided slice + dot, which XLA:CPU runs far faster than its convolution
kernels, above all the weight gradient; others as 'xla'); ``'onednn'`` (oneDNN's direct
convolutions only) and ``'winograd'`` ('onednn' plus Winograd where preferred: what 'native'
is). Tests and scripts/benchmark.py pin a path (`pin_path`); users choose an impl.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from affect_jax.ops import native, onednn_conv, winograd

IMPLS = native.IMPLS
PATHS = ("xla", "dot1x1", "onednn", "winograd")
Padding = str | Sequence[tuple[int, int]]
_DN = ("NHWC", "HWIO", "NHWC")
_EXTENSION_PATHS = ("onednn", "winograd")


def resolve_impl(impl: str) -> str:
    """The path (one of `PATHS`) that runs convolutions of `impl` (one of `IMPLS`, or a path
    pinned by a test or the benchmark) on the default backend."""
    if impl not in PATHS:
        native.check_impl("conv impl", impl)
    if impl in ("native", *_EXTENSION_PATHS) and not native.available():
        raise ValueError(
            f"conv impl {impl!r} is unavailable: {native.unavailable_reason()}; "
            "use 'auto' to fall back to XLA's convolutions"
        )
    if impl == "native":
        return "winograd"
    if impl != "auto":
        return impl
    # On GPU/TPU XLA's own convolutions win (docs/performance.md).
    if jax.default_backend() != "cpu":
        return "xla"
    return "winograd" if native.applies() else "dot1x1"


def pin_path(model: nnx.Module, path: str) -> None:
    """Makes every `Conv` in `model` run `path` (one of `PATHS`) whatever its impl: a lever
    for tests and the benchmark, e.g. oneDNN's direct convolutions without Winograd."""
    if path not in PATHS:
        raise ValueError(f"conv path must be one of {PATHS}, got {path!r}")
    resolve_impl(path)  # available?
    for _, module in model.iter_modules():
        if isinstance(module, Conv):
            module.impl = path


def explicit_padding(
    padding: Padding,
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """'SAME'/'VALID'/explicit pairs -> ((top, bottom), (left, right)) as lax computes them."""
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2:
        raise ValueError(f"padding needs 2 (low, high) pairs, got {padding!r}")
    return pads  # type: ignore[return-value]


def _xla_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)


def _out_hw(
    in_hw: tuple[int, int],
    k: tuple[int, int],
    s: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (n + lo + hi - kk) // ss + 1 for n, kk, ss, (lo, hi) in zip(in_hw, k, s, pads, strict=True)
    )


def _conv1x1_as_dot(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """A 1x1 convolution as the padded input's strided slice [B, Ho, Wo, C] @ kernel [C, O]."""
    ho, wo = _out_hw(x.shape[1:3], (1, 1), strides, pads)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    cols = xp[
        :, : strides[0] * (ho - 1) + 1 : strides[0], : strides[1] * (wo - 1) + 1 : strides[1], :
    ]
    _, _, cin, cout = kernel.shape
    return jax.lax.dot_general(cols, kernel.reshape(cin, cout), (((3,), (0,)), ((), ())))


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Padding = "VALID",
    impl: str = "xla",
    compute_dtype: Any = None,
    bias: jax.Array | None = None,
    relu: bool = False,
    residual: jax.Array | None = None,
) -> jax.Array:
    """NHWC x HWIO convolution (no dilation, no groups) by `impl` (`IMPLS`, or a `PATHS`).

    Every path computes the same function and gradients as `lax.conv_general_dilated`
    (tests/test_ops.py); they differ only in which kernels run it. The result has `x`'s dtype;
    `compute_dtype` (default: `x`'s) is the dtype the convolution runs in; `bias` [O] is added,
    then `residual` (the result's shape; inference only on the extension's path), then
    `jax.nn.relu` applied if `relu` (all fused into the extension's convolution kernels).
    """
    impl = resolve_impl(impl)
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv2d needs NHWC x and HWIO kernel, got {x.shape} and {kernel.shape}")
    s = (int(strides[0]), int(strides[1]))
    k = (int(kernel.shape[0]), int(kernel.shape[1]))
    pads = explicit_padding(padding, tuple(x.shape[1:3]), k, s)
    if impl == "winograd" and winograd.preferred(
        x.shape, kernel.shape, s, pads, compute_dtype or x.dtype
    ):
        if residual is None:
            return winograd.conv3x3(x, kernel, bias, pads, relu)
        y = winograd.conv3x3(x, kernel, bias, pads, False) + residual.astype(x.dtype)
        return jax.nn.relu(y) if relu else y
    if impl in _EXTENSION_PATHS:  # adds the bias and applies the ReLU in its kernel
        if residual is not None:
            if bias is None:
                bias = jnp.zeros((kernel.shape[-1],), jnp.float32)
            return onednn_conv.conv2d_add(x, kernel, bias, residual, s, pads, compute_dtype, relu)
        return onednn_conv.conv2d(x, kernel, s, pads, compute_dtype, bias, relu)
    out_dtype = x.dtype
    if compute_dtype is not None:
        x, kernel = x.astype(compute_dtype), kernel.astype(compute_dtype)
    if impl == "dot1x1" and k == (1, 1):
        y = _conv1x1_as_dot(x, kernel, s, pads)
    else:
        y = _xla_conv(x, kernel, s, pads)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if residual is not None:
        y = y + residual.astype(y.dtype)
    if relu:
        y = jax.nn.relu(y)
    return y.astype(out_dtype)


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
        padding: Padding = "SAME",
        use_bias: bool = True,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Any = _DEFAULT_KERNEL_INIT,
        bias_init: Any = _DEFAULT_BIAS_INIT,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        resolve_impl(impl)  # validate early
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.strides = tuple(int(s) for s in strides)
        self.padding = padding
        self.dtype = dtype
        self.impl = impl
        shape = (*self.kernel_size, in_features, out_features)
        self.kernel_shape = shape
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )

    def pack_for_inference(self, in_hw: tuple[int, int]) -> None:
        """Replaces the kernel, in place, by its copy packed for the extension's inference
        kernel on inputs of spatial size `in_hw` (`onednn_conv.pack_kernel`, or
        `winograd.pack_kernel` where Winograd runs this convolution) when it runs on the
        extension; otherwise leaves it. A packed layer is for inference only: it no longer has
        an HWIO kernel to differentiate or save."""
        path = resolve_impl(self.impl)
        kernel = self.kernel[...]
        if path not in _EXTENSION_PATHS or self.dtype is None or kernel.ndim != 4:
            return
        compute = jnp.dtype(self.dtype)
        if compute not in native.DTYPES:
            return
        pads = explicit_padding(self.padding, in_hw, self.kernel_size, self.strides)
        x_shape = (onednn_conv.PACK_BATCH, *in_hw, self.kernel_shape[2])
        if path == "winograd" and winograd.preferred(
            x_shape, kernel.shape, self.strides, pads, compute
        ):
            packed = winograd.pack_kernel(kernel, in_hw, pads, onednn_conv.PACK_BATCH)
        else:
            packed = onednn_conv.pack_kernel(kernel, in_hw, self.strides, pads, compute)
        self.kernel.value = packed

    def __call__(
        self,
        x: jax.Array,
        *,
        relu: bool = False,
        stop_bias_gradient: bool = False,
        residual: jax.Array | None = None,
    ) -> jax.Array:
        """`relu`: return `jax.nn.relu` of the result (one kernel on the native path).
        `stop_bias_gradient`: the bias gets an exactly zero gradient (for a caller that knows
        its effect cancels, e.g. before a BatchNorm that normalises with batch statistics).
        `residual`: added before the ReLU (`conv2d`; inference only on the native path)."""
        kernel = self.kernel[...]
        if kernel.ndim == 1:  # packed by pack_for_inference
            s = self.strides
            pads = explicit_padding(self.padding, tuple(x.shape[1:3]), self.kernel_size, s)
            bias = self.bias[...] if self.bias is not None else None
            if bias is None:
                bias = jnp.zeros((self.kernel_shape[-1],), jnp.float32)
            return onednn_conv.conv2d_packed(
                x, kernel, self.kernel_shape, bias, s, pads, self.dtype, relu, residual
            )
        dtype = self.dtype or jnp.result_type(x, kernel)
        # conv2d casts to `dtype` inside (oneDNN inside its custom VJP), so float32
        # activations around a bfloat16 convolution get float32 gradients.
        bias = self.bias[...] if self.bias is not None else None
        if bias is not None and stop_bias_gradient:
            bias = jax.lax.stop_gradient(bias)
        return conv2d(
            x,
            kernel,
            self.strides,
            self.padding,
            self.impl,
            compute_dtype=dtype,
            bias=bias,
            relu=relu,
            residual=residual,
        )
