"""A run's directory: checkpoints kept, picked and restored; config, classes, history files."""

import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from affect_jax import checkpointing, models, run_dir, sharding, steps
from affect_jax.data.source import AFFECTNET_CLASS_NAMES
from tests.conftest import one_batch


@pytest.fixture
def trained(tiny):
    """(config, state) after one training step of the tiny model."""
    graphdef, tx, state = steps.create_train_state(tiny, steps.create_initial_model(tiny))
    batch = sharding.shard_batch(one_batch(tiny), sharding.make_mesh())
    state, _ = jax.jit(steps.make_train_step(graphdef, tx, tiny))(state, batch)
    return tiny, state


@pytest.fixture
def run(tmp_path, trained):
    """A run directory with config.json and checkpoints 1-3, epoch 2 the best by mean CCC."""
    config, state = trained
    config.keep_checkpoints = 3
    workdir = str(tmp_path)
    run_dir.save_config(config, workdir)
    manager = run_dir.checkpoint_manager(workdir, config)
    for epoch, ccc in ((1, 0.1), (2, 0.6), (3, 0.3)):
        checkpointing.save(manager, epoch, state, {"mean_ccc": ccc, "accuracy": 0.2})
    manager.wait_until_finished()
    manager.close()
    return workdir, config, state


def _assert_same(a, b):
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
    )


def test_checkpoint_round_trip_is_exact(tmp_path, trained):
    tiny, state = trained
    manager = run_dir.checkpoint_manager(str(tmp_path), tiny)
    checkpointing.save(manager, 1, state, {"mean_ccc": 0.5, "accuracy": 0.2})
    manager.wait_until_finished()
    assert os.path.isdir(tmp_path / run_dir.CHECKPOINTS / "1")
    _, _, fresh = steps.create_train_state(tiny, steps.create_initial_model(tiny))
    restored, epoch = checkpointing.restore_latest(manager, fresh)
    assert epoch == 1
    _assert_same(state, restored)


def test_best_checkpoint_kept_beside_latest(tmp_path, tiny):
    tiny.keep_checkpoints = 1
    _, _, state = steps.create_train_state(tiny, steps.create_initial_model(tiny))
    manager = run_dir.checkpoint_manager(str(tmp_path), tiny)
    for epoch, ccc in enumerate([0.1, 0.6, float("nan"), 0.3], start=1):
        checkpointing.save(manager, epoch, state, {"mean_ccc": ccc})
        manager.wait_until_finished()
    assert manager.best_step() == 2
    assert sorted(manager.all_steps()) == [2, 4]


def test_choose_checkpoint_best_latest_or_a_step(run):
    workdir, config, _ = run
    manager = run_dir.open_checkpoints(workdir, config)
    assert run_dir.choose_checkpoint(manager) == 2
    assert run_dir.choose_checkpoint(manager, "best") == 2
    assert run_dir.choose_checkpoint(manager, "latest") == 3
    assert run_dir.choose_checkpoint(manager, "latest", step=1) == 1
    with pytest.raises(FileNotFoundError) as error:
        run_dir.choose_checkpoint(manager, step=7)
    assert str(error.value) == (
        f"no checkpoint 7 in {run_dir.checkpoints_dir(workdir)}; available: [1, 2, 3]"
    )
    with pytest.raises(ValueError, match=r"which='first'; expected one of \('best', 'latest'\)"):
        run_dir.choose_checkpoint(manager, "first")
    manager.close()


def test_best_without_saved_metrics_is_the_latest(tmp_path, trained):
    config, state = trained
    manager = run_dir.checkpoint_manager(str(tmp_path), config)
    for epoch in (1, 2):
        manager.save(epoch, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    assert run_dir.choose_checkpoint(manager, "best") == 2


@pytest.mark.parametrize("make", ["no_directory", "empty_directory"])
def test_a_run_without_checkpoints_is_one_clear_error(tmp_path, tiny, make):
    workdir = str(tmp_path)
    if make == "empty_directory":
        os.makedirs(run_dir.checkpoints_dir(workdir))
    with pytest.raises(FileNotFoundError) as error:
        run_dir.open_checkpoints(workdir, tiny)
    message = str(error.value)
    assert message.startswith(f"no checkpoints in {run_dir.checkpoints_dir(workdir)}: ")
    assert f"--workdir={workdir}" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        run_dir.restore_checkpoint(workdir, tiny, sharding.make_mesh())


def test_restore_checkpoint_gives_the_saved_state_replicated(run, monkeypatch):
    workdir, config, state = run

    create_model, built = models.create_model, []

    def abstract_only(*args, **kwargs):
        model = create_model(*args, **kwargs)
        built.append(all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(model))))
        return model

    monkeypatch.setattr(models, "create_model", abstract_only)
    step, graphdef, restored = run_dir.restore_checkpoint(workdir, config, sharding.make_mesh())
    assert built and all(built)  # shapes only: no model was initialised eagerly
    monkeypatch.undo()
    assert step == 2
    _assert_same(state, restored)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(restored))
    assert graphdef == steps.abstract_train_state(config)[0]
    step, _, _ = run_dir.restore_checkpoint(workdir, config, sharding.make_mesh(), "latest")
    assert step == 3
    step, _, _ = run_dir.restore_checkpoint(workdir, config, sharding.make_mesh(), step=1)
    assert step == 1


def test_restoring_variables_only_gives_the_saved_params_and_batch_stats(run):
    """Inference restores ``params`` and ``batch_stats`` alone, equal to the full restore's,
    with the same graphdef; the fallback past a damaged checkpoint restores them too."""
    workdir, config, state = run
    mesh = sharding.make_mesh()
    step, graphdef, variables = run_dir.restore_checkpoint(
        workdir, config, mesh, variables_only=True
    )
    assert step == 2 and sorted(variables) == ["batch_stats", "params"]
    _assert_same({"params": state["params"], "batch_stats": state["batch_stats"]}, variables)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(variables))
    assert graphdef == run_dir.restore_checkpoint(workdir, config, mesh)[1]
    assert run_dir.restore_checkpoint(workdir, config, mesh, step=1, variables_only=True)[0] == 1
    _damage(workdir, 2)
    step, _, variables = run_dir.restore_checkpoint(workdir, config, mesh, variables_only=True)
    assert step == 3 and sorted(variables) == ["batch_stats", "params"]
    _assert_same(state["params"], variables["params"])


def test_load_config_and_class_names(run, tmp_path_factory):
    workdir, config, _ = run
    loaded = run_dir.load_config(workdir)
    assert loaded.model.name == config.model.name and loaded.batch_size == config.batch_size
    # No final_metrics.json yet: AffectNet's order.
    assert run_dir.class_names(workdir, loaded) == tuple(AFFECTNET_CLASS_NAMES[:8])
    names = [f"c{k}" for k in range(8)]
    with open(os.path.join(workdir, run_dir.FINAL_METRICS), "w") as f:
        json.dump({"class_names": names}, f)
    assert run_dir.class_names(workdir, loaded) == tuple(names)
    missing = str(tmp_path_factory.mktemp("x") / "missing")
    with pytest.raises(FileNotFoundError, match="run directory .*missing' does not exist"):
        run_dir.load_config(missing)
    empty = str(tmp_path_factory.mktemp("empty"))
    with pytest.raises(FileNotFoundError, match="config.json not found: .* is not a run"):
        run_dir.load_config(empty)


def test_history_is_appended_and_truncated_to_checkpointed_epochs(tmp_path):
    path = tmp_path / run_dir.METRICS_HISTORY
    for epoch in (1, 2, 3):
        run_dir.append_jsonl(path, {"epoch": epoch, "loss": np.float32(0.5), "n": np.int64(2)})
    assert [r["epoch"] for r in run_dir.load_history(tmp_path)] == [1, 2, 3]
    assert run_dir.load_history(tmp_path)[0] == {"epoch": 1, "loss": 0.5, "n": 2}
    run_dir.truncate_history(str(tmp_path), 2)
    assert [r["epoch"] for r in run_dir.load_history(tmp_path)] == [1, 2]
    run_dir.truncate_history(str(tmp_path / "none"), 0)  # no history: nothing to do


def test_json_safe_and_eval_result_name():
    assert run_dir.json_safe({"a": (np.int32(1), np.float64(0.5)), "b": "x"}) == {
        "a": [1, 0.5],
        "b": "x",
    }
    assert run_dir.eval_result_name("test", "latest", True) == "eval_test_latest_flip.json"
    assert run_dir.eval_result_name("validation", "best", False) == "eval_validation_best.json"


def _damage(workdir, step):
    """Truncates the data files of checkpoint ``step`` (as a full disk or a crash would).

    Every one: which arrays share a data file varies from save to save, so truncating one file
    may leave the parameters readable."""
    files = [
        os.path.join(d, f)
        for d, _, names in os.walk(os.path.join(run_dir.checkpoints_dir(workdir), str(step)))
        for f in names
        if os.path.basename(d) == "d"  # OCDBT's data files
    ]
    assert files
    for path in files:
        os.truncate(path, min(100, os.path.getsize(path) // 2))


def test_a_damaged_best_checkpoint_is_set_aside_for_the_next_best(run, caplog):
    workdir, config, state = run  # epochs 1-3 by mean CCC: 2, 3, 1
    _damage(workdir, 2)
    mesh = sharding.make_mesh()
    with caplog.at_level("WARNING"):
        step, _, restored = run_dir.restore_checkpoint(workdir, config, mesh)
    assert step == 3
    _assert_same(state, restored)
    warning = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warning) == 1 and "\n" not in warning[0]
    assert warning[0].startswith(
        f"Checkpoint 2 of {run_dir.checkpoints_dir(workdir)} cannot be "
        "restored (ValueError: OUT_OF_RANGE: "
    )
    assert (
        f"moved to {run_dir.damaged_checkpoints_dir(workdir)}/2; using checkpoint 3" in (warning[0])
    )
    assert sorted(os.listdir(run_dir.checkpoints_dir(workdir))) == ["1", "3"]
    assert os.listdir(run_dir.damaged_checkpoints_dir(workdir)) == ["2"]
    # Set aside: the next choice does not see it.
    assert run_dir.restore_checkpoint(workdir, config, mesh)[0] == 3


def test_a_damaged_given_step_or_no_intact_checkpoint_is_one_clear_error(run):
    workdir, config, _ = run
    mesh = sharding.make_mesh()
    _damage(workdir, 1)
    with pytest.raises(checkpointing.CheckpointError) as error:
        run_dir.restore_checkpoint(workdir, config, mesh, step=1)
    assert str(error.value).startswith(
        f"checkpoint 1 of {run_dir.checkpoints_dir(workdir)} cannot be restored: ValueError: "
    )
    for step in (2, 3):
        _damage(workdir, step)
    with pytest.raises(checkpointing.CheckpointError) as error:
        run_dir.restore_checkpoint(workdir, config, mesh, "latest")
    message = str(error.value)
    assert message.startswith(
        f"no checkpoint in {run_dir.checkpoints_dir(workdir)} can be "
        "restored: 3: ValueError: OUT_OF_RANGE"
    )
    assert "; 2: " in message and "; 1: " in message and "none was moved" in message
    assert "\n" not in message
    assert sorted(os.listdir(run_dir.checkpoints_dir(workdir))) == ["1", "2", "3"]


def test_ranked_steps(run):
    workdir, config, _ = run
    manager = run_dir.open_checkpoints(workdir, config)
    assert checkpointing.ranked_steps(manager, config, "best") == [2, 3, 1]
    assert checkpointing.ranked_steps(manager, config, "latest") == [3, 2, 1]
    manager.close()


def test_mid_epoch_checkpoint_round_trip(tmp_path, trained):
    _, state = trained
    manager = checkpointing.create_mid_epoch_manager(str(tmp_path / "mid"))
    arrays = {
        "outputs": {"loss": np.array([0.5, 0.25], np.float32)},
        "targets": {"expression": np.array([[1, 2], [3, 4]], np.int32)},
    }
    position = {"epoch": 1, "step_in_epoch": 2, "steps_per_epoch": 4, "train_seconds": 1.5}
    checkpointing.save_mid_epoch(manager, 6, state, arrays, position)
    assert checkpointing.mid_epoch_position(manager) == (6, position)
    restored, restored_arrays = checkpointing.restore_mid_epoch(manager, 6, state)
    _assert_same(state, restored)
    _assert_same(arrays, restored_arrays)
    assert restored_arrays["outputs"]["loss"].dtype == np.float32
    manager.close()


def test_resume_config_check(run, caplog):
    workdir, config, _ = run
    assert run_dir.has_checkpoints(workdir)
    changed = config.copy_and_resolve_references()
    changed.num_epochs += 3
    changed.log_every_steps = 1
    changed.data.dir = "/moved/data"
    with caplog.at_level("INFO", logger="absl"):
        run_dir.check_config(changed, workdir)  # accepted, logged
    assert any(
        r.getMessage().startswith(
            f'Resume {workdir} with changed data.dir ("" -> '
            '"/moved/data"), log_every_steps (2 -> 1), num_epochs'
        )
        for r in caplog.records
    )
    changed.model.width = 0.125
    changed.seed = 1
    with pytest.raises(run_dir.IncompatibleConfigError) as error:
        run_dir.check_config(changed, workdir)
    assert str(error.value) == (
        f"cannot resume {workdir} with this config: model.width (0.0625 -> 0.125), seed (0 -> 1) "
        "differ from the run's config and would not fit its checkpoints or data split; start a "
        f"new run with another --workdir, or resume with the values of {workdir}/config.json"
    )
    with pytest.raises(
        run_dir.IncompatibleConfigError,
        match=r"cannot score .*: seed \(0 -> 1\) "
        r"differs .* score it with the values of ",
    ):
        changed.model.width = config.model.width
        run_dir.check_config(changed, workdir, "score")
    assert set(run_dir.CHANGEABLE_FIELDS) <= set(run_dir.flatten_config(config.to_dict()))


def test_leftovers_of_an_interrupted_save_are_ignored_then_removed(run):
    workdir, config, _ = run
    leftover = os.path.join(run_dir.checkpoints_dir(workdir), "4.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(leftover, "default"))
    manager = run_dir.open_checkpoints(workdir, config)  # read-only: ignored, left alone
    assert (
        sorted(manager.all_steps()) == [1, 2, 3]
        and run_dir.choose_checkpoint(manager, "latest") == 3
    )
    manager.close()
    assert os.path.isdir(leftover)
    run_dir.checkpoint_manager(workdir, config).close()  # what training opens: removes them
    for _ in range(200):  # in the background
        if not os.path.exists(leftover):
            break
        time.sleep(0.05)
    assert sorted(os.listdir(run_dir.checkpoints_dir(workdir))) == ["1", "2", "3"]


def test_saved_epochs_is_the_newest_epoch_checkpoint_on_disk(tmp_path):
    assert run_dir.saved_epochs(tmp_path) == 0
    for name in ("1", "3", "4.orbax-checkpoint-tmp-17", "notes"):
        os.makedirs(os.path.join(run_dir.checkpoints_dir(tmp_path), name))
    assert run_dir.saved_epochs(tmp_path) == 3
