"""The training driver: ``train_and_evaluate`` trains for ``config.num_epochs``, scoring
validation and checkpointing after every epoch, then scores the best checkpoint and writes the
run's reports.

``setup`` builds everything an epoch needs, ``train_epoch`` and ``end_epoch`` run one epoch,
``finalize`` ends the run. The steps are in ``steps``, batch placement in ``sharding``, the
scoring in ``evaluation`` and the run's files in ``run_dir``.
"""

from __future__ import annotations

import dataclasses
import math
import os
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
    host_memory,
    imbalance,
    metrics,
    run_dir,
    sharding,
    steps,
)
from affect_jax.data import pipeline
from affect_jax.errors import UserError
from affect_jax.progress import ProgressReporter, format_number

TARGET_KEYS = ("expression", "valence_arousal", "has_va")


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


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
    executables: dict[int, Callable] = dataclasses.field(default_factory=dict)  # per chunk length

    @property
    def is_chief(self) -> bool:
        return jax.process_index() == 0

    @property
    def history_path(self) -> str:
        return os.path.join(self.workdir, run_dir.METRICS_HISTORY)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains for ``config.num_epochs``, evaluating and checkpointing after every epoch.

    Resumes from the latest checkpoint in ``workdir``. Returns the final metrics record (also
    written to ``workdir/final_metrics.json``).
    """
    run = setup(config, workdir)
    progress = ProgressReporter(
        num_epochs=config.num_epochs, steps_per_epoch=run.steps_per_epoch,
        batch_size=config.batch_size, log_every_steps=config.log_every_steps,
    )
    for epoch in range(run.completed_epochs, config.num_epochs):
        run_epoch(run, epoch, progress)
    run.manager.wait_until_finished()
    final = finalize(run)
    run.manager.close()
    run.writer.close()
    return final


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def setup(config: ml_collections.ConfigDict, workdir: str) -> Training:
    """Checks the config, reads the data, builds the state (resumed from the latest checkpoint
    of ``workdir``), the jitted steps and the metric writer."""
    config_checks.validate(config)
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0
    if is_chief:
        run_dir.save_config(config, workdir)
    mesh = sharding.make_mesh()

    # Process 0 first: it may prepare a data cache (TFDS) the others then read.
    with distributed.chief_first("make_splits"):
        splits = pipeline.make_splits(config, workdir if is_chief else None)
    if not splits.source.has_valence_arousal:
        logging.warning("Data %r has no valence/arousal: the regression loss and metrics are "
                        "skipped%s.", splits.source.name,
                        f", and checkpoints are ranked by accuracy, not {config.best_metric}"
                        if config.best_metric in checkpointing.REGRESSION_KEYS else "")
    class_weights = imbalance.training_class_weights(
        config, splits.train.labels, splits.source.class_names, workdir if is_chief else None)
    steps_per_epoch = pipeline.steps_per_epoch(len(splits.train), config.batch_size)
    if config.steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)

    graphdef, tx, state = steps.create_train_state(config, steps.create_initial_model(config))
    manager = run_dir.checkpoint_manager(workdir, config)
    # Restored into the current mesh's shardings, whatever the device count that saved it.
    state, completed = checkpointing.restore_latest(manager, sharding.replicate(state, mesh))
    if is_chief:
        run_dir.truncate_history(workdir, completed)
    if completed:
        logging.info("Resumed from epoch %d (step %d) in %s", completed,
                     completed * steps_per_epoch, workdir)
    # The initialisers' eager executables and heap are not needed again.
    host_memory.release_host_memory(clear_jit_caches=True)

    train_steps = jax.jit(
        steps.make_train_steps(steps.make_train_step(graphdef, tx, config, class_weights)),
        donate_argnums=(0,))
    # Validation calls, like training's, take several batches each.
    eval_steps = jax.jit(steps.make_eval_steps(steps.make_eval_step(graphdef)))
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if completed == 0:
        writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                              if not isinstance(v, dict)})
    return Training(config, workdir, mesh, splits, steps_per_epoch, state, completed, manager,
                    train_steps, eval_steps, writer)


# ---------------------------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------------------------


def run_epoch(run: Training, epoch: int, progress: ProgressReporter) -> None:
    """Trains epoch ``epoch`` (0-based), scores validation, then writes the epoch's record and
    checkpoint."""
    epoch_start = time.time()
    record = {"epoch": epoch + 1, "step": (epoch + 1) * run.steps_per_epoch}
    record.update(train_epoch(run, epoch, progress))
    train_seconds = time.time() - epoch_start
    val = evaluation.score_split(run.eval_steps, run.state, run.splits.validation,
                                 run.splits.source, run.config, run.mesh)
    record.update({f"val_{k}": v for k, v in val.items()})
    record["epoch_time_s"] = time.time() - epoch_start
    record["train_time_s"] = train_seconds
    run.state["epoch"] = sharding.replicate(jnp.asarray(epoch + 1, jnp.int32), run.mesh)
    if run.is_chief:
        run_dir.append_jsonl(run.history_path, record)
    scalars = {k: v for k, v in record.items() if np.isscalar(v) and k != "epoch"}
    run.writer.write_scalars(record["step"], scalars)
    run.writer.flush()
    checkpointing.save(run.manager, epoch + 1, run.state, val)
    host_memory.release_host_memory()  # e.g. the evaluation step's compiler heap
    progress.epoch_done(record, val)


def train_epoch(run: Training, epoch: int, progress: ProgressReporter) -> dict[str, float]:
    """Trains epoch ``epoch`` (0-based) in calls of ``steps_per_execution`` steps; returns its
    training metrics (``epoch_train_metrics``)."""
    config = run.config
    spe = run.steps_per_epoch
    outputs, targets = [], []
    pending = None  # (first step, outputs) of the previous call, fetched after the next
    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    # Chunks of per_call consecutive batches (the last one may be shorter): one call each.
    chunks = pipeline.train_batches(
        run.splits.train, config, epoch, config.batch_size, **process,
    ).take(spe).batch(config.steps_per_execution).prefetch(1)
    step = epoch * spe  # steps done before this chunk
    progress.start()
    for chunk in chunks.as_numpy_iterator():
        global_chunk = sharding.shard_batch(chunk, run.mesh, stacked=True)
        n = len(chunk["mask"])
        out = _train_call(run, global_chunk, n, progress)
        # The whole global batches' targets (other processes hold the rest of them).
        targets.append(distributed.to_host({k: global_chunk[k] for k in TARGET_KEYS}))
        if pending is not None:
            outputs += fetch_checked_outputs(*pending)
        pending = (step, out)
        progress.after_call(epoch, step, n, lambda out=out: float(out["loss"][-1]))
        step += n
    outputs += fetch_checked_outputs(*pending)
    progress.stop()
    # [calls' steps, rows, ...] -> [rows, ...], step after step.
    return epoch_train_metrics(outputs, {
        k: np.concatenate([t[k].reshape(-1, *t[k].shape[2:]) for t in targets])
        for k in TARGET_KEYS})


def _train_call(run: Training, chunk: steps.Batch, n: int,
                progress: ProgressReporter) -> dict[str, jax.Array]:
    """Runs ``n`` steps on the stacked ``chunk``, compiling the call for a new length first."""
    if n in run.executables:
        run.state, out = run.executables[n](run.state, chunk)
        progress.count(n)
        return out
    # The first call, or the first shorter last chunk: timed alone, not with the previous one.
    jax.block_until_ready(run.state)
    progress.stop()
    compile_start = time.time()
    run.executables[n] = run.train_steps.lower(run.state, chunk).compile()
    compile_seconds = time.time() - compile_start
    # The compiler's freed heap, before the step's temporaries are mapped.
    host_memory.release_host_memory()
    run.state, out = run.executables[n](run.state, chunk)
    jax.block_until_ready(out)
    progress.compiled(n, compile_seconds, time.time() - compile_start)
    return out


def fetch_checked_outputs(first_step: int,
                          out: dict[str, jax.Array]) -> list[dict[str, np.ndarray]]:
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


def epoch_train_metrics(outputs: list[dict[str, np.ndarray]],
                        targets: dict[str, np.ndarray]) -> dict[str, float]:
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
    return {"median": float(np.median(times)), "min": float(np.min(times)),
            "max": float(np.max(times))}


def finalize(run: Training) -> dict[str, Any]:
    """Scores the best checkpoint on validation; writes final_metrics.json and the reports."""
    config, source, state = run.config, run.splits.source, run.state
    best = run.manager.best_step() or int(state["epoch"])
    if best != int(state["epoch"]):
        state = checkpointing.restore(run.manager, best, state)
    scores = evaluation.score_split(run.eval_steps, state, run.splits.validation, source,
                                    config, run.mesh)
    final = evaluation.result_record(
        config, source, scores, len(run.splits.validation), epochs=config.num_epochs,
        best_epoch=best, best_metric=config.best_metric, checkpoint="best", split="validation",
    )
    if run.is_chief:
        # Only process 0 writes (and so can read) the history.
        final["time_per_epoch_s"] = _epoch_times(run.workdir)
        run_dir.write_json(os.path.join(run.workdir, run_dir.FINAL_METRICS), final)
        from affect_jax import report  # matplotlib only where reports are written

        report.write_reports(run.workdir)
    logging.info("Final (best epoch %d) validation metrics: %s", best, {
        k: round(v, 4) for k, v in scores.items() if isinstance(v, float)},
        extra=console.FILE_ONLY)
    logging.info("Best epoch %d of %d: validation accuracy %.1f%%, macro F1 %s, mean CCC %s; "
                 "results in %s", best, config.num_epochs, 100 * scores["accuracy"],
                 format_number(scores["f1_macro"]), format_number(scores.get("mean_ccc")),
                 run.workdir)
    return final
