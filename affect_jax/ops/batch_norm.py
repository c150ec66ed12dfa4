"""Training-mode BatchNorm as one function with a hand-written gradient.

Autodiff of `nnx.BatchNorm`'s two-pass statistics leaves XLA:CPU several extra full passes over
each activation (materialised x - mean, separate reductions for every gradient term); BatchNorm
is most of a ResNet50 train step's time outside the convolutions. Here the forward pass is
mean, variance (two-pass, as Keras), normalise; the backward pass the reductions of dy and
dy * x_hat and one elementwise pass: the textbook minimum. Statistics and arithmetic are
float32 whatever the activation dtype. `impl='onednn'` runs both passes as oneDNN's
batch-normalization kernels (`ops.onednn`), `impl='xla'` as the jnp code below.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from affect_jax.ops import onednn

IMPLS = ('xla', 'onednn')


def _axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _forward(x, scale, bias, epsilon, impl):
    if impl == 'onednn':
        y, mean, var = onednn.batch_norm_forward(x, scale, bias, epsilon)
        return y, mean, var, jax.lax.rsqrt(var + epsilon)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, _axes(x))
    var = jnp.mean(jnp.square(x32 - mean), _axes(x))  # two-pass: exact for large means
    inv = jax.lax.rsqrt(var + epsilon)
    y = ((x32 - mean) * (scale * inv) + bias).astype(x.dtype)
    return y, mean, var, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     impl: str = 'xla') -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises `x` [..., C] over all but the last axis: (y, batch mean, biased variance).

    Gradients flow through `y` only; the statistics are for running averages (callers must
    not differentiate through them). `impl='onednn'` needs NHWC float32/bfloat16 `x`.
    """
    y, mean, var, _ = _forward(x, scale, bias, epsilon, impl)
    return y, mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon, impl):
    y, mean, var, inv = _forward(x, scale, bias, epsilon, impl)
    return (y, mean, var), (x, mean, var, inv, scale)


def _batch_norm_train_bwd(epsilon, impl, residuals, cotangents):
    x, mean, var, inv, scale = residuals
    if impl == 'onednn':
        return onednn.batch_norm_backward(x, cotangents[0], mean, var, scale, epsilon)
    dy = cotangents[0].astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - mean) * inv
    n = math.prod(x.shape[:-1])
    sum_dy = jnp.sum(dy, _axes(x))
    sum_dy_x_hat = jnp.sum(dy * x_hat, _axes(x))
    dx = (scale * inv / n) * (n * dy - sum_dy - x_hat * sum_dy_x_hat)
    return dx.astype(x.dtype), sum_dy_x_hat, sum_dy


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` (same parameters, statistics and results) with `batch_norm_train`.

    Used in training mode for the plain case (last-axis features, scale and bias, no mask, no
    named-axis reduction, two-pass variance); every other case is `nnx.BatchNorm`'s own code.
    `impl` ('xla' or 'onednn', keyword-only) picks `batch_norm_train`'s kernels; 'onednn'
    applies to 4-D inputs.
    """

    def __init__(self, *args: Any, impl: str = 'xla', **kwargs: Any):
        if impl not in IMPLS:
            raise ValueError(f'BatchNorm impl must be one of {IMPLS}, got {impl!r}')
        super().__init__(*args, **kwargs)
        self.impl = impl

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: Any = None) -> jax.Array:
        ura = self.use_running_average if use_running_average is None else use_running_average
        plain = (mask is None and self.axis_name is None and self.axis in (-1, x.ndim - 1)
                 and self.scale is not None and self.bias is not None
                 and not self.use_fast_variance)
        if ura or not plain:
            return super().__call__(x, use_running_average=ura, mask=mask)
        dtype = self.dtype or x.dtype
        impl = self.impl if x.ndim == 4 else 'xla'
        y, mean, var = batch_norm_train(x.astype(dtype), self.scale[...].astype(jnp.float32),
                                        self.bias[...].astype(jnp.float32), self.epsilon, impl)
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y
