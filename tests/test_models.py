"""Backbones and the multi-task model: shapes, dtypes, state layout, errors (tiny widths)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from affect_jax.models import (
    COMPUTE_DTYPES,
    MultiTaskModel,
    activation_dtype,
    create_backbone,
    create_model,
    resnet50,
    vgg16,
)
from tests.conftest import needs_native, tiny_config

TINY = 1 / 16


def _abstract_call(model, shape, dtype=jnp.float32, **kwargs):
    """Output shape/dtype of `model` without compiling or running it."""
    return nnx.eval_shape(lambda m, x: m(x, **kwargs), model, jax.ShapeDtypeStruct(shape, dtype))


@pytest.fixture(scope="module")
def tiny_resnet():
    """A real tiny ResNet50 reused across tests (init is the slow part on CPU)."""
    return create_backbone("resnet50", False, TINY, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("arch", ["resnet50", "vgg16"])
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backbone_output_shapes(arch, size, dtype):
    features = nnx.eval_shape(lambda: create_backbone(arch, False, TINY, dtype=dtype))
    y = _abstract_call(features, (2, size, size, 3))
    h, w, c = features.feature_shape(size)
    # Activations default to `dtype`; VGG16's last convolution writes a float32 feature map.
    assert (y.shape, y.dtype) == ((2, h, w, c), jnp.float32 if arch == "vgg16" else dtype)
    mixed = nnx.eval_shape(
        lambda: create_backbone(arch, False, TINY, dtype=dtype, activation_dtype=jnp.float32)
    )
    assert _abstract_call(mixed, (2, size, size, 3)).dtype == jnp.float32
    assert h == w == size // 32  # Both architectures downsample by 32.
    assert c == (128 if arch == "resnet50" else 32)  # 2048 / 16, 512 / 16.
    kwargs = {"input_size": size} if arch == "vgg16" else {}
    top = nnx.eval_shape(lambda: create_backbone(arch, True, TINY, dtype=dtype, **kwargs))
    logits = _abstract_call(top, (2, size, size, 3))
    assert (logits.shape, logits.dtype) == ((2, 1000), dtype)


def test_backbone_runs(tiny_resnet):
    y = tiny_resnet(jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
    assert y.shape == (2, 1, 1, 128)
    assert np.all(np.isfinite(y)) and np.std(y) > 0


@pytest.mark.parametrize(
    "arch, include_top, expected",
    [  # Keras model.count_params() (trainable + BatchNorm moving statistics).
        ("resnet50", False, 23_587_712),
        ("resnet50", True, 25_636_712),
        ("vgg16", False, 14_714_688),
        ("vgg16", True, 138_357_544),
    ],
)
def test_full_width_parameter_counts_match_keras(arch, include_top, expected):
    model = nnx.eval_shape(lambda: create_backbone(arch, include_top))  # No init cost.
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model)))
    assert count == expected


@pytest.mark.parametrize("arch", ["resnet50", "vgg16"])
@pytest.mark.parametrize("include_top", [False, True])
def test_submodules_are_named_after_keras_layers(arch, include_top):
    lib = {"resnet50": resnet50, "vgg16": vgg16}[arch]
    model = nnx.eval_shape(lambda: create_backbone(arch, include_top, TINY))
    names = set(nnx.to_pure_dict(nnx.state(model)))
    assert names == set(lib.keras_layer_names(include_top))


def test_resnet_stem_and_bottleneck_layout():
    model = nnx.eval_shape(lambda: create_backbone("resnet50"))
    assert model.conv1_conv.kernel.shape == (7, 7, 3, 64)
    assert model.conv1_conv.padding == "VALID" and model.conv1_conv.strides == (2, 2)
    # Keras puts the stride on the first 1x1 conv and the projection shortcut.
    assert model.conv3_block1_1_conv.strides == (2, 2)
    assert model.conv3_block1_0_conv.strides == (2, 2)
    assert model.conv3_block1_2_conv.strides == (1, 1)
    assert model.conv3_block1_1_conv.bias is not None
    assert model.conv1_bn.epsilon == pytest.approx(1.001e-5)
    assert model.conv1_bn.momentum == pytest.approx(0.99)
    assert not hasattr(model, "conv2_block2_0_conv")


def test_batchnorm_train_flag(tiny_resnet):
    model = tiny_resnet
    saved = nnx.to_pure_dict(nnx.state(model))
    before = np.array(model.conv1_bn.mean[...])
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    y_eval = model(x, train=False)
    np.testing.assert_array_equal(before, model.conv1_bn.mean[...])
    y_train = model(x, train=True)
    assert not np.allclose(before, model.conv1_bn.mean[...])  # Running average updated.
    assert not np.allclose(y_eval, y_train)
    state = nnx.state(model)  # Restore the shared fixture.
    nnx.replace_by_pure_dict(state, saved)
    nnx.update(model, state)
    np.testing.assert_array_equal(before, model.conv1_bn.mean[...])


def test_resnet_conv_bias_gradient_is_zero_in_training(tiny_resnet):
    """Every conv feeds a BatchNorm: in training mode its bias cancels (exact gradient 0, which
    the model returns instead of round-off); with running statistics it does not."""
    model = nnx.clone(tiny_resnet)  # Training mode updates the running statistics.
    x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    for train in (True, False):
        grads = nnx.to_flat_state(
            nnx.grad(lambda m, t=train: jnp.sum(jnp.sin(m(x, train=t))))(model)
        )
        biases = {k: v for k, v in grads if k[-1] == "bias" and k[-2].endswith("_conv")}
        kernels = {k: v for k, v in grads if k[-1] == "kernel"}
        assert len(biases) == len(kernels) == 53
        assert all(np.any(np.asarray(v[...]) != 0) for v in kernels.values())
        nonzero = [k for k, v in biases.items() if np.any(np.asarray(v[...]) != 0)]
        assert nonzero == ([] if train else list(biases)), train


def _config(**overrides):
    config = tiny_config()
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
@pytest.mark.parametrize("pooling", ["avg", "max", "flatten"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_multitask_output_shapes_and_dtypes(name, pooling, compute_dtype):
    config = _config(
        **{
            "model.name": name,
            "model.pooling": pooling,
            "compute_dtype": compute_dtype,
            "data.image_size": 64,
        }
    )
    model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(0)))
    out = _abstract_call(model, (3, 64, 64, 3), train=False)
    assert set(out) == {"class_logits", "valence_arousal"}
    assert out["class_logits"].shape == (3, config.data.num_classes)
    assert out["valence_arousal"].shape == (3, 2)
    assert out["class_logits"].dtype == jnp.float32
    assert out["valence_arousal"].dtype == jnp.float32
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("float32")}


def test_multitask_bfloat16_run_gives_float32():
    config = _config(**{"compute_dtype": "bfloat16", "model.pooling": "flatten"})
    model = create_model(config, nnx.Rngs(0))
    out = model(jnp.ones((2, 32, 32, 3)), train=True, rngs=nnx.Rngs(dropout=0))
    assert out["class_logits"].dtype == out["valence_arousal"].dtype == jnp.float32
    assert np.all(np.isfinite(out["class_logits"]))


def test_multitask_state_is_params_and_batch_stats_and_jits():
    config = _config(**{"model.name": "resnet50", "data.num_classes": 7})
    model = create_model(config, nnx.Rngs(0))
    assert isinstance(model, MultiTaskModel)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)  # Exhaustive.
    assert "backbone" in params and "class_output" in params and "reg_output" in params

    @jax.jit
    def step(params, stats, x, key):
        m = nnx.merge(graphdef, params, stats)
        out = m(x, train=True, rngs=nnx.Rngs(dropout=key))
        return out, nnx.state(m, nnx.BatchStat)

    x = jnp.ones((2, 32, 32, 3))
    out, new_stats = step(params, stats, x, jax.random.key(0))
    assert out["class_logits"].shape == (2, 7)
    old = jax.tree.leaves(stats)
    assert any(not np.allclose(a, b) for a, b in zip(old, jax.tree.leaves(new_stats), strict=True))


def test_dropout_uses_call_time_rngs():
    config = _config(**{"model.dropout": 0.5, "model.hidden_sizes": (64,)})
    model = create_model(config, nnx.Rngs(0))
    x = jnp.ones((2, 32, 32, 3))
    with pytest.raises(ValueError, match="rngs"):
        model(x, train=True)
    a = model(x, train=True, rngs=nnx.Rngs(dropout=1))["class_logits"]
    b = model(x, train=True, rngs=nnx.Rngs(dropout=2))["class_logits"]
    assert not np.allclose(a, b)
    e1 = model(x, train=False)["class_logits"]
    e2 = model(x, train=False)["class_logits"]
    np.testing.assert_array_equal(e1, e2)
    # No dropout: train=True needs no rngs.
    plain = create_model(_config(**{"model.dropout": 0.0}), nnx.Rngs(0))
    plain(x, train=True)


def test_other_errors():
    with pytest.raises(ValueError, match="resnet50"):
        create_backbone("inception")
    with pytest.raises(ValueError, match="too small"):
        create_backbone("vgg16", True, TINY, input_size=16)
    model = create_model(_config(**{"model.pooling": "flatten"}), nnx.Rngs(0))
    with pytest.raises(ValueError, match="image_size"):
        model(jnp.ones((1, 64, 64, 3)), train=False)  # Built for 32 px.
    with pytest.raises(ValueError, match="include_top=False"):
        MultiTaskModel(
            create_backbone("vgg16", True, TINY, input_size=32), num_classes=8, rngs=nnx.Rngs(0)
        )


@pytest.mark.parametrize(
    "name, compute, setting, expected",
    [
        ("resnet50", "bfloat16", "auto", jnp.bfloat16),
        ("vgg16", "bfloat16", "auto", jnp.bfloat16),
        ("vgg16", "bfloat16", "float32", jnp.float32),
        ("vgg16", "bfloat16", "compute", jnp.bfloat16),
        ("resnet50", "bfloat16", "float32", jnp.float32),
        ("resnet50", "float32", "compute", jnp.float32),
        ("vgg16", "float32", "auto", jnp.float32),
    ],
)
def test_activation_dtype_setting(name, compute, setting, expected):
    config = _config(**{"model.name": name, "compute_dtype": compute, "activation_dtype": setting})
    model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(0)))
    assert model.backbone.act_dtype == expected
    assert activation_dtype(name, COMPUTE_DTYPES[compute], setting) == expected
    features = _abstract_call(model.backbone, (2, 32, 32, 3), train=True)
    assert features.dtype == (jnp.float32 if name == "vgg16" else expected)


@needs_native
def test_vgg16_bfloat16_activations_against_float32_ones_on_onednn():
    """bf16 vs float32 activations around bf16 convolutions (VGG16's 'auto' is bf16).

    The forward pass is bit-identical: the next convolution rounds its input to bfloat16
    anyway, ReLU and max pooling commute with that rounding, and the feature map is float32
    in both. The gradients differ where a max-pool window's values tie once rounded (the
    gradient goes to the first of them): measured against float32 compute, bf16 activations
    may add at most 30% (+0.01) to the error that bf16 convolutions alone make.
    """
    x = 50.0 * jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    features, grads = {}, {}
    for mode, dtype, act in (
        ("fp32", jnp.float32, jnp.float32),
        ("bf16 act", jnp.bfloat16, jnp.bfloat16),
        ("f32 act", jnp.bfloat16, jnp.float32),
    ):
        model = create_backbone(
            "vgg16",
            False,
            TINY,
            dtype=dtype,
            activation_dtype=act,
            conv_impl="onednn",
            rngs=nnx.Rngs(0),
        )
        features[mode] = model(x)
        grad = nnx.grad(lambda m: jnp.sum(jnp.square(m(x))))(model)
        grads[mode] = [np.asarray(g, np.float64) for g in jax.tree.leaves(nnx.state(grad))]
    assert features["bf16 act"].dtype == features["f32 act"].dtype == jnp.float32
    np.testing.assert_array_equal(features["bf16 act"], features["f32 act"])
    for ref, with_bf16, with_f32 in zip(
        grads["fp32"], grads["bf16 act"], grads["f32 act"], strict=True
    ):
        err_bf16, err_f32 = (
            np.linalg.norm(g - ref) / np.linalg.norm(ref) for g in (with_bf16, with_f32)
        )
        assert err_bf16 <= 1.3 * err_f32 + 0.01, (ref.shape, err_bf16, err_f32)
