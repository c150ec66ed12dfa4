"""The training driver: non-finite losses, progress lines (the whole run: test_main.py)."""

import concurrent.futures
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from affect_jax import (
    checkpointing,
    console,
    progress,
    run_dir,
    sharding,
    steps,
    train,
    train_call,
)
from tests.conftest import one_batch, stack_batches, tiny_config


def test_non_finite_loss_names_the_step():
    config = tiny_config(learning_rate=1e12)
    config.model.dropout = 0.0
    graphdef, tx, state = steps.create_train_state(config, steps.create_initial_model(config))
    train_steps = jax.jit(steps.make_train_steps(steps.make_train_step(graphdef, tx, config)))
    chunk = sharding.shard_batch(
        stack_batches([one_batch(config)] * 20), sharding.make_mesh(), stacked=True
    )
    _, out = train_steps(state, chunk)
    losses = np.asarray(out["loss"])
    first_bad = int(np.argmin(np.isfinite(losses)))
    assert not np.isfinite(losses[first_bad]) and np.isfinite(losses[:first_bad]).all()
    # Steps 1-100 ran before this call: the message names the global step number.
    with pytest.raises(train.NonFiniteLossError, match=rf"at step {100 + first_bad + 1} "):
        train.fetch_checked_outputs(100, out)


def test_setup_starts_from_the_initial_state_built_elsewhere(tmp_path):
    """``main`` builds the initial state while TensorFlow is imported; setup takes it."""
    built = steps.initial_train_state(tiny_config(seed=1))  # not what seed 0 would build
    future = concurrent.futures.Future()
    future.set_result(built)
    run = train.setup(tiny_config(), str(tmp_path), future)
    try:
        for got, want in zip(jax.tree.leaves(run.state), jax.tree.leaves(built), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    finally:
        run.manager.close()
        run.writer.close()


@pytest.mark.parametrize("case", ["fits", "class_weights", "short_epoch"])
def test_setup_runs_mains_early_train_call_only_when_the_data_give_that_call(tmp_path, case):
    """``main`` compiles the train call before the data are read (``compile_early``); setup runs
    it, and it trains as setup's own call does, unless class weights or an epoch shorter than a
    call make the data's call another one."""
    config = tiny_config(steps_per_execution=2)
    if case == "class_weights":
        config.loss_weights.class_weighting = "inverse_frequency"
    if case == "short_epoch":  # 40 training examples: 5 batches, fewer than a call's 8
        config.update_from_flattened_dict(
            {"data.synthetic_size": 50, "steps_per_epoch": 8, "steps_per_execution": 8}
        )
    made = train_call.compile_early(config)
    early = concurrent.futures.Future()
    early.set_result(made)
    run = train.setup(config, str(tmp_path / "early"), None, early)
    own = train.setup(config, str(tmp_path / "own"))
    try:
        (calls,) = run.compiled_ahead
        taken = run.compiled_ahead[calls] is made.compiled
        assert taken == (case == "fits")
        assert (run.train_steps is made.train_steps) == taken
        if taken:
            assert own.compiled_ahead[calls] is not made.compiled
            chunk = sharding.shard_batch(
                stack_batches([one_batch(config)] * calls), run.mesh, stacked=True
            )
            reporter = progress.ProgressReporter(
                num_epochs=1, steps_per_epoch=calls, batch_size=8, log_every_steps=calls
            )
            for r in (run, own):
                train._train_call(r, chunk, calls, reporter)
            for got, want in zip(
                jax.tree.leaves(run.state), jax.tree.leaves(own.state), strict=True
            ):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    finally:
        for r in (run, own):
            r.manager.close()
            r.writer.close()


def test_the_early_train_call_imports_no_tensorflow():
    """``main`` compiles it while TensorFlow is imported, so it must not need TensorFlow."""
    code = (
        "import sys; from affect_jax import main, steps, train_call; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _fail(*_):
    raise AssertionError("a model was initialised")


@pytest.mark.parametrize("damaged", [False, True])
def test_setup_restores_a_run_into_place_and_initialises_it_if_nothing_restores(
    tmp_path, monkeypatch, damaged
):
    """A run with a checkpoint is restored from the state's shapes: no model is initialised
    (the values would be overwritten), unless its only checkpoint, a mid-epoch one, is damaged."""
    config = tiny_config()
    run = train.setup(config, str(tmp_path))
    saved = jax.tree.map(np.asarray, run.state)
    saved["step"] = np.asarray(3, np.int32)  # not what a fresh state holds
    mid_dir = run_dir.mid_epoch_checkpoint_dir(str(tmp_path))
    manager = checkpointing.create_mid_epoch_manager(mid_dir)
    arrays = {"outputs": {"loss": np.zeros((3, 8), np.float32)}, "targets": {}}
    position = {"epoch": 0, "step_in_epoch": 3, "steps_per_epoch": 4, "train_seconds": 1.0}
    checkpointing.save_mid_epoch(manager, 3, sharding.replicate(saved, run.mesh), arrays, position)
    manager.close()
    run.manager.close()
    run.writer.close()
    if damaged:
        files = [os.path.join(d, f) for d, _, names in os.walk(mid_dir) for f in names]
        os.truncate(max(files, key=os.path.getsize), 100)
    else:
        monkeypatch.setattr(steps, "init_model", _fail)
    resumed = train.setup(config, str(tmp_path))
    try:
        want = jax.tree.map(np.asarray, steps.initial_train_state(config)) if damaged else saved
        for got, w in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(got), w)
        assert (resumed.resumed is None) == damaged
    finally:
        resumed.manager.close()
        resumed.writer.close()


def _toy_run(rows_ahead: int):
    """A run whose train call adds its batches' sum to the state, compiled ahead for chunks of
    2 batches of ``rows_ahead`` rows."""
    mesh = sharding.make_mesh()

    def train_steps(state, chunk):
        w = state["w"] + chunk["x"].sum()
        return {"w": w}, {"loss": jnp.broadcast_to(w, chunk["x"].shape[:1])}

    jitted = jax.jit(train_steps, donate_argnums=(0,))
    state = sharding.replicate({"w": jnp.zeros((), jnp.float32)}, mesh)
    fields = {"x": ((), np.dtype(np.float32))}
    shapes = (
        sharding.replicated_shapes(state, mesh),
        sharding.batch_shapes(fields, rows_ahead, mesh, batches=2),
    )
    ahead = train_call.compile_ahead(jitted, shapes)
    run = types.SimpleNamespace(
        state=state, train_steps=jitted, executables={}, compiled_ahead={2: ahead}
    )
    reporter = progress.ProgressReporter(
        num_epochs=1, steps_per_epoch=4, batch_size=rows_ahead, log_every_steps=2
    )
    return run, ahead, reporter, mesh


@pytest.mark.parametrize("rows", [4, 8])
def test_a_call_compiled_ahead_runs_only_the_arguments_it_was_compiled_for(monkeypatch, rows):
    """Setup compiles the first train call from shapes (``compile_ahead``); the first call uses
    it when its state and chunk are what it was compiled for, else compiles the call again."""
    lines = _lines(monkeypatch)
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    run, ahead, reporter, mesh = _toy_run(rows_ahead=4)
    chunk = sharding.shard_batch({"x": np.ones((2, rows), np.float32)}, mesh, stacked=True)
    out = train._train_call(run, chunk, 2, reporter)
    assert float(run.state["w"]) == 2 * rows
    np.testing.assert_array_equal(out["loss"], [2 * rows, 2 * rows])
    assert not run.compiled_ahead
    if rows == 4:
        assert run.executables[2] is ahead.executable
        assert "train call in " in lines[0] and " s while the model was built " in lines[0]
        assert not warnings
    else:
        assert run.executables[2] is not ahead.executable
        assert "while the model was built" not in lines[0]
        assert warnings == ["The 2-step train call compiled ahead does not fit; recompiling"]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _lines(monkeypatch):
    lines = []
    monkeypatch.setattr(logging, "info", lambda fmt, *args, **kwargs: lines.append(fmt % args))
    return lines


def test_progress_rate_is_right_from_the_first_call(monkeypatch):
    """A compiling call counts with its run time alone; the time between epochs is left out of
    the rate and added to the ETA once measured."""
    lines = _lines(monkeypatch)
    clock = FakeClock()
    reporter = progress.ProgressReporter(
        num_epochs=2,
        steps_per_epoch=10,
        batch_size=4,
        log_every_steps=5,
        clock=clock,
        interactive=False,
    )
    reporter.start()  # epoch 1
    reporter.stop()  # before the first call compiles
    clock.now += 30.0  # compiling (25 s) and running (5 s) the 5-step call
    reporter.compiled(5, 25.0, 30.0)
    reporter.after_call(0, 0, 5, lambda: 1.5)
    assert "Compiled the 5-step train call in 25.0 s" in lines[0]
    assert "its first call took 5.0 s" in lines[0]
    assert lines[1].endswith("step 5/20 (5/10 in epoch): loss 1.5000, 4.0 img/s, ETA 0m15s")
    clock.now += 2.0  # 5 timed steps in 2 s: 10 steps in 7 s
    reporter.count(5)
    reporter.after_call(0, 5, 5, lambda: 1.25)
    assert lines[2].endswith("step 10/20 (10/10 in epoch): loss 1.2500, 5.7 img/s, ETA 0m07s")
    reporter.stop()
    clock.now += 100.0  # validation, checkpoint: not timed
    reporter.epoch_done(
        {
            "epoch": 1,
            "epoch_time_s": 107.0,
            "train_time_s": 7.0,
            "train_loss": 1.3,
            "train_accuracy": 0.5,
        },
        {"loss": 1.2, "accuracy": 0.5, "f1_macro": float("nan")},
    )
    assert lines[3].endswith(
        "train loss 1.3000 acc 0.500 | val loss 1.2000 acc 0.500 "
        "balanced acc n/a F1 n/a mean CCC n/a"
    )
    reporter.start()  # epoch 2
    clock.now += 3.0  # 5 steps in 3 s: 15 steps in 10 s so far
    reporter.count(5)
    reporter.after_call(1, 10, 5, lambda: 1.0)
    # 5 steps at 1.5 steps/s, then epoch 2's validation and checkpoint (100 s, as epoch 1's).
    assert lines[4].endswith(
        "epoch 2/2 step 15/20 (5/10 in epoch): loss 1.0000, 6.0 img/s, ETA 1m43s"
    )
    assert reporter.steps_per_second == pytest.approx(1.5)


class FakeStream:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_bar_on_a_terminal(monkeypatch):
    """The bar is redrawn after every call; the progress lines go to the log file only."""
    records = []
    monkeypatch.setattr(logging, "info", lambda fmt, *args, **kwargs: records.append(kwargs))
    stream = FakeStream()
    clock = FakeClock()
    reporter = progress.ProgressReporter(
        num_epochs=1,
        steps_per_epoch=8,
        batch_size=2,
        log_every_steps=4,
        clock=clock,
        interactive=True,
        status=console.StatusLine(stream),
    )
    reporter.start()
    clock.now += 1.0
    reporter.count(2)
    reporter.after_call(0, 0, 2, lambda: 2.0)
    assert stream.text.endswith("epoch 1/1 [#####---------------] 2/8 | 4.0 img/s | ETA 0m03s")
    clock.now += 1.0
    reporter.count(2)
    reporter.after_call(0, 2, 2, lambda: 1.5)
    assert stream.text.endswith(
        "epoch 1/1 [##########----------] 4/8 | loss 1.5000 | 4.0 img/s | ETA 0m02s"
    )
    assert records == [{"extra": console.FILE_ONLY}]  # the line at step 4, for the log file
    reporter.epoch_done(
        {
            "epoch": 1,
            "epoch_time_s": 5.0,
            "train_time_s": 4.0,
            "train_loss": 1.3,
            "train_accuracy": 0.5,
        },
        {"loss": 1.2, "accuracy": 0.5, "f1_macro": 0.25, "mean_ccc": 0.5},
    )
    assert stream.text.endswith("\r\033[K")  # the bar is gone before the summary


def test_progress_logs_when_a_call_passes_a_multiple_of_log_every(monkeypatch):
    lines = _lines(monkeypatch)
    reporter = progress.ProgressReporter(
        num_epochs=1,
        steps_per_epoch=12,
        batch_size=8,
        log_every_steps=2,
        clock=FakeClock(),
        interactive=False,
    )
    fetched = []
    for step, n in ((0, 3), (3, 3), (6, 1), (7, 1), (8, 3), (11, 1)):
        reporter.after_call(0, step, n, lambda step=step: fetched.append(step) or 0.0)
    assert [line.split(":")[0] for line in lines] == [
        "epoch 1/1 step 3/12 (3/12 in epoch)",
        "epoch 1/1 step 6/12 (6/12 in epoch)",
        "epoch 1/1 step 8/12 (8/12 in epoch)",
        "epoch 1/1 step 11/12 (11/12 in epoch)",
        "epoch 1/1 step 12/12 (12/12 in epoch)",
    ]
    assert fetched == [0, 3, 7, 8, 11]  # the loss is fetched only for a line


def test_format_duration():
    assert progress.format_duration(65) == "1m05s"
    assert progress.format_duration(3725.4) == "1h02m05s"


def test_seconds_since_launch_is_the_process_age():
    """The first-call log line's 'after launch' is the process's age (psutil's reference)."""
    import time

    import psutil

    expected = time.time() - psutil.Process().create_time()
    got = train.seconds_since_launch()
    if got is None:
        pytest.skip("no /proc on this platform")
    # psutil's start time counts from a boot time in whole seconds.
    assert abs(got - expected) < 1.1
