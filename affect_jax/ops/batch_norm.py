"""Training-mode BatchNorm as one function with a hand-written gradient.

Autodiff of `nnx.BatchNorm`'s two-pass statistics leaves XLA:CPU several extra full passes over
each activation (materialised x - mean, separate reductions for every gradient term); BatchNorm
is most of a ResNet50 train step's time outside the convolutions. Here the forward pass is
mean, variance (two-pass, as Keras), normalise; the backward pass the reductions of dy and
dy * x_hat and one elementwise pass: the textbook minimum. Statistics and arithmetic are
float32 whatever the activation dtype.

Two paths compute it (`impl`): ``'xla'``, the jnp code here, and ``'native'``, the C++ kernels
of `batch_norm.cc` (in the extension, `ops.native`), which make that minimum in memory passes
too: XLA:CPU writes each reduction's float32 input to memory first. ``'auto'`` picks 'native'
for float32 and bfloat16 activations where `native.applies`, else 'xla'. The native
path also fuses a ResNet block's residual sum and ReLU into the BatchNorm
(`BatchNorm(..., residual=)`), which saves time and temporary memory (docs/performance.md).

(oneDNN's batch-normalization kernels through the same custom-call route were a little faster
on the ResNet50 step but their float32 gradients left the Keras train-step parity at 4e-3
instead of 2e-5, so they are not used: docs/performance.md.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affect_jax.ops import native

IMPLS = native.IMPLS
# The FFI targets of batch_norm.cc: direction -> target name.
TARGETS = {
    "forward": "affect_jax_batch_norm_forward",
    "backward": "affect_jax_batch_norm_backward",
    "forward_add": "affect_jax_batch_norm_add_forward",
    "backward_add": "affect_jax_batch_norm_add_backward",
}
native.register_targets(
    {
        TARGETS["forward"]: "AffectJaxBatchNormForward",
        TARGETS["backward"]: "AffectJaxBatchNormBackward",
        TARGETS["forward_add"]: "AffectJaxBatchNormAddForward",
        TARGETS["backward_add"]: "AffectJaxBatchNormAddBackward",
    }
)


def resolve_impl(impl: str, dtype: Any = jnp.float32) -> str:
    """Validates `impl`; maps 'auto' to the path for activations of `dtype` (the native kernels
    take float32 and bfloat16)."""
    return native.resolve_impl("batch_norm", impl, dtype)


def _axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _forward(x, scale, bias, epsilon, relu):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, _axes(x))
    var = jnp.mean(jnp.square(x32 - mean), _axes(x))  # two-pass: exact for large means
    inv = jax.lax.rsqrt(var + epsilon)
    y = _normalise(x32, mean, scale * inv, bias)
    if relu:
        y = jnp.maximum(y, 0.0)
    return y.astype(x.dtype), mean, var, inv


def _normalise(x32, mean, scale_inv, bias):
    return (x32 - mean) * scale_inv + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises `x` [..., C] over all but the last axis: (y, batch mean, biased variance).

    With `relu`, y is the ReLU of the normalised `x`, and the backward pass recomputes the
    ReLU's mask from `x` (which it reads anyway) instead of keeping the pre-ReLU activation:
    one float32 activation less in memory and one pass less per layer. Gradients flow through
    `y` only; the statistics are for running averages (callers must not differentiate
    through them).
    """
    y, mean, var, _ = _forward(x, scale, bias, epsilon, relu)
    return y, mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon, relu):
    y, mean, var, inv = _forward(x, scale, bias, epsilon, relu)
    return (y, mean, var), (x, mean, inv, scale, bias)


def _batch_norm_train_bwd(epsilon, relu, residuals, cotangents):
    del epsilon
    x, mean, inv, scale, bias = residuals
    x32 = x.astype(jnp.float32)
    dy = cotangents[0].astype(jnp.float32)
    if relu:  # The forward's expression, so the mask is bit-identical.
        dy = jnp.where(_normalise(x32, mean, scale * inv, bias) > 0, dy, 0.0)
    x_hat = (x32 - mean) * inv
    n = math.prod(x.shape[:-1])
    sum_dy = jnp.sum(dy, _axes(x))
    sum_dy_x_hat = jnp.sum(dy * x_hat, _axes(x))
    dx = (scale * inv / n) * (n * dy - sum_dy - x_hat * sum_dy_x_hat)
    return dx.astype(x.dtype), sum_dy_x_hat, sum_dy


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _native_call(direction: str, out: Any, *operands: jax.Array, **attrs: Any) -> Any:
    return native.call_kernel("BatchNorm", TARGETS[direction], out, *operands, **attrs)


def _rows(a: jax.Array) -> jax.Array:
    return a.reshape(-1, a.shape[-1])


def _native_forward(x, scale, bias, epsilon, relu, residual):
    channel = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    out = (jax.ShapeDtypeStruct(_rows(x).shape, x.dtype), channel, channel, channel)
    inputs = (_rows(x),) if residual is None else (_rows(x), _rows(residual))
    y, mean, var, inv = _native_call(
        "forward" if residual is None else "forward_add",
        out,
        *inputs,
        scale,
        bias,
        epsilon=np.float32(epsilon),
        relu=np.int64(relu),
    )
    return y.reshape(x.shape), mean, var, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def native_batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
    relu: bool = False,
    residual: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`batch_norm_train` by the C++ kernels: `x` float32 or bfloat16, `scale`/`bias` float32.

    With `residual` (x's shape and dtype) y is the BatchNorm of `x` plus `residual`, then the
    ReLU if `relu` (a ResNet block's output), rounded once. Sums are accumulated in float64
    (statistics at least as exact as the two-pass float32 ones); the rest is the same float32
    arithmetic.
    """
    if x.dtype not in native.DTYPES or scale.dtype != jnp.float32 or bias.dtype != jnp.float32:
        raise TypeError(
            f"native BatchNorm takes float32/bfloat16 x and float32 scale and bias, "
            f"got {x.dtype}, {scale.dtype}, {bias.dtype}"
        )
    if residual is not None and (residual.shape, residual.dtype) != (x.shape, x.dtype):
        raise TypeError(
            f"native BatchNorm: residual must have x's shape and dtype "
            f"{x.shape} {x.dtype}, got {residual.shape} {residual.dtype}"
        )
    y, mean, var, _ = _native_forward(x, scale, bias, epsilon, relu, residual)
    return y, mean, var


def _native_fwd(x, scale, bias, epsilon, relu, residual):
    y, mean, var, inv = _native_forward(x, scale, bias, epsilon, relu, residual)
    return (y, mean, var), (x, mean, inv, scale, bias, residual)


def _native_bwd(epsilon, relu, saved, cotangents):
    del epsilon
    x, mean, inv, scale, bias, residual = saved
    dy = _rows(cotangents[0].astype(x.dtype))
    channel = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    rows = jax.ShapeDtypeStruct(dy.shape, x.dtype)
    if residual is None:
        dx, dscale, dbias = _native_call(
            "backward",
            (rows, channel, channel),
            _rows(x),
            dy,
            mean,
            inv,
            scale,
            bias,
            relu=np.int64(relu),
        )
        return dx.reshape(x.shape), dscale, dbias, None
    dx, dres, dscale, dbias = _native_call(
        "backward_add",
        (rows, rows, channel, channel),
        _rows(x),
        _rows(residual),
        dy,
        mean,
        inv,
        scale,
        bias,
        relu=np.int64(relu),
    )
    return dx.reshape(x.shape), dscale, dbias, dres.reshape(x.shape)


native_batch_norm_train.defvjp(_native_fwd, _native_bwd)


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` (same parameters, statistics and results) with `batch_norm_train`.

    For the plain case (last-axis features, scale and bias, no mask, no named-axis reduction,
    two-pass variance) it computes in float32 in both modes and returns `dtype` (so bfloat16
    activations are normalised as Keras's mixed precision does), in training mode by the
    `impl` path (`IMPLS`); every other case is `nnx.BatchNorm`'s own code.
    """

    def __init__(self, num_features: int, *, impl: str = "auto", **kwargs: Any):
        resolve_impl(impl)  # validate early
        super().__init__(num_features, **kwargs)
        self.impl = impl

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: Any = None,
        relu: bool = False,
        residual: jax.Array | None = None,
    ) -> jax.Array:
        """As `nnx.BatchNorm`; then `residual` is added to the result and `relu` applies a
        ReLU (a ResNet block's `relu(shortcut + bn(x))`; fused in training mode, and with the
        native kernels the sum is rounded to `dtype` once instead of twice)."""
        ura = self.use_running_average if use_running_average is None else use_running_average
        plain = (
            mask is None
            and self.axis_name is None
            and self.axis in (-1, x.ndim - 1)
            and self.scale is not None
            and self.bias is not None
            and not self.use_fast_variance
        )
        if not plain:
            return _add_relu(
                super().__call__(x, use_running_average=ura, mask=mask), residual, relu
            )
        dtype = self.dtype or x.dtype
        scale, bias = self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
        if ura:
            inv = jax.lax.rsqrt(self.var[...] + self.epsilon)
            y = _normalise(x.astype(jnp.float32), self.mean[...], scale * inv, bias)
            if residual is None:
                return (jax.nn.relu(y) if relu else y).astype(dtype)
            return _add_relu(y.astype(dtype), residual, relu)
        x = x.astype(dtype)
        if resolve_impl(self.impl, x.dtype) == "native":
            res = None if residual is None else residual.astype(dtype)
            y, mean, var = native_batch_norm_train(x, scale, bias, self.epsilon, relu, res)
        else:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, relu and residual is None)
            if residual is not None:
                y = _add_relu(y, residual, relu)
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y


def _add_relu(y: jax.Array, residual: jax.Array | None, relu: bool) -> jax.Array:
    if residual is not None:
        y = residual + y
    return jax.nn.relu(y) if relu else y
