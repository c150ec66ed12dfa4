"""Train/eval steps, losses, checkpoints."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import checkpointing, train
from affect_jax.data import pipeline
from affect_jax.ops import conv as conv_ops
from tests.conftest import tiny_config


def _one_batch(config, n=8):
    splits = pipeline.make_splits(config)
    batches = pipeline.train_batches(splits.train, config, 0, n)
    return next(batches.as_numpy_iterator())


def test_loss_goes_down_when_overfitting_one_batch():
    config = tiny_config(learning_rate=1e-3)
    config.model.dropout = 0.0
    config.model.name = "resnet50"
    config.model.width = 1 / 8
    config.model.hidden_sizes = (64,)
    mesh = train.make_mesh()
    graphdef, tx, state = train.create_train_state(config, train.create_model(config))
    step = jax.jit(train.make_train_step(graphdef, tx, config))
    batch = train.shard_batch(_one_batch(config), mesh)
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
    loss, terms = train.compute_loss(
        {"class_logits": logits, "valence_arousal": va_pred}, batch, weights)
    log_softmax = jax.nn.log_softmax(logits)
    ce = -(log_softmax[0, 0] + log_softmax[1, 1]) / 2
    mse = (0.25 + 0.25) / 2  # only row 0 has valence/arousal and is not padding
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.7 * ce + 2.0 * mse, rtol=1e-6)


def test_weighted_ccc_matches_numpy():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50) + 0.3
    cov = np.cov(y, p, bias=True)
    expected = 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (y.mean() - p.mean()) ** 2)
    got = train.weighted_ccc(jnp.asarray(y), jnp.asarray(p), jnp.ones(50))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ccc_loss_term_is_added_when_weighted():
    config = tiny_config()
    config.loss_weights.ccc = 0.5
    graphdef, tx, state = train.create_train_state(config, train.create_model(config))
    batch = train.shard_batch(_one_batch(config), train.make_mesh())
    _, out = jax.jit(train.make_train_step(graphdef, tx, config))(state, batch)
    np.testing.assert_allclose(
        out["loss"], out["ce"] + out["mse"] + 0.5 * out["ccc_loss"], rtol=1e-5)


def test_frozen_backbone_does_not_change(tiny):
    tiny.model.freeze_backbone = True
    graphdef, tx, state = train.create_train_state(tiny, train.create_model(tiny))
    before = jax.tree.map(np.array, {"p": state["params"]["backbone"],
                                     "s": state["batch_stats"]})
    head_before = np.array(jax.tree.leaves(state["params"]["class_output"])[0])
    batch = train.shard_batch(_one_batch(tiny), train.make_mesh())
    state, _ = jax.jit(train.make_train_step(graphdef, tx, tiny))(state, batch)
    after = {"p": state["params"]["backbone"], "s": state["batch_stats"]}
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, after))
    assert not np.array_equal(head_before, jax.tree.leaves(state["params"]["class_output"])[0])


def _stack(batches):
    """Batches stacked on a leading axis, as the driver feeds ``make_train_steps``."""
    return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


def test_non_finite_loss_names_the_step():
    config = tiny_config(learning_rate=1e12)
    config.model.dropout = 0.0
    graphdef, tx, state = train.create_train_state(config, train.create_model(config))
    steps = jax.jit(train.make_train_steps(train.make_train_step(graphdef, tx, config)))
    chunk = train.shard_batch(_stack([_one_batch(config)] * 20), train.make_mesh(), stacked=True)
    _, out = steps(state, chunk)
    losses = np.asarray(out["loss"])
    first_bad = int(np.argmin(np.isfinite(losses)))
    assert not np.isfinite(losses[first_bad]) and np.isfinite(losses[:first_bad]).all()
    # Steps 1-100 ran before this call: the message names the global step number.
    with pytest.raises(train.NonFiniteLossError, match=rf"at step {100 + first_bad + 1} "):
        train._fetch_checked(100, out)


def _relative_distance(a, b):
    """||a - b|| / ||a|| over all elements of two pytrees."""
    a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
            for t in (a, b))
    return np.linalg.norm(a - b) / np.linalg.norm(a)


def _tiny_run(name: str):
    """(config, mesh, (graphdef, tx, state), splits) of a 1/16-width `name` on tiny data."""
    config = tiny_config()
    config.model.name = name
    config.model.width = 1 / 16
    state = train.create_train_state(config, train.create_model(config))
    return config, train.make_mesh(), state, pipeline.make_splits(config)


def _bit_identical(config) -> bool:
    """Whether a loop over batches reproduces single calls bit for bit: with the extension's
    convolutions (deterministic kernels); XLA's may fuse the loop body differently."""
    return conv_ops.resolve_impl(config.conv_impl) in ("onednn", "winograd")


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_several_steps_per_call_match_one_step_per_call(name):
    """The lax.scan of make_train_steps computes what the same steps called one by one do.

    Up to float32 round-off: with oneDNN's convolutions the states are bit-identical; with
    XLA's, XLA orders the loop body's reductions differently, and Adam turns round-off in
    near-zero gradients into +-lr moves (measured: state 1.2e-5, loss 4e-5 relative). The same
    steps with the batches in reverse order are >= 1.4e-3 apart.
    """
    config, mesh, (graphdef, tx, state), splits = _tiny_run(name)
    batches = list(pipeline.train_batches(splits.train, config, 0, 8).take(3)
                   .as_numpy_iterator())
    step = jax.jit(train.make_train_step(graphdef, tx, config))
    one_by_one, outs = state, []
    for batch in batches:
        one_by_one, out = step(one_by_one, train.shard_batch(batch, mesh))
        outs.append(out)
    chunk = _stack(batches)
    steps = jax.jit(train.make_train_steps(train.make_train_step(graphdef, tx, config)))
    together, stacked = steps(state, train.shard_batch(chunk, mesh, stacked=True))
    assert int(together["step"]) == 3
    if _bit_identical(config):
        for a, b in zip(jax.tree.leaves(one_by_one), jax.tree.leaves(together), strict=True):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    for group in ("params", "batch_stats", "opt_state"):
        if jax.tree.leaves(one_by_one[group]):
            assert _relative_distance(one_by_one[group], together[group]) < 1e-4, group
    for i, out in enumerate(outs):  # per-step outputs, in order
        for key, value in out.items():
            np.testing.assert_allclose(stacked[key][i], value, rtol=1e-3, atol=1e-3,
                                       err_msg=f"{key} of step {i + 1}")
    # A chunk of one step takes the plain step (no loop) and still stacks its outputs.
    _, single = steps(state, train.shard_batch(
        {k: v[:1] for k, v in chunk.items()}, mesh, stacked=True))
    assert single["loss"].shape == (1,)
    np.testing.assert_allclose(single["loss"][0], outs[0]["loss"], rtol=1e-6)


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_several_eval_batches_per_call_match_one_per_call(name):
    """predict_split with make_eval_steps' lax.map gives the per-batch calls' predictions.

    7 batches of 3 in calls of 3 (the last call takes one), the last batch padded: the padding
    rows are dropped either way. Bit-identical with oneDNN's convolutions; float32 round-off with
    XLA's (the loop body's fusions may differ).
    """
    config, mesh, (graphdef, _, state), splits = _tiny_run(name)
    batches = list(itertools.islice(pipeline.eval_batches(splits.validation, config, 3), 7))
    assert len(batches) == 7
    # The last one padded, as eval_batches pads a split's last batch.
    batches[-1] = dict(batches[-1], mask=np.array([1, 0, 0], np.float32))
    eval_steps = jax.jit(train.make_eval_steps(train.make_eval_step(graphdef)))
    one = train.predict_split(eval_steps, state, batches, mesh)
    three = train.predict_split(eval_steps, state, batches, mesh, batches_per_call=3)
    assert len(one["probs"]) == 6 * 3 + 1
    assert set(one) == set(three)
    for key, value in one.items():
        if _bit_identical(config):
            np.testing.assert_array_equal(three[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(three[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # The labels come back in the batches' order.
    np.testing.assert_array_equal(
        one["expression"], np.concatenate([b["expression"][b["mask"] > 0] for b in batches]))
    with pytest.raises(ValueError, match="batches_per_call=0"):
        train.predict_split(eval_steps, state, batches, mesh, batches_per_call=0)


@pytest.mark.parametrize(("steps", "batch", "eval_batch", "expected"),
                         [(8, 32, 64, 4), (8, 32, 32, 8), (1, 32, 64, 1), (8, 32, 512, 1),
                          (3, 16, 20, 2)])
def test_evaluation_calls_hold_a_training_calls_images(steps, batch, eval_batch, expected):
    config = tiny_config(steps_per_execution=steps, batch_size=batch, eval_batch_size=eval_batch)
    assert train.eval_batches_per_call(config) == expected


def test_checkpoint_round_trip_is_exact(tmp_path, tiny):
    graphdef, tx, state = train.create_train_state(tiny, train.create_model(tiny))
    batch = train.shard_batch(_one_batch(tiny), train.make_mesh())
    state, _ = jax.jit(train.make_train_step(graphdef, tx, tiny))(state, batch)
    manager = checkpointing.create_manager(str(tmp_path), tiny)
    checkpointing.save(manager, 1, state, {"mean_ccc": 0.5, "accuracy": 0.2})
    manager.wait_until_finished()
    _, _, fresh = train.create_train_state(tiny, train.create_model(tiny))
    restored, epoch = checkpointing.restore_latest(manager, fresh)
    assert epoch == 1
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, restored))


def test_best_checkpoint_kept_beside_latest(tmp_path, tiny):
    tiny.keep_checkpoints = 1
    _, _, state = train.create_train_state(tiny, train.create_model(tiny))
    manager = checkpointing.create_manager(str(tmp_path), tiny)
    for epoch, ccc in enumerate([0.1, 0.6, float("nan"), 0.3], start=1):
        checkpointing.save(manager, epoch, state, {"mean_ccc": ccc})
        manager.wait_until_finished()
    assert manager.best_step() == 2
    assert sorted(manager.all_steps()) == [2, 4]


def test_batch_size_must_divide_devices(tiny):
    class FakeMesh:
        devices = np.zeros(3)

    with pytest.raises(ValueError, match="batch_size=8 is not divisible by the 3 devices"):
        train.check_batch_size(8, FakeMesh(), "batch_size")
