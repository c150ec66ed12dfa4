"""Issue 3: one affect-jax training step is one Keras training step.

A Keras multi-task model (keras.applications backbone, full width -> global average pooling ->
Dense ReLU -> Dropout(0) -> softmax `class_output` and linear `reg_output`), compiled with
categorical cross-entropy + MSE, the study's loss weights and Adam, and the affect-jax model
holding the same weights (backbone through a Keras `.weights.h5` file and `load_keras_h5`, heads
copied) take one step on the same batch. The losses must agree to 1e-5 and every updated weight
and BatchNorm statistic to 1e-4 (relative: max|jax - keras| / max|keras| per tensor). Random
biases and BatchNorm parameters/statistics make every tensor's update visible. The measured
errors are printed in the terminal summary and stored in the pytest cache
(`affect_jax/keras_train_parity`).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from affect_jax import train, weights
from tests.conftest import load_config

keras = pytest.importorskip('keras')

SIZE = 64
BATCH = 8
HIDDEN = 32
NUM_CLASSES = 8
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4
RESULTS: dict[str, dict[str, object]] = {}
logger = logging.getLogger(__name__)


@pytest.fixture(scope='module', autouse=True)
def report_errors(request):
    """Reports the measured errors whether or not output capture is on."""
    yield
    if not RESULTS:
        return
    lines = ['one train step, affect-jax vs Keras (max|jax - keras| / max|keras| per tensor):']
    for arch, r in sorted(RESULTS.items()):
        lines += [
            f"  {arch}: loss {r['loss']:.3e}; worst weight {r['weight']:.3e} "
            f"({r['weight_name']}); worst BN statistic {r['stat']:.3e} ({r['stat_name']}); "
            f"worst update (new - old) {r['update']:.3e} ({r['update_name']}); "
            f"{r['tensors']} tensors",
        ]
    for line in lines:
        logger.info(line)
    request.config.cache.set('affect_jax/keras_train_parity', RESULTS)
    reporter = request.config.pluginmanager.getplugin('terminalreporter')
    capture = request.config.pluginmanager.getplugin('capturemanager')
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # Visible without -s.
            reporter.write_line('')
            for line in lines:
                reporter.write_line(line)


def _config(arch: str):
    config = load_config('default')
    config.model.name = arch
    config.model.init = 'random'  # Then every tensor is replaced by the Keras model's.
    config.model.hidden_sizes = (HIDDEN,)
    config.model.dropout = 0.0
    config.model.pooling = 'avg'
    config.data.num_classes = NUM_CLASSES
    config.data.image_size = SIZE
    config.batch_size = BATCH
    config.learning_rate = 1e-4
    config.loss_weights.classification = 1.0
    config.loss_weights.regression = 0.5  # Not 1, so the weighting is exercised.
    config.compilation_cache_dir = ''
    return config


# --------------------------------------------------------------------------------------------
# Keras side.


def _randomize(model, rng: np.random.Generator) -> None:
    """Random biases and BatchNorm parameters/statistics (Keras initialises them constant)."""
    for layer in model.layers:
        values = layer.get_weights()
        if not values:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = values[0].shape
            values = [rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.1, shape),
                      rng.normal(0, 0.1, shape), rng.uniform(0.5, 1.5, shape)]
        else:
            values = [values[0], rng.normal(0, 0.05, values[1].shape)]
        layer.set_weights([v.astype(np.float32) for v in values])


def _keras_model(arch: str, config, seed: int):
    """(backbone, compiled multi-task model), named like the Flax heads."""
    keras.utils.set_random_seed(seed)
    app = {'resnet50': keras.applications.ResNet50, 'vgg16': keras.applications.VGG16}[arch]
    base = app(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Dense(HIDDEN, activation='relu', name='neck_0')(x)
    x = keras.layers.Dropout(config.model.dropout)(x)
    outputs = {
        'class_output': keras.layers.Dense(
            NUM_CLASSES, activation='softmax', name='class_output')(x),
        'reg_output': keras.layers.Dense(2, name='reg_output')(x),
    }
    model = keras.Model(base.input, outputs)
    _randomize(model, np.random.default_rng(seed))
    model.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate=config.learning_rate, beta_1=config.adam_b1,
            beta_2=config.adam_b2, epsilon=config.adam_epsilon),
        loss={'class_output': 'categorical_crossentropy', 'reg_output': 'mse'},
        loss_weights={'class_output': config.loss_weights.classification,
                      'reg_output': config.loss_weights.regression},
    )
    return base, model


# --------------------------------------------------------------------------------------------
# Keras weights -> Flax.


def _copy_heads(keras_model, flax_model) -> None:
    """Neck Dense, class_output and reg_output kernels/biases (same (in, out) layout)."""
    pairs = [('neck_0', flax_model.neck[0]), ('class_output', flax_model.class_output),
             ('reg_output', flax_model.reg_output)]
    for name, linear in pairs:
        kernel, bias = keras_model.get_layer(name).get_weights()
        assert linear.kernel.value.shape == kernel.shape, name
        assert linear.bias.value.shape == bias.shape, name
        linear.kernel.value = jnp.asarray(kernel)
        linear.bias.value = jnp.asarray(bias)


def _load_from_keras(flax_model, base, keras_model, path) -> None:
    base.save_weights(path)
    weights.load_keras_h5(flax_model, path)
    _copy_heads(keras_model, flax_model)


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v) for path, v in flat}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _worst(errors: dict[str, float]) -> tuple[str, float]:
    if not errors:  # VGG16 has no BatchNorm.
        return '-', 0.0
    name = max(errors, key=errors.get)
    return name, errors[name]


# --------------------------------------------------------------------------------------------
# The step.


@pytest.mark.parametrize('arch', ['resnet50', 'vgg16'])
def test_one_train_step_matches_keras(arch, tmp_path, monkeypatch):
    config = _config(arch)
    seed = {'resnet50': 3, 'vgg16': 4}[arch]
    base, keras_model = _keras_model(arch, config, seed)

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)
    batch = {
        'image': rng.normal(0, 60, (BATCH, SIZE, SIZE, 3)).astype(np.float32),  # caffe range
        'expression': labels,
        'valence_arousal': rng.uniform(-1, 1, (BATCH, 2)).astype(np.float32),
        'has_va': np.ones(BATCH, np.float32),
        'mask': np.ones(BATCH, np.float32),
    }

    model = train.create_model(config)
    _load_from_keras(model, base, keras_model, tmp_path / 'before.weights.h5')
    mesh = train.make_mesh()
    graphdef, tx, state = train.create_train_state(config, model)
    before = _flat(state['params']) | _flat(state['batch_stats'])
    step = jax.jit(train.make_train_step(graphdef, tx, config))
    new_state, out = step(train.replicate(state, mesh), train.shard_batch(batch, mesh))
    got = _flat(new_state['params']) | _flat(new_state['batch_stats'])
    stat_names = set(_flat(new_state['batch_stats']))

    # Keras's cross-entropy on a softmax output uses the softmax's logits (`_keras_logits`),
    # i.e. log-softmax like optax; record that it did, so the 1e-5 comparison is like for like.
    nn = keras.src.backend.nn
    used_logits = []

    def spy(target, output, from_logits=False, axis=-1):
        used_logits.append(hasattr(output, '_keras_logits') or from_logits)
        return original(target, output, from_logits=from_logits, axis=axis)

    original = nn.categorical_crossentropy
    monkeypatch.setattr(nn, 'categorical_crossentropy', spy)
    keras_loss = keras_model.train_on_batch(
        batch['image'],
        {'class_output': np.eye(NUM_CLASSES, dtype=np.float32)[labels],
         'reg_output': batch['valence_arousal']},
        return_dict=True,
    )['loss']
    assert used_logits and all(used_logits), 'Keras CE did not use the softmax logits'

    expected_model = nnx.eval_shape(lambda: train.create_model(config))
    _load_from_keras(expected_model, base, keras_model, tmp_path / 'after.weights.h5')
    _, exp_params, exp_stats = nnx.split(expected_model, nnx.Param, nnx.BatchStat)
    expected = _flat(exp_params) | _flat(exp_stats)
    # Every Keras variable (kernels, biases, gamma, beta, moving mean/variance) is compared.
    assert set(got) == set(expected) == set(before)
    assert len(expected) == len(keras_model.weights)

    errors = {k: _rel(got[k], expected[k]) for k in expected}
    update_errors = {k: _rel(got[k] - before[k], expected[k] - before[k]) for k in expected}
    weight_name, weight_err = _worst({k: v for k, v in errors.items() if k not in stat_names})
    stat_name, stat_err = _worst({k: v for k, v in errors.items() if k in stat_names})
    update_name, update_err = _worst(update_errors)
    loss_err = abs(float(out['loss']) - float(keras_loss)) / abs(float(keras_loss))
    RESULTS[arch] = {
        'loss': loss_err, 'weight': weight_err, 'weight_name': weight_name, 'stat': stat_err,
        'stat_name': stat_name, 'update': update_err, 'update_name': update_name,
        'tensors': len(expected),
    }
    assert loss_err <= LOSS_RTOL, f'loss {float(out["loss"])} vs Keras {float(keras_loss)}'
    assert weight_err <= WEIGHT_RTOL, f'{weight_name}: {weight_err:.2e}'
    assert stat_err <= WEIGHT_RTOL, f'{stat_name}: {stat_err:.2e}'
