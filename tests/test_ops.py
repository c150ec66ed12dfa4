"""Fast convolution paths (affect_jax/ops/conv.py) against lax.conv: forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from affect_jax.ops import conv as conv_ops

# (kernel, stride, padding, input side, cin, cout): every conv shape ResNet50/VGG16 use, small.
CASES = [
    (1, 1, 'VALID', 8, 6, 10),
    (1, 2, 'VALID', 9, 6, 10),  # strided 1x1 (first bottleneck conv and shortcut)
    (3, 1, 'SAME', 8, 5, 7),
    (3, 2, 'SAME', 9, 5, 7),
    (7, 2, 'VALID', 17, 3, 4),  # stem (after ZeroPadding2D(3))
    (3, 1, ((1, 2), (0, 1)), 7, 4, 3),  # explicit asymmetric padding
]
FAST = ('dot1x1', 'dot', 'im2col')


def _loss(impl, x, w, k_s_pad):
    _, s, pad = k_s_pad
    y = conv_ops.conv2d(x, w, (s, s), pad, impl)
    # A fixed random cotangent through a non-linear readout, so dx and dw are not trivial.
    r = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * r), y


def _run(impl, x, w, case):
    (loss, y), (dx, dw) = jax.jit(
        jax.value_and_grad(lambda a, b: _loss(impl, a, b, case), argnums=(0, 1), has_aux=True)
    )(x, w)
    return y, dx, dw


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@pytest.mark.parametrize('k, s, pad, n, cin, cout', CASES)
def test_fast_paths_match_lax_conv_float32(k, s, pad, n, cin, cout):
    x = jax.random.normal(jax.random.key(0), (2, n, n, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.3
    case = (k, s, pad)
    ref = _run('xla', x, w, case)
    for impl in FAST:
        got = _run(impl, x, w, case)
        for name, a, b in zip(('y', 'dx', 'dw'), got, ref, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, (impl, name)
            assert _rel(a, b) <= 1e-4, (impl, name, _rel(a, b))


@pytest.mark.parametrize('k, s, pad', [(1, 2, 'VALID'), (3, 1, 'SAME'), (7, 2, 'VALID')])
def test_fast_paths_match_lax_conv_bfloat16(k, s, pad):
    """bf16 inputs: same result as lax.conv in bf16 to 2e-2 relative (8-bit mantissa, sums of
    up to k*k*cin products rounded differently) and both within 2e-2 of the fp32 reference."""
    x = jax.random.normal(jax.random.key(0), (2, 11, 11, 16))
    w = jax.random.normal(jax.random.key(1), (k, k, 16, 8)) * 0.2
    case = (k, s, pad)
    ref32 = _run('xla', x, w, case)
    ref = _run('xla', x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), case)
    for impl in FAST:
        got = _run(impl, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), case)
        for name, a, b, c in zip(('y', 'dx', 'dw'), got, ref, ref32, strict=True):
            assert a.dtype == jnp.bfloat16, (impl, name)
            assert _rel(a, b) <= 2e-2, (impl, name, _rel(a, b))
            assert _rel(a, c) <= 2e-2, (impl, name, _rel(a, c))


def test_auto_resolves_to_a_known_path_and_bad_impl_fails():
    assert conv_ops.resolve_impl('auto') in conv_ops.IMPLS[1:]
    with pytest.raises(ValueError, match='conv impl'):
        conv_ops.resolve_impl('cudnn')
    with pytest.raises(ValueError, match='NHWC'):
        conv_ops.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 1, 2, 5)))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_conv_module_matches_nnx_conv(dtype):
    """Same parameter names/shapes and outputs as nnx.Conv (weights port between them)."""
    ref = nnx.Conv(4, 6, (3, 3), strides=(2, 2), padding='SAME', dtype=dtype,
                   rngs=nnx.Rngs(0))
    ours = conv_ops.Conv(4, 6, (3, 3), strides=(2, 2), padding='SAME', dtype=dtype,
                         impl='dot', rngs=nnx.Rngs(0))
    ref_state = nnx.state(ref, nnx.Param)
    ours_state = nnx.state(ours, nnx.Param)
    assert jax.tree.map(jnp.shape, ref_state) == jax.tree.map(jnp.shape, ours_state)
    ref.bias.value = jax.random.normal(jax.random.key(3), (6,))
    nnx.update(ours, nnx.state(ref, nnx.Param))
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 4))
    a, b = ours(x), ref(x)
    assert a.dtype == b.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert _rel(a, b) <= tol


@pytest.mark.parametrize('impl', ['xla', 'dot'])
def test_model_gradients_agree_across_impls(impl):
    """A tiny ResNet50 loss: same value and parameter gradients for every path.

    Inference-mode BatchNorm: with batch statistics over 2 images and 1x1 final maps the
    gradients are ill-conditioned and amplify any float32 summation-order difference.
    """
    from affect_jax.models import create_backbone

    def grads(conv_impl):
        model = create_backbone('resnet50', False, 1 / 16, conv_impl=conv_impl,
                                rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

        def loss(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return jnp.mean(m(x, train=False) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = grads('xla'), grads(impl)
    assert _rel(l1, l0) <= 1e-4
    g1, g0 = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)]) for g in (g1, g0))
    assert np.linalg.norm(g1 - g0) <= 1e-4 * np.linalg.norm(g0)
