"""Convolution paths (affect_jax/ops/conv.py, ops/onednn_conv.py, ops/winograd.py), max pooling
(ops/max_pool.py) and BatchNorm (ops/batch_norm.py) against lax, TensorFlow and NumPy: forward
and gradients; the extension's loader (ops/native.py)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from affect_jax.ops import batch_norm as bn_ops
from affect_jax.ops import conv as conv_ops
from affect_jax.ops import max_pool as pool_ops
from affect_jax.ops import native, onednn_conv, winograd
from affect_jax.ops.max_pool import max_pool
from tests.conftest import NATIVE_SKIP_REASON, needs_native, skip_counts

# (kernel, stride, padding, input side, cin, cout): every conv shape ResNet50/VGG16 use, small.
CASES = [
    (1, 1, "VALID", 8, 6, 10),
    (1, 2, "VALID", 9, 6, 10),  # strided 1x1 (first bottleneck conv and shortcut)
    (3, 1, "SAME", 8, 5, 7),
    (3, 2, "SAME", 9, 5, 7),
    (7, 2, "VALID", 17, 3, 4),  # stem (after ZeroPadding2D(3))
    (3, 1, ((1, 2), (0, 1)), 7, 4, 3),  # explicit asymmetric padding
]
NATIVE = ("onednn", "winograd") if native.available() else ()
FAST = ("dot1x1", *NATIVE)


def test_native_kernels_are_built_where_ci_expects_them():
    """CI installs the extension; AFFECT_JAX_NATIVE_KERNELS=0 runs the suite without it."""
    if os.environ.get("AFFECT_JAX_NATIVE_KERNELS", "1") == "0":
        assert not native.available()
        assert "AFFECT_JAX_NATIVE_KERNELS" in native.unavailable_reason()
        assert conv_ops.resolve_impl("auto") == "dot1x1"
        assert bn_ops.resolve_impl("auto") == "xla"
        for impl in ("native", "onednn"):
            with pytest.raises(
                ValueError, match=f"'{impl}' is unavailable.*AFFECT_JAX_NATIVE_KERNELS"
            ):
                conv_ops.resolve_impl(impl)
        with pytest.raises(ValueError, match="'native' is unavailable.*AFFECT_JAX_NATIVE_KERNELS"):
            bn_ops.resolve_impl("native")
    elif os.environ.get("CI"):
        assert native.available(), native.unavailable_reason()
        assert conv_ops.resolve_impl("auto") == "winograd"
        assert conv_ops.resolve_impl("native") == "winograd"
        assert bn_ops.resolve_impl("auto", jnp.bfloat16) == "native"
        assert bn_ops.resolve_impl("auto", jnp.float32) == "native"
        assert bn_ops.resolve_impl("auto", jnp.float16) == "xla"


def test_skips_are_counted_per_reason():
    """The summary line CI prints: skipped tests per reason, whatever their location."""

    class Report:
        def __init__(self, path, line, reason):
            self.longrepr = (path, line, f"Skipped: {reason}")

    reports = [
        Report("tests/test_ops.py", 10, NATIVE_SKIP_REASON),
        Report("tests/test_models.py", 20, NATIVE_SKIP_REASON),
        Report("tests/test_ops.py", 30, "glibc only"),
    ]
    assert skip_counts(reports) == {NATIVE_SKIP_REASON: 2, "glibc only": 1}


def _loss(impl, x, w, b, k_s_pad, relu=False):
    _, s, pad = k_s_pad
    y = conv_ops.conv2d(x, w, (s, s), pad, impl, bias=b, relu=relu)
    # A fixed random cotangent through a non-linear readout, so dx and dw are not trivial.
    r = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * r), y


def _run(impl, x, w, case, bias=None, relu=False):
    """(y, dx, dw[, dbias]) of a fixed non-linear readout of the convolution (+ bias, + ReLU)."""
    (_, y), grads = jax.jit(
        jax.value_and_grad(
            lambda a, w_, b: _loss(impl, a, w_, b, case, relu), argnums=(0, 1, 2), has_aux=True
        )
    )(x, w, bias)
    return (y, *(g for g in grads if g is not None))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@pytest.mark.parametrize("k, s, pad, n, cin, cout", CASES)
def test_fast_paths_match_lax_conv_float32(k, s, pad, n, cin, cout):
    x = jax.random.normal(jax.random.key(0), (2, n, n, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.3
    bias = jax.random.normal(jax.random.key(2), (cout,))
    case = (k, s, pad)
    ref = _run("xla", x, w, case, bias)
    for impl in FAST:
        got = _run(impl, x, w, case, bias)
        for name, a, b in zip(("y", "dx", "dw", "dbias"), got, ref, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, (impl, name)
            assert _rel(a, b) <= 1e-4, (impl, name, _rel(a, b))


@pytest.mark.parametrize("k, s, pad, n, cin, cout", CASES[2:4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_relu_matches_conv_then_jax_relu(k, s, pad, n, cin, cout, dtype):
    """`relu=True` (VGG16's conv + bias + ReLU, one kernel on the oneDNN path) computes
    jax.nn.relu of lax.conv + bias, gradients included: 1e-4 relative in float32; in bfloat16
    each path exactly as its own convolution followed by jax.nn.relu."""
    x = jax.random.normal(jax.random.key(0), (2, n, n, cin)).astype(dtype)
    w = (jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.3).astype(dtype)
    bias = jax.random.normal(jax.random.key(2), (cout,)).astype(dtype)
    case = (k, s, pad)

    def unfused(impl):
        def loss(a, w_, b):
            y = jax.nn.relu(conv_ops.conv2d(a, w_, (s, s), pad, impl, bias=b))
            r = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
            return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * r), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(x, w, bias)
        return (y, *grads)

    ref = unfused("xla")
    assert float(jnp.mean(ref[0] == 0)) > 0.2  # the ReLU is active on a good share of outputs
    for impl in ("xla", *FAST):
        got = _run(impl, x, w, case, bias, relu=True)
        if dtype == jnp.float32:
            for name, a, b in zip(("y", "dx", "dw", "dbias"), got, ref, strict=True):
                assert a.dtype == b.dtype and _rel(a, b) <= 1e-4, (impl, name, _rel(a, b))
        else:
            for name, a, b in zip(("y", "dx", "dw", "dbias"), got, unfused(impl), strict=True):
                np.testing.assert_array_equal(
                    np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=f"{impl} {name}"
                )


@needs_native
def test_onednn_fused_relu_keeps_no_float32_pre_activation():
    """With float32 activations around a bfloat16 convolution, the fused ReLU's backward pass
    needs only bfloat16 copies (input, output) besides the parameters."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    b = jnp.zeros((6,))

    def saved(relu):
        def f(a):
            y = conv_ops.conv2d(a, w, (1, 1), "SAME", "onednn", jnp.bfloat16, b, relu=relu)
            return y if relu else jax.nn.relu(y)

        return [
            (r.shape, r.dtype) for r in jax.tree.leaves(jax.vjp(f, x)[1]) if r.shape[:1] == (2,)
        ]

    assert saved(True) == [((2, 8, 8, 4), jnp.bfloat16), ((2, 8, 8, 6), jnp.bfloat16)]
    assert ((2, 8, 8, 6), jnp.float32) in saved(False)  # what the fusion removes


@pytest.mark.parametrize("k, s, pad", [(1, 2, "VALID"), (3, 1, "SAME"), (7, 2, "VALID")])
def test_fast_paths_match_lax_conv_bfloat16(k, s, pad):
    """bf16 inputs: same result as lax.conv in bf16 to 2e-2 relative (8-bit mantissa, sums of
    up to k*k*cin products rounded differently) and both within 2e-2 of the fp32 reference."""
    x = jax.random.normal(jax.random.key(0), (2, 11, 11, 16))
    w = jax.random.normal(jax.random.key(1), (k, k, 16, 8)) * 0.2
    case = (k, s, pad)
    ref32 = _run("xla", x, w, case)
    ref = _run("xla", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), case)
    for impl in FAST:
        got = _run(impl, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), case)
        for name, a, b, c in zip(("y", "dx", "dw"), got, ref, ref32, strict=True):
            assert a.dtype == jnp.bfloat16, (impl, name)
            assert _rel(a, b) <= 2e-2, (impl, name, _rel(a, b))
            assert _rel(a, c) <= 2e-2, (impl, name, _rel(a, c))


def test_auto_resolves_to_a_known_path_and_bad_impl_fails():
    assert conv_ops.resolve_impl("auto") in conv_ops.PATHS
    assert conv_ops.resolve_impl("xla") == "xla"
    with pytest.raises(
        ValueError,
        match="conv impl='cudnn' is not an option: expected one of 'auto', 'xla', 'native'",
    ):
        conv_ops.resolve_impl("cudnn")
    for removed in ("dot", "im2col"):
        with pytest.raises(ValueError, match=f"conv impl='{removed}' is not an option"):
            conv_ops.resolve_impl(removed)
    with pytest.raises(ValueError, match="NHWC"):
        conv_ops.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 1, 2, 5)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_module_matches_nnx_conv(dtype):
    """Same parameter names/shapes and outputs as nnx.Conv (weights port between them)."""
    ref = nnx.Conv(4, 6, (3, 3), strides=(2, 2), padding="SAME", dtype=dtype, rngs=nnx.Rngs(0))
    ours = conv_ops.Conv(
        4, 6, (3, 3), strides=(2, 2), padding="SAME", dtype=dtype, impl="auto", rngs=nnx.Rngs(0)
    )
    ref_state = nnx.state(ref, nnx.Param)
    ours_state = nnx.state(ours, nnx.Param)
    assert jax.tree.map(jnp.shape, ref_state) == jax.tree.map(jnp.shape, ours_state)
    ref.bias.value = jax.random.normal(jax.random.key(3), (6,))
    nnx.update(ours, nnx.state(ref, nnx.Param))
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 4))
    a, b = ours(x.astype(dtype)), ref(x)
    assert a.dtype == b.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert _rel(a, b) <= tol
    # Unlike nnx.Conv, the result keeps the input's dtype: float32 activations around a
    # bfloat16 convolution (config.activation_dtype='float32').
    c = ours(x)
    assert c.dtype == jnp.float32 and _rel(c, b.astype(jnp.float32)) <= tol


# Relative errors against the XLA path allowed for the whole-model comparison below: twice the
# worst measured over the fast paths (ResNet50: loss 1.3e-7, gradient 4.1e-7, Winograd's;
# VGG16: loss 5.2e-7, gradient 9.6e-7, Winograd's). CPU-dependent: hence the margin.
MODEL_TOLERANCE = {"resnet50": (3e-7, 8e-7), "vgg16": (1e-6, 2e-6)}


@functools.cache
def _model_loss_and_grads(name, path):
    """(loss, flat float64 gradient, lowered text) of a quarter-width `name` at 56 px whose
    convolutions run `path`; pooling and BatchNorm on XLA's kernels in every case."""
    from affect_jax.models import create_backbone

    impls = {"pool_impl": "xla"} | ({"batch_norm_impl": "xla"} if name == "resnet50" else {})
    model = create_backbone(name, False, 1 / 4, conv_impl=path, rngs=nnx.Rngs(0), **impls)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (2, 56, 56, 3))

    def loss(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        return jnp.mean(m(x, train=False) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    value, grads = step(params)
    flat = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grads)])
    return float(value), flat, step.lower(params).as_text()


@pytest.mark.parametrize(
    "name, path",
    [
        ("resnet50", "dot1x1"),  # VGG16 has no 1x1 convolution: 'dot1x1' is 'xla' there
        pytest.param("resnet50", "onednn", marks=needs_native),
        pytest.param("resnet50", "winograd", marks=needs_native),
        pytest.param("vgg16", "onednn", marks=needs_native),
        pytest.param("vgg16", "winograd", marks=needs_native),
    ],
)
def test_model_gradients_agree_across_impls(name, path):
    """A quarter-width backbone's loss and parameter gradients with every convolution on a fast
    path against the XLA path (the reference), at MODEL_TOLERANCE; the lowered program shows
    the path's kernels ran (Winograd takes ResNet50's 14x14 and VGG16's 56/28 px 3x3 layers).

    Inference-mode BatchNorm: with batch statistics over 2 images and small final maps the
    gradients are ill-conditioned and amplify any float32 summation-order difference.
    """
    l0, g0, xla_text = _model_loss_and_grads(name, "xla")
    l1, g1, text = _model_loss_and_grads(name, path)
    assert onednn_conv.TARGETS["forward"] not in xla_text
    if path == "dot1x1":
        assert text.count("stablehlo.convolution") < xla_text.count("stablehlo.convolution")
    else:
        assert (winograd_target() in text) == (path == "winograd")
        assert onednn_conv.TARGETS["forward"] in text  # the stem and every 1x1 or strided conv
    loss_tol, grad_tol = MODEL_TOLERANCE[name]
    assert abs(l1 - l0) <= loss_tol * abs(l0), abs(l1 - l0) / abs(l0)
    grad_error = np.linalg.norm(g1 - g0) / np.linalg.norm(g0)
    assert grad_error <= grad_tol, grad_error


@needs_native
@pytest.mark.parametrize("k, s, pad", [(1, 2, "VALID"), (3, 1, "SAME"), (7, 2, "VALID")])
def test_onednn_bfloat16_compute_between_float32_activations(k, s, pad):
    """The model's mixed-precision use: float32 x and kernel, bfloat16 convolution inside.

    Output and gradients come back float32 and are as close to the float32 reference as XLA's
    own bfloat16 convolution of the same inputs (2e-2 relative: an 8-bit mantissa)."""
    x = jax.random.normal(jax.random.key(0), (2, 11, 11, 16))
    w = jax.random.normal(jax.random.key(1), (k, k, 16, 8)) * 0.2

    def run(impl, compute):
        def loss(a, b):
            y = conv_ops.conv2d(a, b, (s, s), pad, impl, compute_dtype=compute)
            r = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
            return jnp.sum(jnp.tanh(y) * r), y

        (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
        return y, dx, dw

    ref32 = run("xla", None)
    xla16 = run("xla", jnp.bfloat16)
    got = run("onednn", jnp.bfloat16)
    for name, a, b, c in zip(("y", "dx", "dw"), got, ref32, xla16, strict=True):
        assert a.dtype == jnp.float32, name
        assert _rel(a, b) <= 2e-2, (name, _rel(a, b))
        assert _rel(a, c) <= 2e-2, (name, _rel(a, c))

    # The input gradient comes out of the bfloat16 convolution (the dtype autodiff of a bfloat16
    # lax.conv gives it): bfloat16 values in a float32 array, unlike the float32 reference's.
    def is_bf16(v):
        return np.array_equal(v, v.astype(jnp.bfloat16).astype(jnp.float32))

    assert is_bf16(got[1]) and not is_bf16(ref32[1])


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "k, s, pad, side, cin, cout, call_batch, call_side",
    [
        (1, 2, "VALID", 9, 6, 10, 1, 9),  # the geometry it was packed for
        (7, 2, "VALID", 17, 3, 4, 2, 17),  # stem, another batch
        (3, 1, "SAME", 8, 5, 7, 3, 11),  # another batch and image size
        # bfloat16: oneDNN lays this kernel out differently at batch 32 than at batch 1, so the
        # call reorders the packed kernel into the other layout.
        (3, 1, "SAME", 6, 256, 256, 32, 6),
    ],
)
@pytest.mark.parametrize("residual", [False, True])
def test_packed_kernel_gives_the_convolution_of_the_hwio_kernel(
    k, s, pad, side, cin, cout, call_batch, call_side, residual, dtype
):
    """`pack_kernel` once, then `conv2d_packed` at any batch and size: lax.conv + bias
    (+ residual) then ReLU, within float32 round-off (float32) or one bfloat16 rounding of the
    result (bfloat16, against lax on the same bfloat16 inputs)."""
    compute = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (call_batch, call_side, call_side, cin)).astype(compute)
    w = (jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(compute)
    bias = jax.random.normal(keys[2], (cout,))
    pads = conv_ops.explicit_padding(pad, (side, side), (k, k), (s, s))
    call_pads = conv_ops.explicit_padding(pad, (call_side, call_side), (k, k), (s, s))
    if call_pads != pads:
        pytest.skip("padding depends on the size here")
    packed = jax.jit(lambda w: onednn_conv.pack_kernel(w, (side, side), (s, s), pads, compute))(w)
    assert packed.dtype == jnp.uint8 and packed.ndim == 1
    y_shape = jax.eval_shape(lambda: conv_ops.conv2d(x, w, (s, s), pads, "xla")).shape
    r = jax.random.normal(keys[3], y_shape).astype(compute) if residual else None

    @jax.jit
    def got(x, packed, r):
        return onednn_conv.conv2d_packed(x, packed, w.shape, bias, (s, s), pads, compute, True, r)

    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    want = conv_ops.conv2d(x32, w32, (s, s), pads, "xla") + bias
    if residual:
        want = want + r.astype(jnp.float32)
    y = got(x, packed, r)
    assert y.dtype == compute and y.shape == y_shape
    assert _rel(y, jax.nn.relu(want)) <= (1e-5 if dtype == "float32" else 8e-3)


def test_unavailable_extension_falls_back_with_a_clear_error():
    """In a process without the extension (switched off here; not built or not loadable gives
    the same path with another reason): 'auto' is XLA and asking for a kernel says why not."""
    code = """if True:
        import jax.numpy as jnp
        import pytest
        from affect_jax.ops import batch_norm as bn_ops, conv as conv_ops
        from affect_jax.ops import max_pool as pool_ops, native, onednn_conv
        from affect_jax.ops.max_pool import max_pool

        why = 'switched off by AFFECT_JAX_NATIVE_KERNELS'
        assert native.unavailable_reason() == why, native.unavailable_reason()
        assert conv_ops.resolve_impl('auto') == 'dot1x1'
        for impl in ('native', 'onednn', 'winograd'):
            with pytest.raises(ValueError, match=f"'{impl}' is unavailable: {why}"):
                conv_ops.resolve_impl(impl)
        with pytest.raises(RuntimeError, match=why):
            onednn_conv.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 1, 3, 2)), (1, 1),
                               ((0, 0), (0, 0)))
        assert bn_ops.resolve_impl('auto') == 'xla'
        with pytest.raises(ValueError, match=f"'native' is unavailable: {why}"):
            bn_ops.resolve_impl('native')
        with pytest.raises(RuntimeError, match=why):
            bn_ops.native_batch_norm_train(jnp.ones((2, 3)), jnp.ones(3), jnp.zeros(3), 1e-3)
        assert pool_ops.resolve_impl('auto', jnp.bfloat16) == 'xla'
        with pytest.raises(ValueError, match=f"max pool impl 'native' is unavailable: {why}"):
            max_pool(jnp.ones((1, 4, 4, 1)), (2, 2), (2, 2), 'native')
    """
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, AFFECT_JAX_NATIVE_KERNELS="0"),
    )
    assert result.returncode == 0, result.stderr[-3000:]


@needs_native
@pytest.mark.parametrize(
    "change, reason",
    [
        ("register_targets({'t': 'AffectJaxNoSuchKernel'})", "no AffectJaxNoSuchKernel"),
        (
            "EXTENSION_REVISION = 99",
            f"revision {native.EXTENSION_REVISION}, the Python code needs 99",
        ),
    ],
)
def test_stale_extension_is_reported_as_unavailable(change, reason):
    """An extension built from older sources (an editable install not rebuilt after a kernel
    was added or a handler's signature changed) is not used."""
    code = (
        f"from affect_jax.ops import native; native.{change}; "
        "print(native.available(), native.unavailable_reason())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith(f"False the extension is out of date ({reason})"), out


@needs_native
def test_onednn_conv_kernel_rejects_a_bad_relu_attribute():
    call = jax.ffi.ffi_call(
        onednn_conv.TARGETS["forward"], jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32)
    )
    with pytest.raises(Exception, match="affect_jax oneDNN conv: relu must be 0 or 1"):
        jax.block_until_ready(
            call(
                jnp.ones((1, 4, 4, 3)),
                jnp.ones((1, 1, 3, 2)),
                jnp.zeros(2),
                stride_h=np.int64(1),
                stride_w=np.int64(1),
                pad_top=np.int64(0),
                pad_bottom=np.int64(0),
                pad_left=np.int64(0),
                pad_right=np.int64(0),
                relu=np.int64(2),
            )
        )


@needs_native
def test_onednn_rejects_unsupported_dtypes():
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        onednn_conv.conv2d(
            jnp.ones((1, 4, 4, 3), jnp.float16),
            jnp.ones((1, 1, 3, 2), jnp.float16),
            (1, 1),
            ((0, 0), (0, 0)),
        )


# (batch, height, width, cin, cout, pads, relu, chunk): partial tiles on both edges, channel
# blocks of 64 plus a remainder, several chunks with a partial last one, VALID and asymmetric
# padding, a bias and a ReLU.
# Twice the worst measured relative error of F(4x4, 3x3) against lax.conv: 2.5e-5 (dw, 70 input
# channels); 1e-6 to 5e-6 with few channels.
WINOGRAD_RTOL = 5e-5
WINOGRAD_CASES = [
    (2, 14, 13, 8, 5, ((1, 1), (1, 1)), False, None),
    (3, 9, 11, 70, 67, ((1, 1), (1, 1)), True, 16),
    (2, 10, 10, 3, 4, ((0, 0), (0, 0)), False, 7),
    (1, 7, 6, 5, 6, ((2, 1), (0, 2)), True, 3),
]


def _winograd_and_xla(x, w, b, pads, relu, chunk):
    """(y, dx, dw, db) of the same non-linear readout through Winograd and through lax.conv."""

    def loss(conv, a, k, c):
        y = conv(a, k, c)
        r = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
        return jnp.sum(jnp.tanh(y) * r), y

    def run(conv):
        (_, y), grads = jax.jit(
            jax.value_and_grad(functools.partial(loss, conv), argnums=(0, 1, 2), has_aux=True)
        )(x, w, b)
        return (y, *grads)

    return (
        run(lambda a, k, c: winograd.conv3x3(a, k, c, pads, relu, chunk)),
        run(lambda a, k, c: conv_ops.conv2d(a, k, (1, 1), pads, "xla", bias=c, relu=relu)),
    )


@needs_native
@pytest.mark.parametrize("n, h, w, cin, cout, pads, relu, chunk", WINOGRAD_CASES)
def test_winograd_matches_lax_conv(n, h, w, cin, cout, pads, relu, chunk):
    """F(4x4, 3x3) computes the convolution and both gradients to float32 rounding."""
    x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
    k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.3
    b = jax.random.normal(jax.random.key(2), (cout,))
    got, ref = _winograd_and_xla(x, k, b, pads, relu, chunk)
    for name, a, r in zip(("y", "dx", "dw", "db"), got, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype == jnp.float32, name
        assert _rel(a, r) <= WINOGRAD_RTOL, (name, _rel(a, r))


@needs_native
def test_winograd_matches_tensorflow_conv2d():
    """Against TensorFlow's Conv2D forward and gradients (the study's Keras stack)."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 17, 16, 24)).astype(np.float32)
    k = (rng.normal(size=(3, 3, 24, 20)) * 0.2).astype(np.float32)
    dy = rng.normal(size=(2, 17, 16, 20)).astype(np.float32)
    xt, kt = tf.constant(x), tf.constant(k)
    with tf.GradientTape() as tape:
        tape.watch([xt, kt])
        yt = tf.nn.conv2d(xt, kt, 1, "SAME")
    dx_tf, dk_tf = tape.gradient(yt, [xt, kt], output_gradients=tf.constant(dy))
    y, vjp = jax.vjp(
        lambda a, b: winograd.conv3x3(a, b, None, ((1, 1), (1, 1))), jnp.asarray(x), jnp.asarray(k)
    )
    dx, dk = vjp(jnp.asarray(dy))
    for name, a, r in (("y", y, yt), ("dx", dx, dx_tf), ("dw", dk, dk_tf)):
        assert _rel(a, r.numpy()) <= 1e-4, (name, _rel(a, r.numpy()))


@needs_native
@pytest.mark.parametrize(
    "pads, side, cin, cout, call_batch, call_side",
    [
        (((1, 1), (1, 1)), 16, 16, 24, 1, 16),  # the geometry it was packed for
        (((1, 1), (1, 1)), 16, 70, 67, 3, 21),  # another batch and size; a channel remainder
        (((0, 0), (0, 0)), 18, 20, 16, 2, 18),
        (((2, 1), (0, 2)), 14, 16, 8, 1, 13),
    ],
)
@pytest.mark.parametrize("residual", [False, True])
def test_winograd_packed_kernel_gives_the_convolution_of_the_hwio_kernel(
    pads, side, cin, cout, call_batch, call_side, residual
):
    """`winograd.pack_kernel` transforms the kernel once; `conv2d_packed` on it at any batch
    and size: lax.conv + bias (+ residual) then ReLU, to Winograd's float32 rounding."""
    keys = jax.random.split(jax.random.key(4), 4)
    x = jax.random.normal(keys[0], (call_batch, call_side, call_side, cin))
    w = jax.random.normal(keys[1], (3, 3, cin, cout)) / np.sqrt(9 * cin)
    bias = jax.random.normal(keys[2], (cout,))
    packed = jax.jit(lambda w: winograd.pack_kernel(w, (side, side), pads, 1))(w)
    assert packed.dtype == jnp.uint8 and packed.ndim == 1
    want = conv_ops.conv2d(x, w, (1, 1), pads, "xla") + bias
    r = jax.random.normal(keys[3], want.shape) if residual else None

    @jax.jit
    def got(x, packed, r):
        return onednn_conv.conv2d_packed(x, packed, w.shape, bias, (1, 1), pads, "float32", True, r)

    y = got(x, packed, r)
    assert y.dtype == jnp.float32 and y.shape == want.shape
    assert _rel(y, jax.nn.relu(want + r if residual else want)) <= WINOGRAD_RTOL


def _uses_winograd(x, w, strides=(1, 1), padding="SAME", compute_dtype=None) -> bool:
    def f(a, b):
        return conv_ops.conv2d(a, b, strides, padding, "winograd", compute_dtype=compute_dtype)

    return (
        winograd_target()
        in jax.jit(jax.grad(lambda a, b: f(a, b).sum(), (0, 1))).lower(x, w).as_text()
    )


def winograd_target() -> str:
    return winograd.TARGETS["forward"]


@needs_native
def test_winograd_impl_takes_only_the_convolutions_it_speeds_up():
    """The 'winograd' path (conv_impl='native'): F(4x4, 3x3) for float32 3x3 stride-1
    convolutions with outputs of at least MIN_OUTPUT_SIZE and MIN_IN_CHANNELS input channels;
    oneDNN's direct kernels for every other convolution (and the same results either way)."""
    big, small = winograd.MIN_OUTPUT_SIZE, winograd.MIN_OUTPUT_SIZE - 1
    c = winograd.MIN_IN_CHANNELS
    w3 = jnp.ones((3, 3, c, 4))
    assert _uses_winograd(jnp.ones((1, big, big, c)), w3)
    assert _uses_winograd(jnp.ones((1, big + 2, big + 2, c)), w3, padding="VALID")
    assert not _uses_winograd(jnp.ones((1, small, big, c)), w3)  # too small: 2x2-tile waste
    assert not _uses_winograd(jnp.ones((1, big, big, 3)), jnp.ones((3, 3, 3, 4)))  # RGB input
    assert not _uses_winograd(jnp.ones((1, 2 * big, 2 * big, c)), w3, strides=(2, 2))
    assert not _uses_winograd(jnp.ones((1, big, big, c)), jnp.ones((1, 1, c, 4)))
    assert not _uses_winograd(jnp.ones((1, big, big, c)), w3, compute_dtype=jnp.bfloat16)
    assert not _uses_winograd(jnp.ones((1, big, big, c), jnp.bfloat16), w3.astype(jnp.bfloat16))
    x = jax.random.normal(jax.random.key(0), (2, big + 1, big, c))
    w = jax.random.normal(jax.random.key(1), (3, 3, c, 5)) * 0.3
    b = jax.random.normal(jax.random.key(2), (5,))
    got = _run("winograd", x, w, (3, 1, "SAME"), b, relu=True)
    ref = _run("xla", x, w, (3, 1, "SAME"), b, relu=True)
    for name, a, r in zip(("y", "dx", "dw", "dbias"), got, ref, strict=True):
        assert _rel(a, r) <= 1e-4, (name, _rel(a, r))


@needs_native
def test_winograd_model_is_the_same_function_as_onednn():
    """A tiny VGG16 (64 px, quarter width) in float32: the same loss and parameter gradients
    with conv_impl='native' as with oneDNN's direct convolutions only (the 'onednn' path; 6 of
    its 13 convolutions go to Winograd)."""
    from affect_jax.models import create_backbone

    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))

    def loss_and_grads(conv_impl):
        model = create_backbone("vgg16", False, 1 / 4, conv_impl=conv_impl, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

        step = jax.jit(jax.value_and_grad(loss))
        return step(params), step.lower(params).as_text().count(winograd_target())

    (l0, g0), n0 = loss_and_grads("onednn")
    (l1, g1), n1 = loss_and_grads("native")
    assert n0 == 0 and n1 > 0
    assert _rel(l1, l0) <= 1e-4
    g1, g0 = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)]) for g in (g1, g0))
    assert np.linalg.norm(g1 - g0) <= 1e-4 * np.linalg.norm(g0)


@needs_native
def test_winograd_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"winograd conv3x3 needs .*\(5, 5, 4, 2\)"):
        winograd.conv3x3(jnp.ones((1, 8, 8, 4)), jnp.ones((5, 5, 4, 2)), None, ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="padding 0-2"):
        winograd.conv3x3(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 2)), None, ((3, 3), (1, 1)))
    x, w, b = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 2)), jnp.zeros(2)
    attrs = dict(
        pad_top=np.int64(1),
        pad_left=np.int64(1),
        relu=np.int64(0),
        flip=np.int64(0),
        chunk_tiles=np.int64(16),
    )

    def forward(out_shape, *args, **changed):
        call = jax.ffi.ffi_call(winograd_target(), jax.ShapeDtypeStruct(out_shape, jnp.float32))
        return jax.block_until_ready(call(*args, **{**attrs, **changed}))

    for args, out, changed, message in [
        ((x, jnp.ones((3, 3, 5, 2)), b), (1, 8, 8, 2), {}, r"kernel must be \[3, 3, C, K\]"),
        ((x, w, b), (1, 8, 8, 2), {"flip": np.int64(1)}, r"kernel must be \[3, 3, K, C\]"),
        ((x, w, b), (1, 11, 8, 2), {}, "y has no 3x3 stride-1 output size of x"),
        ((x, w, b), (1, 8, 8, 2), {"pad_top": np.int64(3)}, "padding must be 0, 1 or 2"),
        ((x, w, jnp.zeros(3)), (1, 8, 8, 2), {}, r"bias must be \[K\]"),
        ((x.astype(jnp.bfloat16), w, b), (1, 8, 8, 2), {}, "x must be float32 of rank 4"),
        ((x, w, b), (1, 8, 8, 2), {"chunk_tiles": np.int64(0)}, "chunk_tiles must be >= 1"),
    ]:
        with pytest.raises(Exception, match="affect_jax winograd conv: " + message):
            forward(out, *args, **changed)


def _reduce_window_max(x, window, strides):
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), "VALID"
    )


POOL_IMPLS = ["xla", pytest.param("native", marks=needs_native)]


@pytest.mark.parametrize("impl", POOL_IMPLS)
@pytest.mark.parametrize(
    "shape, window, strides",
    [
        ((2, 9, 9, 3), (3, 3), (2, 2)),  # ResNet50 stem (after ZeroPadding2D(1))
        ((2, 8, 7, 4), (2, 2), (2, 2)),  # VGG16, odd width floors
        ((1, 10, 10, 2), (3, 3), (1, 1)),  # overlapping windows
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_matches_reduce_window(shape, window, strides, dtype, impl):
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)  # ties have probability ~0
    y, vjp = jax.vjp(lambda a: max_pool(a, window, strides, impl), x)
    y_ref, vjp_ref = jax.vjp(lambda a: _reduce_window_max(a, window, strides), x)
    assert y.dtype == dtype and np.array_equal(
        np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    )
    dy = jax.random.normal(jax.random.key(1), y.shape).astype(dtype)
    dx = vjp(dy)[0]
    assert dx.dtype == dtype
    assert _rel(dx, vjp_ref(dy)[0]) <= (1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("impl", POOL_IMPLS)
def test_max_pool_gradient_on_ties_matches_tensorflow(impl):
    """Ties (ReLU zeros, padding) send the gradient to the first maximum, as TF's MaxPoolGrad."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(2, 9, 9, 3)), 0).round(1).astype(np.float32)  # many ties
    dy = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yt = tf.nn.max_pool2d(xt, 3, 2, "VALID")
    dx_tf = tape.gradient(yt, xt, output_gradients=tf.constant(dy)).numpy()
    y, vjp = jax.vjp(lambda a: max_pool(a, (3, 3), (2, 2), impl), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), yt.numpy())
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy))[0]), dx_tf, atol=1e-6)


@needs_native
@pytest.mark.parametrize(
    "shape, window, strides",
    [
        (
            (3, 11, 13, 70),
            (3, 2),
            (2, 3),
        ),  # odd sizes, uneven window and strides, C not a power of 2
        ((2, 12, 12, 5), (3, 3), (1, 1)),  # every input in up to 9 windows
        ((4, 16, 16, 33), (2, 2), (2, 2)),  # VGG16's pool, rows split over the threads
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_native_max_pool_equals_the_xla_path_on_ties(shape, window, strides, dtype):
    """ReLU-like inputs with many ties: the same outputs and the same gradient routing, bit for
    bit (overlapping windows: float32 sums in another order, within float32 round-off)."""
    x = jnp.maximum(jax.random.normal(jax.random.key(0), shape), 0).round(1).astype(dtype)
    dy = None
    results = {}
    for impl in ("xla", "native"):
        y, vjp = jax.vjp(lambda a, impl=impl: max_pool(a, window, strides, impl), x)
        dy = jax.random.normal(jax.random.key(1), y.shape).astype(dtype) if dy is None else dy
        results[impl] = [np.asarray(a, np.float32) for a in (y, vjp(dy)[0])]
    np.testing.assert_array_equal(results["native"][0], results["xla"][0])
    if window == strides:  # each input in one window: one term, exact
        np.testing.assert_array_equal(results["native"][1], results["xla"][1])
    else:
        assert _rel(results["native"][1], results["xla"][1]) <= (
            1e-6 if dtype == jnp.float32 else 1e-2
        )


@needs_native
def test_native_max_pool_keeps_only_the_argmax_and_propagates_nan():
    """The backward pass needs the uint8 window positions, not the input; a NaN in a window is
    its maximum (as jnp.maximum) and takes the window's gradient."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3), jnp.bfloat16)
    saved = jax.tree.leaves(jax.vjp(lambda a: max_pool(a, (2, 2), (2, 2), "native"), x)[1])
    assert [(r.shape, r.dtype) for r in saved if r.ndim == 4] == [((2, 3, 3, 3), jnp.uint8)]
    x = x.at[0, 1, 1, 0].set(jnp.nan)
    y, vjp = jax.vjp(lambda a: max_pool(a, (2, 2), (2, 2), "native"), x)
    assert np.isnan(np.asarray(y[0, 0, 0, 0], np.float32))
    assert np.isfinite(np.asarray(y, np.float32)).sum() == y.size - 1
    dx = np.asarray(vjp(jnp.ones_like(y))[0], np.float32)
    assert dx[0, 1, 1, 0] == 1 and dx[0, :2, :2, 0].sum() == 1


def test_max_pool_impl_and_inputs_are_validated():
    with pytest.raises(ValueError, match="max pool impl='fast' is not an option: expected"):
        max_pool(jnp.ones((1, 4, 4, 1)), (2, 2), (2, 2), "fast")
    with pytest.raises(ValueError, match="NHWC"):
        max_pool(jnp.ones((4, 4, 1)), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="larger than the input"):
        max_pool(jnp.ones((1, 2, 4, 1)), (3, 3), (2, 2))
    with pytest.raises(ValueError, match="must be >= 1"):
        max_pool(jnp.ones((1, 4, 4, 1)), (2, 2), (0, 2))
    if native.available():
        assert pool_ops.resolve_impl("auto", jnp.bfloat16) == "native"
        assert pool_ops.resolve_impl("auto", jnp.float16) == "xla"
    else:
        assert pool_ops.resolve_impl("auto", jnp.bfloat16) == "xla"
        with pytest.raises(ValueError, match="max pool impl 'native' is unavailable"):
            max_pool(jnp.ones((1, 4, 4, 1)), (2, 2), (2, 2), "native")


@needs_native
def test_native_max_pool_rejects_bad_inputs():
    """Unsupported dtypes and windows fail in Python; inconsistent buffers reaching the kernel
    fail there with a message naming the operand."""
    with pytest.raises(TypeError, match="native max_pool takes float32 or bfloat16"):
        max_pool(jnp.ones((1, 4, 4, 1), jnp.float16), (2, 2), (2, 2), "native")
    with pytest.raises(ValueError, match="at most 256 positions"):
        max_pool(jnp.ones((1, 20, 20, 1)), (17, 17), (1, 1), "native")
    attrs = dict(
        window_h=np.int64(2), window_w=np.int64(2), stride_h=np.int64(2), stride_w=np.int64(2)
    )
    forward = pool_ops.TARGETS["forward"]
    bad_argmax = jax.ffi.ffi_call(
        forward,
        (
            jax.ShapeDtypeStruct((1, 2, 2, 1), jnp.float32),
            jax.ShapeDtypeStruct((1, 2, 2, 1), jnp.int32),
        ),
    )
    with pytest.raises(Exception, match="affect_jax max pool: argmax must be uint8 \\[1, 2, 2, 1"):
        jax.block_until_ready(bad_argmax(jnp.ones((1, 4, 4, 1)), **attrs))
    bad_y = jax.ffi.ffi_call(
        forward,
        (
            jax.ShapeDtypeStruct((1, 3, 2, 1), jnp.float32),
            jax.ShapeDtypeStruct((1, 2, 2, 1), jnp.uint8),
        ),
    )
    with pytest.raises(Exception, match="affect_jax max pool: y must be \\[1, 2, 2, 1\\]"):
        jax.block_until_ready(bad_y(jnp.ones((1, 4, 4, 1)), **attrs))
    backward = jax.ffi.ffi_call(
        pool_ops.TARGETS["backward"], jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.bfloat16)
    )
    with pytest.raises(Exception, match="affect_jax max pool: dy must have dx's dtype"):
        jax.block_until_ready(
            backward(jnp.zeros((1, 2, 2, 1), jnp.uint8), jnp.ones((1, 2, 2, 1)), **attrs)
        )


@needs_native
@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backbone_is_the_same_function_with_either_pool_impl(name, dtype):
    """A tiny backbone's loss and parameter gradients with either pool path: float32 gradients
    bit for bit (the loss within round-off: XLA fuses its reduction with the XLA pool), VGG16's
    bfloat16 ones too. ResNet50's bfloat16 ones agree to bfloat16 precision: inside the jitted
    model the XLA path's stem-pool gradient is not what the same op gives alone (XLA rewrites
    around its bfloat16 casts); measured against `reduce_window`'s autodiff in the model, 44
    of its 2,592 input-gradient elements differ, 7 of the native path's."""
    from affect_jax.models import create_backbone

    def grads(pool_impl):
        model = create_backbone(
            name, False, 1 / 16, dtype=dtype, pool_impl=pool_impl, rngs=nnx.Rngs(0)
        )
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

        def loss(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return jnp.mean(m(x, train=True).astype(jnp.float32) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = grads("xla"), grads("native")
    assert _rel(l1, l0) <= 1e-6
    if dtype == jnp.float32 or name == "vgg16":
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
        g0, g1 = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)]) for g in (g0, g1))
        assert np.linalg.norm(g1 - g0) <= 1e-2 * np.linalg.norm(g0)


@needs_native
@pytest.mark.parametrize(
    "conv_impl, dtype, size",
    [
        ("onednn", jnp.float32, 9),
        ("onednn", jnp.bfloat16, 8),
        ("xla", jnp.float32, 8),
        ("winograd", jnp.float32, 17),
    ],
)
def test_conv_relu_max_pool_is_conv_relu_then_pool_without_keeping_the_relu_output(
    conv_impl, dtype, size
):
    """VGG16's block end: the same output and gradients, bit for bit, as conv + bias + ReLU and
    then the pool; the backward pass keeps the pool's output and positions, not the ReLU's
    output (one 4-D activation fewer)."""
    from affect_jax.ops.conv_pool import conv_relu_max_pool

    c = winograd.MIN_IN_CHANNELS
    x = jax.random.normal(jax.random.key(0), (2, size, size, c)).astype(dtype)
    k = (jax.random.normal(jax.random.key(1), (3, 3, c, 6)) * 0.3).astype(dtype)
    b = (jax.random.normal(jax.random.key(2), (6,)) * 0.1).astype(dtype)

    def fused(a, w, bias):
        return conv_relu_max_pool(a, w, bias, "SAME", conv_impl, dtype, (2, 2), (2, 2), "native")

    def separate(a, w, bias):
        y = conv_ops.conv2d(
            a, w, (1, 1), "SAME", conv_impl, compute_dtype=dtype, bias=bias, relu=True
        )
        return max_pool(y, (2, 2), (2, 2), "native")

    def run(f):
        y, vjp = jax.vjp(f, x, k, b)
        dy = jax.random.normal(jax.random.key(3), y.shape).astype(dtype)
        return y, *vjp(dy)

    for a, r in zip(jax.jit(lambda: run(fused))(), jax.jit(lambda: run(separate))(), strict=True):
        assert a.dtype == r.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(r, np.float32))

    def saved_activations(f):
        return sorted(
            (r.shape, str(r.dtype))
            for r in jax.tree.leaves(jax.vjp(f, x, k, b)[1])
            if r.ndim == 4 and r.shape[0] == 2 and r.shape[-1] == 6
        )

    half = size // 2
    assert saved_activations(fused) == sorted(
        [((2, half, half, 6), str(x.dtype)), ((2, half, half, 6), "uint8")]
    )
    assert any(shape == (2, size, size, 6) for shape, _ in saved_activations(separate))


BN_IMPLS = ["xla", pytest.param("native", marks=needs_native)]


@pytest.mark.parametrize("impl", BN_IMPLS)
@pytest.mark.parametrize("shift", [0.0, 100.0])  # 100: caffe-range activations (two-pass var)
@pytest.mark.parametrize("relu, residual", [(False, False), (True, False), (True, True)])
def test_batch_norm_matches_nnx_batch_norm(shift, relu, residual, impl):
    """Same output, running statistics and gradients as nnx.BatchNorm's autodiff (training),
    and the same output in inference mode, to 1e-5 relative (measured <= 6e-7); `relu` and
    `residual` as jax.nn.relu(residual + y) after it (a ResNet block's output), with the
    residual's gradient too."""
    from affect_jax.ops.batch_norm import BatchNorm

    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) * 3 + shift
    r = jax.random.normal(jax.random.key(1), x.shape)
    res = jax.random.normal(jax.random.key(6), x.shape) if residual else None
    results = []
    for make in (nnx.BatchNorm, functools.partial(BatchNorm, impl=impl)):
        bn = make(6, momentum=0.99, epsilon=1.001e-5, use_fast_variance=False, rngs=nnx.Rngs(0))
        bn.scale.value = jax.random.uniform(jax.random.key(2), (6,)) + 0.5
        bn.bias.value = jax.random.normal(jax.random.key(3), (6,))
        graphdef, params, rest = nnx.split(bn, nnx.Param, ...)

        def loss(p, a, sc, graphdef=graphdef, rest=rest, fused=make is not nnx.BatchNorm):
            m = nnx.merge(graphdef, p, rest, copy=True)
            if fused:
                y = m(a, use_running_average=False, relu=relu, residual=sc)
                y_eval = m(a, use_running_average=True, relu=relu, residual=sc)
            else:
                y, y_eval = (m(a, use_running_average=ura) for ura in (False, True))
                if sc is not None:
                    y, y_eval = sc + y, sc + y_eval
                if relu:
                    y, y_eval = jax.nn.relu(y), jax.nn.relu(y_eval)
            # y_eval: with the updated running statistics
            return jnp.sum(jnp.tanh(y) * r), (y, y_eval, nnx.state(m, nnx.BatchStat))

        (_, aux), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(params, x, res)
        results.append(jax.tree.leaves((aux, grads)))
    for got, want in zip(*results, strict=True):
        assert _rel(got, want) <= 1e-5
    # Inference mode computes exactly nnx.BatchNorm's expression (bit-identical).
    bns = [make(6, rngs=nnx.Rngs(0)) for make in (BatchNorm, nnx.BatchNorm)]
    for bn in bns:
        bn.mean.value = jax.random.normal(jax.random.key(4), (6,)) + shift
        bn.var.value = jax.random.uniform(jax.random.key(5), (6,)) + 0.5
    np.testing.assert_array_equal(*(bn(x, use_running_average=True) for bn in bns))


@pytest.mark.parametrize("impl", BN_IMPLS)
def test_batch_norm_bfloat16_activations_compute_in_float32(impl):
    """bfloat16 in and out, float32 inside (as Keras's mixed precision): the result is the
    float32 BatchNorm of the same bfloat16 input, rounded once, in both modes."""
    from affect_jax.ops.batch_norm import BatchNorm

    x = (jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) * 3 + 100).astype(jnp.bfloat16)
    for ura in (False, True):
        outs = []
        for dtype in (jnp.bfloat16, jnp.float32):
            bn = BatchNorm(6, dtype=dtype, use_fast_variance=False, impl=impl, rngs=nnx.Rngs(0))
            bn.mean.value = jnp.full((6,), 100.0)
            outs.append((bn(x, use_running_average=ura), bn.mean[...]))
        (y16, mean16), (y32, mean32) = outs
        assert y16.dtype == jnp.bfloat16 and mean16.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(jnp.bfloat16)))
        np.testing.assert_array_equal(np.asarray(mean16), np.asarray(mean32))


def test_batch_norm_impl_is_validated():
    from affect_jax.ops.batch_norm import BatchNorm

    with pytest.raises(ValueError, match="batch_norm impl='fast' is not an option: expected"):
        BatchNorm(3, impl="fast", rngs=nnx.Rngs(0))


@needs_native
def test_native_batch_norm_rejects_bad_inputs():
    """Unsupported dtypes fail in Python; inconsistent buffers reaching the kernel fail there
    with a message naming the operand."""
    with pytest.raises(TypeError, match="float32/bfloat16 x and float32 scale and bias"):
        bn_ops.native_batch_norm_train(
            jnp.ones((2, 3), jnp.float16), jnp.ones(3), jnp.zeros(3), 1e-3
        )
    channel = jax.ShapeDtypeStruct((3,), jnp.float32)
    call = jax.ffi.ffi_call(
        bn_ops.TARGETS["forward"],
        (jax.ShapeDtypeStruct((2, 3), jnp.bfloat16), channel, channel, channel),
    )
    with pytest.raises(Exception, match="affect_jax BatchNorm: y must have x.s shape and dtype"):
        jax.block_until_ready(
            call(
                jnp.ones((2, 3)),
                jnp.ones(3),
                jnp.zeros(3),
                epsilon=np.float32(1e-3),
                relu=np.int64(0),
            )
        )
    with pytest.raises(Exception, match=r"affect_jax BatchNorm: scale must be float32 \[channels"):
        jax.block_until_ready(
            call(
                jnp.ones((2, 3), jnp.bfloat16),
                jnp.ones(4),
                jnp.zeros(3),
                epsilon=np.float32(1e-3),
                relu=np.int64(0),
            )
        )


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_native_batch_norm_is_deterministic_and_handles_one_row(dtype):
    """Fixed row split and in-order sums: the same bits on every call; a single row (fewer
    rows than threads) normalises to the bias."""
    x = (jax.random.normal(jax.random.key(0), (3000, 7)) * 5 + 50).astype(dtype)
    scale, bias = jnp.full((7,), 2.0), jnp.arange(7.0)

    def f(a):
        return jax.vjp(lambda a: bn_ops.native_batch_norm_train(a, scale, bias, 1e-3, True)[0], a)[
            1
        ](jnp.ones_like(a))[0]

    first, second = jax.jit(f)(x), jax.jit(f)(x)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    y, mean, var = bn_ops.native_batch_norm_train(x[:1], scale, bias, 1e-3)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(bias)[None])
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(x[0], np.float32))
    np.testing.assert_array_equal(np.asarray(var), np.zeros(7))


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_native_batch_norm_matches_float64_numpy(dtype, residual):
    """Caffe-range activations, fused ReLU (and residual), 2,000 rows split over threads:
    statistics and gradients of the native kernels against float64 NumPy on the same (rounded)
    input, to 3e-6 relative (float32 arithmetic; measured ~1e-6 where XLA's float32 path is
    ~8e-6); bfloat16 results within one rounding."""
    x = (jax.random.normal(jax.random.key(0), (5, 20, 20, 6)) * 3 + 100).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
    res = jax.random.normal(jax.random.key(4), x.shape).astype(dtype) if residual else None
    scale = jax.random.uniform(jax.random.key(2), (6,)) + 0.5
    bias = jax.random.normal(jax.random.key(3), (6,))
    eps = 1.001e-5
    (y, mean, var), vjp = jax.vjp(
        lambda a, s, b, r: bn_ops.native_batch_norm_train(a, s, b, eps, True, r),
        x,
        scale,
        bias,
        res,
    )
    dx, dscale, dbias, dres = vjp((dy, jnp.zeros(6), jnp.zeros(6)))

    xs, g = (np.asarray(a, np.float64).reshape(-1, 6) for a in (x, dy))
    rs = np.asarray(res, np.float64).reshape(-1, 6) if residual else 0.0
    s, b = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
    m, v = xs.mean(0), xs.var(0)
    x_hat = (xs - m) / np.sqrt(v + eps)
    pre = x_hat * s + b + rs
    g = g * (pre > 0)
    n = len(xs)
    want_dx = s / np.sqrt(v + eps) / n * (n * g - g.sum(0) - x_hat * (g * x_hat).sum(0))
    pairs = [
        (mean, m),
        (var, v),
        (dscale, (g * x_hat).sum(0)),
        (dbias, g.sum(0)),
        (y, np.maximum(pre, 0)),
        (dx, want_dx),
    ]
    if residual:
        pairs.append((dres, g))
    else:
        assert dres is None
    for got, want in pairs:
        tol = 3e-6 if got.dtype == jnp.float32 else 8e-3  # bfloat16 results: one rounding
        got = np.asarray(got, np.float64).reshape(want.shape)
        assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want))
