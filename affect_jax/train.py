"""The training driver: ``train_and_evaluate`` trains for ``config.num_epochs``, scoring
validation and checkpointing after every epoch, then scores the best checkpoint and writes the
run's reports.

``setup`` builds everything an epoch needs (resuming where the run's checkpoints left it),
``run_epoch`` runs one epoch, ``stop`` saves and ends a run stopped by a signal
(``graceful_stop``), ``finalize`` ends the run. The steps are in ``steps``, batch placement in
``sharding``, the scoring in ``evaluation`` and the run's files in ``run_dir``; the run holds its
workdir's lock (``run_lock``) throughout.

A run stopped mid-epoch saves a mid-epoch checkpoint (``checkpointing``): the state, the epoch's
per-step outputs and targets so far (its training metrics cover the whole epoch) and its step in
the epoch. Every epoch's batches are a function of (seed, epoch) (``pipeline``) and the dropout
key of (seed, global step), so the resumed run skips the batches done and trains the rest
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers

from affect_jax import (
    checkpointing,
    config_checks,
    console,
    distributed,
    evaluation,
    graceful_stop,
    host_memory,
    imbalance,
    metrics,
    run_dir,
    run_lock,
    sharding,
    steps,
    train_call,
)
from affect_jax.data import pipeline
from affect_jax.errors import UserError
from affect_jax.progress import ProgressReporter, format_number

TARGET_KEYS = ("expression", "valence_arousal", "has_va")


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class EpochSoFar:
    """The training steps of an epoch done so far: each step's outputs and targets."""

    steps: int = 0
    outputs: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    targets: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0

    def arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """Step-major arrays, as a mid-epoch checkpoint keeps them."""
        return {
            "outputs": {k: np.stack([o[k] for o in self.outputs]) for k in self.outputs[0]},
            "targets": {k: np.stack([t[k] for t in self.targets]) for k in TARGET_KEYS},
        }

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, dict[str, np.ndarray]], train_seconds: float
    ) -> EpochSoFar:
        n = len(arrays["outputs"]["loss"])
        return cls(
            n,
            [{k: v[i] for k, v in arrays["outputs"].items()} for i in range(n)],
            [{k: v[i] for k, v in arrays["targets"].items()} for i in range(n)],
            train_seconds,
        )


@dataclasses.dataclass
class Training:
    """A run being trained: what ``setup`` built and the train state so far."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    splits: pipeline.DataSplits
    steps_per_epoch: int
    state: steps.State
    completed_epochs: int  # restored from the latest checkpoint
    manager: ocp.CheckpointManager
    train_steps: Callable  # jitted steps.make_train_steps
    eval_steps: Callable  # jitted steps.make_eval_steps
    writer: metric_writers.MetricWriter
    # Epoch ``completed_epochs`` so far, restored from a mid-epoch checkpoint.
    resumed: EpochSoFar | None = None
    executables: dict[int, Callable] = dataclasses.field(default_factory=dict)  # per chunk length
    # Compiled from shapes (``train_call``: main's early compile or setup's), not yet called,
    # per chunk length.
    compiled_ahead: dict[int, train_call.CompiledAhead] = dataclasses.field(default_factory=dict)

    @property
    def is_chief(self) -> bool:
        return jax.process_index() == 0

    @property
    def history_path(self) -> str:
        return os.path.join(self.workdir, run_dir.METRICS_HISTORY)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    initial_state: concurrent.futures.Future | None = None,
    early_call: concurrent.futures.Future | None = None,
) -> dict[str, Any]:
    """Trains for ``config.num_epochs``, evaluating and checkpointing after every epoch.

    Resumes from the latest checkpoint in ``workdir``. ``initial_state`` and ``early_call``:
    the futures of ``steps.initial_train_state(config)`` and ``train_call.compile_early(config)``
    if they are being made elsewhere (``main`` makes them while TensorFlow is imported). Returns
    the final metrics record (also written to ``workdir/final_metrics.json``). Holds the
    workdir's lock; SIGINT or SIGTERM stop it at the next train call, saved, with
    ``graceful_stop.Stopped``.
    """
    with run_lock.hold(workdir, "train"), graceful_stop.StopSignals() as signals:
        run = setup(config, workdir, initial_state, early_call)
        progress = ProgressReporter(
            num_epochs=config.num_epochs,
            steps_per_epoch=run.steps_per_epoch,
            batch_size=config.batch_size,
            log_every_steps=config.log_every_steps,
        )
        with signals.deferred():
            for epoch in range(run.completed_epochs, config.num_epochs):
                run_epoch(run, epoch, progress, signals)
            run.manager.wait_until_finished()
            if signals.requested():  # came during the last epoch's validation or save
                stop(run, config.num_epochs, EpochSoFar(), signals.signum)
        final = finalize(run)
        run.manager.close()
        run.writer.close()
        return final


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def setup(
    config: ml_collections.ConfigDict,
    workdir: str,
    initial_state: concurrent.futures.Future | None = None,
    early_call: concurrent.futures.Future | None = None,
) -> Training:
    """Checks the config, reads the data, builds the state (restored from the latest checkpoint
    of ``workdir``, else initialised; from ``initial_state``'s result if given), the jitted
    steps and the metric writer. ``early_call``: the future of
    ``train_call.compile_early(config)``, taken when the data give the call it compiled."""
    config_checks.validate(config)
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0
    # A run with no checkpoint yet (stopped before its first epoch) takes the new config.
    if run_dir.has_checkpoints(workdir):
        run_dir.check_config(config, workdir, "resume")
    if is_chief:
        run_dir.save_config(config, workdir)
    mesh = sharding.make_mesh()

    # Process 0 first: it may prepare a data cache (TFDS) the others then read.
    with distributed.chief_first("make_splits"):
        splits = pipeline.make_splits(config, workdir if is_chief else None)
    if not splits.source.has_valence_arousal:
        logging.warning(
            "Data %r has no valence/arousal: the regression loss and metrics are skipped%s.",
            splits.source.name,
            f", and checkpoints are ranked by accuracy, not {config.best_metric}"
            if config.best_metric in checkpointing.REGRESSION_KEYS
            else "",
        )
    class_weights = imbalance.training_class_weights(
        config, splits.train.labels, splits.source.class_names, workdir if is_chief else None
    )
    steps_per_epoch = pipeline.steps_per_epoch(len(splits.train), config.batch_size)
    if config.steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)

    manager = run_dir.checkpoint_manager(workdir, config)
    calls = min(config.steps_per_execution, steps_per_epoch)  # batches per call but the last
    epochs_left = (manager.latest_step() or 0) < config.num_epochs
    # main's early compile fits unless the data shortened the call or weight the classes.
    fits = class_weights is None and train_call.calls_before_data(config) == calls
    early = early_call if early_call is not None and fits and epochs_left else None
    # A resumed run's state is restored straight into place, from its shapes.
    into_place = initial_state is None and run_dir.has_checkpoints(workdir)
    if early is None:
        graphdef, state_shapes, train_steps = train_call.jit_train_steps(config, class_weights)
    elif into_place:
        _, state_shapes = steps.abstract_train_state(config)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")
    try:
        # With epochs left and no early call that fits, the train call compiles from the
        # state's shapes in a second thread while the state is built or restored.
        ahead = None
        if early is None and epochs_left:
            shapes = train_call.call_shapes(config, state_shapes, mesh, calls)
            ahead = pool.submit(train_call.compile_ahead, train_steps, shapes)
        if into_place:
            like = sharding.replicated_shapes(state_shapes, mesh)
        else:
            state = initial_state.result() if initial_state else steps.initial_train_state(config)
            like = sharding.replicate(state, mesh)
        # Restored into the current mesh's shardings, whatever the device count that saved it.
        state, completed, resumed = restore_resume_point(workdir, manager, like, steps_per_epoch)
        if _is_abstract(state):  # only a damaged mid-epoch checkpoint was there
            state = sharding.replicate(steps.initial_train_state(config), mesh)
        if early is not None:
            made = early.result()
            graphdef, train_steps = made.graphdef, made.train_steps
            compiled_ahead = {calls: made.compiled}
        else:
            compiled_ahead = {calls: ahead.result()} if ahead is not None else {}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if completed > config.num_epochs:
        raise run_dir.IncompatibleConfigError(
            f"config.num_epochs={config.num_epochs} but {workdir} has already trained "
            f"{completed} epochs: pass --config.num_epochs={completed} or more, or use another "
            "--workdir"
        )
    if is_chief:
        run_dir.truncate_history(workdir, completed)
    if resumed:
        logging.info(
            "Resumed from epoch %d, step %d/%d of epoch %d (mid-epoch checkpoint) in %s",
            completed,
            resumed.steps,
            steps_per_epoch,
            completed + 1,
            workdir,
        )
    elif completed:
        logging.info(
            "Resumed from epoch %d (step %d) in %s", completed, completed * steps_per_epoch, workdir
        )
    # The initialisers' eager executables and heap, and the compilers' heap, are not needed
    # again.
    host_memory.release_host_memory(clear_jit_caches=True)

    # Validation calls, like training's, take several batches each.
    eval_steps = jax.jit(steps.make_eval_steps(steps.make_eval_step(graphdef)))
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if completed == 0 and resumed is None:
        writer.write_hparams(
            {k: str(v) for k, v in config.to_dict().items() if not isinstance(v, dict)}
        )
    return Training(
        config,
        workdir,
        mesh,
        splits,
        steps_per_epoch,
        state,
        completed,
        manager,
        train_steps,
        eval_steps,
        writer,
        resumed,
        compiled_ahead=compiled_ahead,
    )


def _is_abstract(tree: Any) -> bool:
    """Whether ``tree`` holds shapes (``jax.ShapeDtypeStruct``), not arrays."""
    return isinstance(jax.tree.leaves(tree)[0], jax.ShapeDtypeStruct)


def restore_resume_point(
    workdir: str,
    manager: ocp.CheckpointManager,
    like: steps.State,
    steps_per_epoch: int,
) -> tuple[steps.State, int, EpochSoFar | None]:
    """(state, completed epochs, the next epoch so far) where the run left off.

    The mid-epoch checkpoint if it continues the latest epoch's, else the latest epoch's
    checkpoint that restores (``checkpointing.restore_latest``), or ``like`` with 0 epochs. A
    mid-epoch checkpoint of an older epoch is dropped; one that cannot be restored is set aside.
    """
    damaged_dir = run_dir.damaged_checkpoints_dir(workdir)
    mid_dir = run_dir.mid_epoch_checkpoint_dir(workdir)
    mid_manager = (
        checkpointing.create_mid_epoch_manager(mid_dir) if os.path.isdir(mid_dir) else None
    )
    found = mid_manager and checkpointing.mid_epoch_position(mid_manager)
    damaged = None
    if found:
        step, position = found
        latest = manager.latest_step() or 0
        usable = (
            position.get("epoch") == latest and position.get("steps_per_epoch") == steps_per_epoch
        )
        if usable or not position:
            try:
                state, arrays = checkpointing.restore_mid_epoch(mid_manager, step, like)
            except Exception as e:  # whatever a damaged file raises
                damaged = (step, checkpointing.error_reason(e))
            else:
                mid_manager.close()
                return state, latest, EpochSoFar.from_arrays(arrays, position["train_seconds"])
    if mid_manager is not None:
        mid_manager.close()
    state, completed = checkpointing.restore_latest(manager, like, damaged_dir)
    if damaged and jax.process_index() == 0:
        step, why = damaged
        where = checkpointing.set_aside(mid_dir, step, damaged_dir, prefix="mid_epoch_step_")
        logging.warning(
            "Mid-epoch checkpoint %d of %s cannot be restored (%s); moved to %s; "
            "resuming from epoch %d",
            step,
            mid_dir,
            why,
            where,
            completed,
        )
    if mid_manager is not None and not found:
        drop_mid_epoch_checkpoint(workdir)  # only the leftovers of an interrupted save
    if found:
        if not damaged:
            logging.info(
                "Dropped the mid-epoch checkpoint %d (%s): it does not continue "
                "epoch %d's checkpoint",
                found[0],
                found[1],
                completed,
            )
        drop_mid_epoch_checkpoint(workdir)
    return state, completed, None


def drop_mid_epoch_checkpoint(workdir: str) -> None:
    """Deletes the mid-epoch checkpoint (its epoch is saved, or it does not fit the run)."""
    if jax.process_index() == 0:
        shutil.rmtree(run_dir.mid_epoch_checkpoint_dir(workdir), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------------------------


def run_epoch(
    run: Training, epoch: int, progress: ProgressReporter, signals: graceful_stop.StopSignals
) -> None:
    """Trains epoch ``epoch`` (0-based), scores validation, then writes the epoch's record and
    checkpoint; on a stop signal saves where it is and raises ``graceful_stop.Stopped``."""
    resumed = run.resumed if epoch == run.completed_epochs else None
    so_far = train_epoch(run, epoch, progress, resumed or EpochSoFar(), signals)
    if signals.requested():  # mid-epoch, or between the last train call and validation
        stop(run, epoch, so_far, signals.signum)
    record = {"epoch": epoch + 1, "step": (epoch + 1) * run.steps_per_epoch}
    # [steps, rows, ...] -> [rows, ...], step after step.
    record.update(
        epoch_train_metrics(
            so_far.outputs, {k: np.concatenate([t[k] for t in so_far.targets]) for k in TARGET_KEYS}
        )
    )
    val_start = time.time()
    val = evaluation.score_split(
        run.eval_steps, run.state, run.splits.validation, run.splits.source, run.config, run.mesh
    )
    record.update({f"val_{k}": v for k, v in val.items()})
    record["epoch_time_s"] = so_far.train_seconds + time.time() - val_start
    record["train_time_s"] = so_far.train_seconds
    run.state["epoch"] = sharding.replicate(jnp.asarray(epoch + 1, jnp.int32), run.mesh)
    if run.is_chief:
        run_dir.append_jsonl(run.history_path, record)
    scalars = {k: v for k, v in record.items() if np.isscalar(v) and k != "epoch"}
    run.writer.write_scalars(record["step"], scalars)
    run.writer.flush()
    checkpointing.save(run.manager, epoch + 1, run.state, val)
    if resumed is not None:  # the epoch's own checkpoint replaces the mid-epoch one
        run.manager.wait_until_finished()
        drop_mid_epoch_checkpoint(run.workdir)
        run.resumed = None
    host_memory.release_host_memory()  # e.g. the evaluation step's compiler heap
    progress.epoch_done(record, val)


def stop(run: Training, epoch: int, so_far: EpochSoFar, signum: int) -> None:
    """Ends a run stopped by ``signum`` in epoch ``epoch`` (0-based) after ``so_far.steps``
    steps: saves that point (unless it is an epoch's end, or the mid-epoch checkpoint the run
    resumed from), waits for every save, and raises ``graceful_stop.Stopped``."""
    num_epochs, spe = run.config.num_epochs, run.steps_per_epoch
    if so_far.steps == 0:
        where = f"after epoch {epoch}/{num_epochs}" if epoch else "before the first epoch"
    else:
        where = f"in epoch {epoch + 1}/{num_epochs} after step {so_far.steps}/{spe}"
        already_saved = (
            epoch == run.completed_epochs
            and run.resumed is not None
            and (run.resumed.steps == so_far.steps)
        )
        if not already_saved:
            mid_manager = checkpointing.create_mid_epoch_manager(
                run_dir.mid_epoch_checkpoint_dir(run.workdir)
            )
            checkpointing.save_mid_epoch(
                mid_manager,
                epoch * spe + so_far.steps,
                run.state,
                so_far.arrays(),
                {
                    "epoch": epoch,
                    "step_in_epoch": so_far.steps,
                    "steps_per_epoch": spe,
                    "train_seconds": so_far.train_seconds,
                },
            )
            mid_manager.close()
    run.manager.wait_until_finished()
    run.manager.close()
    run.writer.close()
    raise graceful_stop.Stopped(signum, where + " (saved)")


def train_epoch(
    run: Training,
    epoch: int,
    progress: ProgressReporter,
    so_far: EpochSoFar,
    signals: graceful_stop.StopSignals,
) -> EpochSoFar:
    """Trains epoch ``epoch`` (0-based) on from ``so_far`` in calls of ``steps_per_execution``
    steps, until its end or a stop signal (checked before every call); returns it so far."""
    start = time.time()
    config = run.config
    spe = run.steps_per_epoch
    pending = None  # (first step, outputs) of the previous call, fetched after the next
    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    # Chunks of per_call consecutive batches (the last one may be shorter): one call each.
    chunks = (
        pipeline.train_batches(
            run.splits.train,
            config,
            epoch,
            config.batch_size,
            start_step=so_far.steps,
            **process,
        )
        .take(spe - so_far.steps)
        .batch(config.steps_per_execution)
        .prefetch(1)
    )
    step = epoch * spe + so_far.steps  # steps done before this chunk
    progress.start()
    for chunk in chunks.as_numpy_iterator():
        if signals.requested():
            break
        global_chunk = sharding.shard_batch(chunk, run.mesh, stacked=True)
        n = len(chunk["mask"])
        out = _train_call(run, global_chunk, n, progress)
        # The whole global batches' targets (other processes hold the rest of them).
        targets = distributed.to_host({k: global_chunk[k] for k in TARGET_KEYS})
        so_far.targets += [{k: v[i] for k, v in targets.items()} for i in range(n)]
        if pending is not None:
            so_far.outputs += fetch_checked_outputs(*pending)
        pending = (step, out)
        progress.after_call(epoch, step, n, lambda out=out: float(out["loss"][-1]))
        step += n
        so_far.steps += n
    if pending is not None:
        so_far.outputs += fetch_checked_outputs(*pending)
    progress.stop()
    so_far.train_seconds += time.time() - start
    return so_far


def _train_call(
    run: Training, chunk: steps.Batch, n: int, progress: ProgressReporter
) -> dict[str, jax.Array]:
    """Runs ``n`` steps on the stacked ``chunk``, compiling the call for a new length first."""
    if n in run.executables:
        run.state, out = run.executables[n](run.state, chunk)
        progress.count(n)
        return out
    # The first call, or the first shorter last chunk: timed alone, not with the previous one.
    jax.block_until_ready(run.state)
    progress.stop()
    compile_start = time.time()
    ahead = run.compiled_ahead.pop(n, None)
    if ahead is not None and ahead.signature != train_call.arg_signature((run.state, chunk)):
        # Not expected: the state or the batches are not what setup compiled for.
        logging.warning("The %d-step train call compiled ahead does not fit; recompiling", n)
        ahead = None
    if ahead is not None:
        run.executables[n] = ahead.executable
    else:
        run.executables[n] = run.train_steps.lower(run.state, chunk).compile()
        # The compiler's freed heap, before the step's temporaries are mapped.
        host_memory.release_host_memory()
    compile_seconds = time.time() - compile_start
    run.state, out = run.executables[n](run.state, chunk)
    jax.block_until_ready(out)
    progress.compiled(
        n,
        compile_seconds,
        time.time() - compile_start,
        ahead_seconds=ahead.seconds if ahead is not None else None,
    )
    launched = seconds_since_launch()
    if len(run.executables) == 1 and launched is not None:
        logging.info("The first train call finished %.1f s after launch", launched)
    return out


def seconds_since_launch() -> float | None:
    """Seconds since this process started (Linux's /proc), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (starttime, clock ticks after boot) is the 20th after the ')' of comm.
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def fetch_checked_outputs(
    first_step: int, out: dict[str, jax.Array]
) -> list[dict[str, np.ndarray]]:
    """Per-step host copies of a call's stacked outputs; stops at a non-finite loss.

    ``first_step``: steps done before the call (so its first step is number first_step + 1).
    """
    out = distributed.to_host(out)
    per_step = [{k: v[i] for k, v in out.items()} for i in range(len(out["loss"]))]
    for i, o in enumerate(per_step):
        if not math.isfinite(float(o["loss"])):
            raise NonFiniteLossError(
                f"training loss is {float(o['loss'])} at step {first_step + i + 1} "
                f"(cross-entropy {float(o['ce'])}, MSE {float(o['mse'])}); stopping. Try a "
                "lower learning rate, or check the data for bad values."
            )
    return per_step


def epoch_train_metrics(
    outputs: list[dict[str, np.ndarray]], targets: dict[str, np.ndarray]
) -> dict[str, float]:
    """Loss, accuracy and (with valence/arousal for every row) mean CCC of an epoch's steps."""
    pred = np.concatenate([o["predicted_class"] for o in outputs])
    va = np.clip(np.concatenate([o["valence_arousal"] for o in outputs]), -1.0, 1.0)
    result = {
        "train_loss": float(np.mean([o["loss"] for o in outputs])),
        "train_accuracy": float((pred == targets["expression"]).mean()),
    }
    if targets["has_va"].all():
        va_true = targets["valence_arousal"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.MetricWarning)
            result["train_mean_ccc"] = float(
                np.mean([metrics.ccc(va_true[:, d], va[:, d]) for d in range(2)])
            )
    return result


# ---------------------------------------------------------------------------------------------
# End of the run
# ---------------------------------------------------------------------------------------------


def _epoch_times(workdir: str) -> dict[str, float]:
    times = [r["epoch_time_s"] for r in run_dir.load_history(workdir)]
    return {
        "median": float(np.median(times)),
        "min": float(np.min(times)),
        "max": float(np.max(times)),
    }


def finalize(run: Training) -> dict[str, Any]:
    """Scores the best checkpoint on validation; writes final_metrics.json and the reports."""
    config, source, state = run.config, run.splits.source, run.state
    ranked = checkpointing.ranked_steps(run.manager, config, "best")
    best = ranked[0] if ranked else int(state["epoch"])
    if best != int(state["epoch"]):
        # A best checkpoint that cannot be restored is set aside for the next best.
        best, state = checkpointing.restore_first_intact(
            run.manager, ranked, state, run_dir.damaged_checkpoints_dir(run.workdir)
        )
    scores = evaluation.score_split(
        run.eval_steps, state, run.splits.validation, source, config, run.mesh
    )
    final = evaluation.result_record(
        config,
        source,
        scores,
        len(run.splits.validation),
        epochs=config.num_epochs,
        best_epoch=best,
        best_metric=config.best_metric,
        checkpoint="best",
        split="validation",
    )
    if run.is_chief:
        # Only process 0 writes (and so can read) the history.
        final["time_per_epoch_s"] = _epoch_times(run.workdir)
        run_dir.write_json(os.path.join(run.workdir, run_dir.FINAL_METRICS), final)
        from affect_jax import report  # matplotlib only where reports are written

        report.write_reports(run.workdir)
    logging.info(
        "Final (best epoch %d) validation metrics: %s",
        best,
        {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)},
        extra=console.FILE_ONLY,
    )
    logging.info(
        "Best epoch %d of %d: validation accuracy %.1f%%, macro F1 %s, mean CCC %s; results in %s",
        best,
        config.num_epochs,
        100 * scores["accuracy"],
        format_number(scores["f1_macro"]),
        format_number(scores.get("mean_ccc")),
        run.workdir,
    )
    return final
