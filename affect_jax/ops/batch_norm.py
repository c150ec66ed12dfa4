"""Training-mode BatchNorm as one function with a hand-written gradient.

Autodiff of `nnx.BatchNorm`'s two-pass statistics leaves XLA:CPU several extra full passes over
each activation (materialised x - mean, separate reductions for every gradient term); BatchNorm
is most of a ResNet50 train step's time outside the convolutions. Here the forward pass is
mean, variance (two-pass, as Keras), normalise; the backward pass the reductions of dy and
dy * x_hat and one elementwise pass: the textbook minimum. Statistics and arithmetic are
float32 whatever the activation dtype.

(oneDNN's batch-normalization kernels through the same custom-call route were measured 5-7%
faster on the ResNet50 step but their float32 gradients left the Keras train-step parity at
4e-3 instead of 2e-5, so they are not used: docs/performance.md.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


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
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     relu: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
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


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` (same parameters, statistics and results) with `batch_norm_train`.

    For the plain case (last-axis features, scale and bias, no mask, no named-axis reduction,
    two-pass variance) it computes in float32 in both modes and returns `dtype` (so bfloat16
    activations are normalised as Keras's mixed precision does); every other case is
    `nnx.BatchNorm`'s own code.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: Any = None, relu: bool = False) -> jax.Array:
        """As `nnx.BatchNorm`; `relu` applies a ReLU to the result (fused in training mode)."""
        ura = self.use_running_average if use_running_average is None else use_running_average
        plain = (mask is None and self.axis_name is None and self.axis in (-1, x.ndim - 1)
                 and self.scale is not None and self.bias is not None
                 and not self.use_fast_variance)
        if not plain:
            y = super().__call__(x, use_running_average=ura, mask=mask)
            return jax.nn.relu(y) if relu else y
        dtype = self.dtype or x.dtype
        scale, bias = self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
        if ura:
            inv = jax.lax.rsqrt(self.var[...] + self.epsilon)
            y = _normalise(x.astype(jnp.float32), self.mean[...], scale * inv, bias)
            return (jax.nn.relu(y) if relu else y).astype(dtype)
        y, mean, var = batch_norm_train(x.astype(dtype), scale, bias, self.epsilon, relu)
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y
