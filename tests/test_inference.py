"""The inference path: parameters prepared once (BatchNorm folded), fused kernels, and the
guarantee that evaluation never runs on stale prepared weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import sharding, steps
from affect_jax.ops import conv as conv_ops
from affect_jax.ops import native
from affect_jax.predict import predictor
from tests.conftest import one_batch, stack_batches, tiny_config

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
IMPLS = ("native", "xla")
# bfloat16: measured worst relative error of the prepared path against the reference, about
# 1e-2 on these tiny random models (one rounding per layer instead of two), with margin.
TOLERANCE = {"float32": 1e-5, "bfloat16": 4e-2}


def _relative_error(a, b):
    """max |a - b| / max |b| over the leaves of two pytrees."""
    a, b = (
        np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
        for t in (a, b)
    )
    return float(np.abs(a - b).max() / np.abs(b).max())


def _config(name, dtype, impl):
    config = tiny_config()
    config.model.name = name
    config.model.width = 1 / 16
    config.model.dropout = 0.0
    config.compute_dtype = dtype
    for field in ("conv_impl", "batch_norm_impl", "pool_impl"):
        config[field] = impl
    return config


def _with_trained_statistics(state, seed=0):
    """The state with random BatchNorm statistics, scales and offsets and conv biases: a fresh
    model's (mean 0, variance 1, scale 1, offset 0) would make folding almost the identity."""
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        key, name = keys[-1], keys[-2]
        shape = leaf.shape
        if key == "var":
            return jnp.asarray(rng.uniform(0.3, 3.0, shape), leaf.dtype)
        if key in ("mean", "bias") or (key == "scale" and name.endswith("_bn")):
            base = 1.0 if key == "scale" else 0.0
            return jnp.asarray(base + rng.normal(0, 0.5, shape), leaf.dtype)
        return leaf

    perturbed = dict(
        state,
        params=jax.tree_util.tree_map_with_path(perturb, state["params"]),
        batch_stats=jax.tree_util.tree_map_with_path(perturb, state["batch_stats"]),
    )
    if "conv1_bn" in perturbed["batch_stats"].get("backbone", {}):
        assert float(jnp.abs(perturbed["batch_stats"]["backbone"]["conv1_bn"]["mean"][...]).max())
    return perturbed


def _setup(name, dtype, impl):
    """(config, graphdef, tx, state with `_with_trained_statistics`) of a tiny `name`."""
    if impl == "native" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    config = _config(name, dtype, impl)
    graphdef, tx, state = steps.create_train_state(config, steps.create_initial_model(config))
    return config, graphdef, tx, _with_trained_statistics(state)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_prepared_step_matches_the_reference_path(name, dtype, impl):
    _, graphdef, _, state = _setup(name, dtype, impl)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    reference = jax.jit(steps.make_reference_predict_step(graphdef))(variables, images)
    step = steps.make_predict_step(graphdef)
    prepared = jax.jit(step.prepare)(variables)
    outputs = jax.jit(step.on_prepared)(prepared, images)
    assert _relative_error(outputs, reference) <= TOLERANCE[dtype]


def test_resnet50_prepare_folds_batch_norm_into_the_convolutions():
    # On the XLA path, where the folded kernels stay HWIO (the native path also packs them).
    _, graphdef, _, state = _setup("resnet50", "float32", "xla")
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    prepared = jax.jit(steps.make_prepare_inference(graphdef))(variables)
    backbone, folded = variables["params"]["backbone"], prepared["params"]["backbone"]
    stats = variables["batch_stats"]["backbone"]
    for name in ("conv1", "conv2_block1_0", "conv3_block2_3"):
        bn, bn_stats = backbone[f"{name}_bn"], stats[f"{name}_bn"]
        s = np.asarray(bn["scale"]) / np.sqrt(np.asarray(bn_stats["var"]) + 1.001e-5)
        np.testing.assert_allclose(
            folded[f"{name}_conv"]["kernel"],
            np.asarray(backbone[f"{name}_conv"]["kernel"]) * s,
            rtol=1e-6,
        )
        bias = (np.asarray(backbone[f"{name}_conv"]["bias"]) - bn_stats["mean"]) * s + bn["bias"]
        np.testing.assert_allclose(folded[f"{name}_conv"]["bias"], bias, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_prepare_packs_every_kernel_that_runs_on_onednn(name):
    # bfloat16: every convolution runs on oneDNN's direct kernel (Winograd is float32 only).
    _, graphdef, _, state = _setup(name, "bfloat16", "native")
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    prepared = jax.jit(steps.make_prepare_inference(graphdef))(variables)
    kernels = {
        name: layer["kernel"]
        for name, layer in prepared["params"]["backbone"].items()
        if name.endswith("_conv") or name.startswith("block")
    }
    assert len(kernels) == (53 if name == "resnet50" else 13)
    assert all(k.dtype == jnp.uint8 and k.ndim == 1 for k in kernels.values())


@needs_native
def test_prepare_packs_the_winograd_layers_for_winograd():
    """float32 VGG16 at 64 px: block3's 16-channel 3x3 convolutions are where Winograd runs
    (`winograd.preferred`); prepare packs them for Winograd (their header says so), the others
    for oneDNN's direct kernel, and the prepared step still gives the reference path's outputs."""
    config = _config("vgg16", "float32", "native")
    config.data.image_size = 64
    graphdef, _, state = steps.create_train_state(config, steps.create_initial_model(config))
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    step = steps.make_predict_step(graphdef)
    prepared = jax.jit(step.prepare)(variables)
    magic = {  # the first bytes of each packing's header (onednn_conv.cc, winograd.cc)
        name: bytes(np.asarray(layer["kernel"][:7]))
        for name, layer in prepared["params"]["backbone"].items()
    }
    assert len(magic) == 13
    winograd_layers = [name for name, m in magic.items() if m == b"AJWINO1"]
    assert winograd_layers == ["block3_conv2", "block3_conv3"]
    assert all(m == b"AJPACK1" for name, m in magic.items() if name not in winograd_layers)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
    reference = jax.jit(steps.make_reference_predict_step(graphdef))(variables, images)
    outputs = jax.jit(step.on_prepared)(prepared, images)
    assert _relative_error(outputs, reference) <= TOLERANCE["float32"]


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_prediction_prepares_the_same_weights_with_its_faster_compiled_program(name):
    _, graphdef, _, state = _setup(name, "float32", "xla")
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    step = steps.make_predict_step(graphdef)
    expected = jax.jit(step.prepare)(variables)
    got = predictor.compile_prepare(step.prepare, variables)(variables)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_evaluation_after_a_training_step_sees_the_new_weights():
    config, graphdef, tx, state = _setup("resnet50", "float32", "auto")
    mesh = sharding.make_mesh()
    batch = sharding.shard_batch(one_batch(config), mesh)
    chunk = sharding.shard_batch(stack_batches([one_batch(config)] * 2), mesh, stacked=True)
    eval_steps = jax.jit(steps.make_eval_steps(steps.make_eval_step(graphdef)))
    reference_step = jax.jit(steps.make_reference_predict_step(graphdef))
    before = eval_steps(state, chunk)
    config.learning_rate = 1e-2
    state, _ = jax.jit(steps.make_train_step(graphdef, tx, config))(state, batch)
    after = eval_steps(state, chunk)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    expected = reference_step(variables, chunk["image"][0])
    for key in ("probs", "valence_arousal"):
        assert _relative_error(after[key][0], expected[key]) <= TOLERANCE["float32"]
        assert _relative_error(after[key][0], before[key][0]) > 1e-3


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["onednn", "xla"])
def test_conv_with_residual_is_conv_plus_residual_then_relu(impl, dtype, relu):
    if impl == "onednn" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), dtype)
    kernel = jnp.asarray(rng.normal(size=(1, 1, 8, 16)) / 3, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
    residual = jnp.asarray(rng.normal(size=(2, 5, 5, 16)), dtype)

    @jax.jit
    def fused(x, residual):
        y = conv_ops.conv2d(x, kernel, (2, 2), "VALID", impl, dtype, bias, relu, residual)
        return y, residual * 2  # the residual is still live: the kernel must not clobber it

    y, twice = fused(x, residual)
    lax_y = (
        jax.lax.conv_general_dilated(
            x.astype(jnp.float32),
            kernel.astype(dtype).astype(jnp.float32),
            (2, 2),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        + bias
        + residual.astype(jnp.float32)
    )
    expected = jax.nn.relu(lax_y) if relu else lax_y
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
    assert y.dtype == dtype
    assert _relative_error(y, expected) <= tolerance
    np.testing.assert_array_equal(twice, residual * 2)


@needs_native
def test_conv_residual_kernel_rejects_a_residual_of_another_shape():
    x = jnp.ones((1, 4, 4, 2), jnp.float32)
    kernel = jnp.ones((1, 1, 2, 3), jnp.float32)
    with pytest.raises(ValueError, match="residual"):
        conv_ops.conv2d(x, kernel, impl="onednn", residual=jnp.ones((1, 4, 4, 2), jnp.float32))


def test_prepared_model_refuses_training():
    config = _config("resnet50", "float32", "xla")
    model = steps.create_initial_model(config)
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)
    with pytest.raises(ValueError, match="inference only"):
        model(images, train=True, prepared=True)
