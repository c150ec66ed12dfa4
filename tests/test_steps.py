"""The train state, losses and the train/eval/predict steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import sharding, steps
from affect_jax.data import pipeline
from tests.conftest import bit_identical, one_batch, stack_batches, tiny_config, tiny_run


def _relative_distance(a, b):
    """||a - b|| / ||a|| over all elements of two pytrees."""
    a, b = (
        np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
        for t in (a, b)
    )
    return np.linalg.norm(a - b) / np.linalg.norm(a)


# XLA's loop over steps against the same steps one by one (when not bit-identical): twice the
# worst relative distance measured on the XLA path (ResNet50: optimizer state 1.2e-5, step
# outputs 4.0e-5, valence/arousal of step 3).
STEPS_PER_CALL_TOLERANCE = {"state": 2.5e-5, "outputs": 8e-5}


def test_loss_goes_down_when_overfitting_one_batch():
    config = tiny_config(learning_rate=1e-3)
    config.model.dropout = 0.0
    config.model.name = "resnet50"
    config.model.width = 1 / 8
    config.model.hidden_sizes = (64,)
    mesh = sharding.make_mesh()
    graphdef, tx, state = steps.create_train_state(config, steps.create_initial_model(config))
    step = jax.jit(steps.make_train_step(graphdef, tx, config))
    batch = sharding.shard_batch(one_batch(config), mesh)
    losses = []
    for _ in range(60):
        state, out = step(state, batch)
        losses.append(float(out["loss"]))
    assert losses[-1] < 0.2 * losses[0], losses
    assert int(state["step"]) == 60


def test_compute_loss_weights_mask_and_missing_valence_arousal():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    va_pred = jnp.array([[0.5, 0.5], [0.0, 0.0], [9.0, 9.0]])
    batch = {
        "expression": jnp.array([0, 1, 0]),
        "valence_arousal": jnp.array([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]),
        "has_va": jnp.array([1.0, 0.0, 1.0]),
        "mask": jnp.array([1.0, 1.0, 0.0]),  # the third row is padding
    }
    weights = tiny_config().loss_weights
    weights.classification, weights.regression = 0.7, 2.0
    loss, terms = steps.compute_loss(
        {"class_logits": logits, "valence_arousal": va_pred}, batch, weights
    )
    log_softmax = jax.nn.log_softmax(logits)
    ce = -(log_softmax[0, 0] + log_softmax[1, 1]) / 2
    mse = (0.25 + 0.25) / 2  # only row 0 has valence/arousal and is not padding
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.7 * ce + 2.0 * mse, rtol=1e-6)


def test_class_weights_scale_the_cross_entropy_only():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [5.0, 5.0]])
    va_pred = jnp.array([[0.5, 0.5], [0.2, 0.0], [0.0, -0.4], [9.0, 9.0]])
    batch = {
        "expression": jnp.array([0, 1, 1, 0]),
        "valence_arousal": jnp.array([[0.0, 1.0], [0.0, 0.0], [0.3, 0.0], [0.0, 0.0]]),
        "has_va": jnp.array([1.0, 1.0, 1.0, 1.0]),
        "mask": jnp.array([1.0, 1.0, 1.0, 0.0]),  # the last row is padding
    }
    outputs = {"class_logits": logits, "valence_arousal": va_pred}
    config = tiny_config()
    config.loss_weights.ccc = 0.5
    plain_loss, plain = steps.compute_loss(outputs, batch, config.loss_weights)
    class_weights = jnp.array([2.0, 0.5])
    loss, terms = steps.compute_loss(outputs, batch, config.loss_weights, class_weights)
    row_ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["expression"][:, None], -1)[
        :3, 0
    ]
    np.testing.assert_allclose(
        terms["ce"], (2.0 * row_ce[0] + 0.5 * row_ce[1:].sum()) / 3, rtol=1e-6
    )
    # The regression terms are the unweighted ones.
    np.testing.assert_array_equal(terms["mse"], plain["mse"])
    np.testing.assert_array_equal(terms["ccc_loss"], plain["ccc_loss"])
    np.testing.assert_allclose(loss - plain_loss, terms["ce"] - plain["ce"], rtol=1e-5)
    # Weights of 1 are no weighting.
    _, ones = steps.compute_loss(outputs, batch, config.loss_weights, jnp.ones(2))
    np.testing.assert_allclose(ones["ce"], plain["ce"], rtol=1e-6)


def _numpy_ccc(y, p, w):
    """Weighted concordance correlation with population moments, in float64: the rows of
    weight 0 do not count, the others count in proportion to their weight."""
    y, p, w = (np.asarray(a, np.float64) for a in (y, p, w))
    my, mp = np.average(y, weights=w), np.average(p, weights=w)
    cov = np.cov(y, p, aweights=w, bias=True)
    return 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (my - mp) ** 2)


def test_weighted_ccc_matches_numpy():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50) + 0.3
    w = rng.uniform(0.2, 3.0, 50)
    w[::7] = 0.0  # masked rows
    y_masked = y.copy()
    y_masked[::7] = 40.0  # would dominate every moment if a masked row counted
    got = steps.weighted_ccc(jnp.asarray(y_masked), jnp.asarray(p), jnp.asarray(w))
    np.testing.assert_allclose(got, _numpy_ccc(y, p, w), rtol=1e-5)
    # Unit weights on the kept rows: the textbook CCC of those rows alone.
    kept = w > 0
    cov = np.cov(y[kept], p[kept], bias=True)
    textbook = 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (y[kept].mean() - p[kept].mean()) ** 2)
    got = steps.weighted_ccc(jnp.asarray(y_masked), jnp.asarray(p), jnp.asarray(kept * 1.0))
    np.testing.assert_allclose(got, textbook, rtol=1e-5)


def test_ccc_loss_term_is_added_when_weighted():
    """The train step's loss is CE + MSE + 0.5 * mean over valence/arousal of (1 - CCC), the
    CCC taken in NumPy over the rows that are neither padding nor without valence/arousal."""
    config = tiny_config()
    config.loss_weights.ccc = 0.5
    config.model.dropout = 0.0
    graphdef, tx, state = steps.create_train_state(config, steps.create_initial_model(config))
    batch = dict(one_batch(config))
    batch["mask"] = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)  # rows 2, 6: padding
    batch["has_va"] = np.array([1, 0, 1, 1, 1, 0, 1, 1], np.float32)  # rows 1, 5: no labels
    va = batch["valence_arousal"].copy()
    va[[1, 2, 5, 6]] = [[0.9, -0.9], [-0.9, 0.9], [0.8, 0.8], [-0.8, -0.8]]
    batch["valence_arousal"] = va
    _, out = jax.jit(steps.make_train_step(graphdef, tx, config))(
        state, sharding.shard_batch(batch, sharding.make_mesh())
    )
    pred = np.asarray(out["valence_arousal"], np.float64)
    kept = (batch["mask"] * batch["has_va"]) > 0  # rows 0, 3, 4, 7
    expected = np.mean([1 - _numpy_ccc(va[kept, d], pred[kept, d], np.ones(4)) for d in (0, 1)])
    np.testing.assert_allclose(out["ccc_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], out["ce"] + out["mse"] + 0.5 * expected, rtol=1e-5)


def test_frozen_backbone_does_not_change(tiny):
    tiny.model.freeze_backbone = True
    graphdef, tx, state = steps.create_train_state(tiny, steps.create_initial_model(tiny))
    before = jax.tree.map(np.array, {"p": state["params"]["backbone"], "s": state["batch_stats"]})
    head_before = np.array(jax.tree.leaves(state["params"]["class_output"])[0])
    batch = sharding.shard_batch(one_batch(tiny), sharding.make_mesh())
    state, _ = jax.jit(steps.make_train_step(graphdef, tx, tiny))(state, batch)
    after = {"p": state["params"]["backbone"], "s": state["batch_stats"]}
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, after))
    assert not np.array_equal(head_before, jax.tree.leaves(state["params"]["class_output"])[0])


def test_abstract_train_state_has_the_train_states_shapes(tiny):
    graphdef, shapes = steps.abstract_train_state(tiny)
    _, _, state = steps.create_train_state(tiny, steps.create_initial_model(tiny))
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    for abstract, real in zip(jax.tree.leaves(shapes), jax.tree.leaves(state), strict=True):
        assert isinstance(abstract, jax.ShapeDtypeStruct)
        assert (abstract.shape, abstract.dtype) == (real.shape, real.dtype)
    assert graphdef == steps.create_train_state(tiny, steps.create_initial_model(tiny))[0]


@pytest.mark.parametrize("flip_tta", [False, True])
def test_predict_step_is_the_eval_steps_forward_pass(tiny, flip_tta):
    """Images alone give the evaluation step's probabilities and valence/arousal."""
    graphdef, _, state = steps.create_train_state(tiny, steps.create_initial_model(tiny))
    batch = one_batch(tiny)
    predicted = jax.jit(steps.make_predict_step(graphdef, flip_tta))(
        {"params": state["params"], "batch_stats": state["batch_stats"]}, batch["image"]
    )
    evaluated = jax.jit(steps.make_eval_step(graphdef, flip_tta))(state, batch)
    assert set(predicted) == {"probs", "valence_arousal"}
    for key, value in predicted.items():
        np.testing.assert_allclose(value, evaluated[key], rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(predicted["probs"].sum(-1), 1.0, rtol=1e-5)
    # The flipped copy counts: averaging changes the outputs.
    other = jax.jit(steps.make_predict_step(graphdef, not flip_tta))(state, batch["image"])
    assert not np.allclose(other["probs"], predicted["probs"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_several_steps_per_call_match_one_step_per_call(name):
    """The lax.scan of make_train_steps computes what the same steps called one by one do.

    Up to float32 round-off: with the extension's convolutions the states and outputs are
    bit-identical; with XLA's, XLA orders the loop body's reductions differently, and Adam turns
    round-off in near-zero gradients into +-lr moves (STEPS_PER_CALL_TOLERANCE). The same steps
    with the batches in reverse order are >= 1.4e-3 apart.
    """
    config, mesh, (graphdef, tx, state), splits = tiny_run(name)
    batches = list(pipeline.train_batches(splits.train, config, 0, 8).take(3).as_numpy_iterator())
    step = jax.jit(steps.make_train_step(graphdef, tx, config))
    one_by_one, outs = state, []
    for batch in batches:
        one_by_one, out = step(one_by_one, sharding.shard_batch(batch, mesh))
        outs.append(out)
    chunk = stack_batches(batches)
    train_steps = jax.jit(steps.make_train_steps(steps.make_train_step(graphdef, tx, config)))
    together, stacked = train_steps(state, sharding.shard_batch(chunk, mesh, stacked=True))
    assert int(together["step"]) == 3
    if bit_identical(config):  # states and every per-step output
        for a, b in zip(jax.tree.leaves(one_by_one), jax.tree.leaves(together), strict=True):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        for i, out in enumerate(outs):
            for key, value in out.items():
                np.testing.assert_array_equal(stacked[key][i], value, f"{key} of step {i + 1}")
    for group in ("params", "batch_stats", "opt_state"):
        if jax.tree.leaves(one_by_one[group]):
            distance = _relative_distance(one_by_one[group], together[group])
            assert distance <= STEPS_PER_CALL_TOLERANCE["state"], (group, distance)
    for i, out in enumerate(outs):  # per-step outputs, in order
        assert np.array_equal(stacked["predicted_class"][i], out["predicted_class"])
        for key, value in out.items():
            if key != "predicted_class":
                error = _relative_distance(value, stacked[key][i])
                assert error <= STEPS_PER_CALL_TOLERANCE["outputs"], (key, i + 1, error)
    # A chunk of one step takes the plain step (no loop) and still stacks its outputs.
    _, single = train_steps(
        state, sharding.shard_batch({k: v[:1] for k, v in chunk.items()}, mesh, stacked=True)
    )
    assert single["loss"].shape == (1,)
    np.testing.assert_allclose(single["loss"][0], outs[0]["loss"], rtol=1e-6)


def test_compiled_initialisation_gives_the_eager_parameters():
    """``init_model``'s one program gives bit for bit the parameters of eager construction."""
    from flax import nnx

    from affect_jax import models

    config = tiny_config(**{"model.name": "resnet50", "seed": 3})  # BatchNorm statistics too
    eager = nnx.state(models.create_model(config, nnx.Rngs(params=config.seed)))
    compiled = nnx.state(steps.init_model(config))
    assert jax.tree.structure(compiled) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compiled_train_state_is_the_eager_one():
    """``create_train_state`` builds the optimizer state and counters in one program: bit for
    bit what the optimizer's eager ``init`` and the eager counters give."""
    config = tiny_config(**{"model.name": "resnet50", "seed": 3})
    model = steps.create_initial_model(config)
    _, tx, state = steps.create_train_state(config, model)
    eager = {
        "params": state["params"],
        "batch_stats": state["batch_stats"],
        "opt_state": tx.init(state["params"]),
        "step": jnp.zeros((), jnp.int32),
        "epoch": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(config.seed),
    }
    assert jax.tree.structure(state) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(eager), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
