"""Orbax checkpoints of the train state: the latest few plus the best by a validation metric.

How checkpoints are kept, ranked, saved and restored; ``run_dir`` says where a run keeps them.

Epoch-end checkpoints are Orbax steps numbered by epoch, ranked by their validation metrics. A
run stopped mid-epoch (``graceful_stop``) saves its exact point in a manager of its own (the
mid-epoch checkpoint: the state, the epoch's outputs so far and its position), so the best and
latest choice, ``keep_checkpoints`` and the metrics history only ever see whole epochs.

A checkpoint that cannot be restored (a truncated or missing file) is set aside (moved, not
deleted) once an older one has been restored instead: if none restores, the cause is more likely
the config than the files, and nothing is moved.
"""

from __future__ import annotations

import logging as python_logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from affect_jax.errors import UserError
from affect_jax.metrics import REGRESSION_METRICS, VA_DIMENSIONS

REGRESSION_KEYS = {f"{d}_{m}" for d in (*VA_DIMENSIONS, "mean") for m in REGRESSION_METRICS}


def _metric_getter(config: ml_collections.ConfigDict):
    name, mode = config.best_metric, config.best_mode
    worst = -math.inf if mode == "max" else math.inf

    def get(saved_metrics: dict[str, float]) -> float:
        if name in REGRESSION_KEYS and not REGRESSION_KEYS & set(saved_metrics):
            # Expression-only data (class folders) has no valence/arousal metric to rank by.
            return get_accuracy(saved_metrics)
        if name not in saved_metrics:
            raise KeyError(
                f"config.best_metric={name!r} is not a validation metric; available: "
                f"{sorted(saved_metrics)}"
            )
        value = float(saved_metrics[name])
        # A NaN metric (e.g. CCC of a constant prediction) ranks last, never first.
        return worst if math.isnan(value) else value

    def get_accuracy(saved_metrics: dict[str, float]) -> float:
        value = float(saved_metrics["accuracy"])
        sign = 1.0 if mode == "max" else -1.0  # 'min' mode ranks by -accuracy
        return -math.inf * sign if math.isnan(value) else sign * value

    return get


def create_manager(
    directory: str, config: ml_collections.ConfigDict, read_only: bool = False
) -> ocp.CheckpointManager:
    """A manager of the absolute ``directory`` that keeps the latest N and the best one (by
    ``config.best_metric``); ``run_dir.checkpoint_manager`` opens a run's.

    ``read_only`` (evaluation, prediction) neither creates, cleans up nor deletes anything, so it
    is safe beside a run that is still training.
    """
    get_metric = _metric_getter(config)
    options = ocp.CheckpointManagerOptions(
        read_only=read_only,
        create=not read_only,
        best_fn=get_metric,
        best_mode=config.best_mode,
        preservation_policy=policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=config.keep_checkpoints),
                policies.BestN(get_metric_fn=get_metric, reverse=config.best_mode == "min", n=1),
            ]
        ),
        # Leftovers of a save interrupted by a kill.
        cleanup_tmp_directories=not read_only,
        save_interval_steps=0 if read_only else 1,  # Orbax warns when it has to set this itself
    )
    # Orbax also warns that a read-only manager is read-only: what was asked for.
    absl_logger = logging.get_absl_logger()
    absl_logger.addFilter(_not_the_read_only_notice)
    try:
        return ocp.CheckpointManager(directory, options=options)
    finally:
        absl_logger.removeFilter(_not_the_read_only_notice)


def _not_the_read_only_notice(record: python_logging.LogRecord) -> bool:
    return record.msg != "Given directory is read only=%s"


def _scalar_metrics(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


def save(
    manager: ocp.CheckpointManager, epoch: int, state: dict[str, Any], val_metrics: dict[str, Any]
) -> None:
    """Saves ``state`` as step ``epoch`` (asynchronously) with its validation metrics."""
    manager.save(epoch, args=ocp.args.StandardSave(state), metrics=_scalar_metrics(val_metrics))


def restore(
    manager: ocp.CheckpointManager, step: int, like: dict[str, Any], partial: bool = False
) -> dict[str, Any]:
    """Restores step ``step`` into the structure, shapes and shardings of ``like``.

    ``partial``: ``like`` holds only some of the saved entries (e.g. ``params`` and
    ``batch_stats`` of a train state) and only those are read; the others (the optimizer
    state) stay on disk. A manager restores either way, not both.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    if partial:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        return manager.restore(
            step,
            args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True
            ),
        )
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


class CheckpointError(UserError, RuntimeError):
    """No checkpoint of a run can be restored."""


def error_reason(error: BaseException) -> str:
    """The first line of the innermost cause of ``error`` (TensorStore's says what is wrong)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return reason if len(reason) <= 300 else reason[:297] + "..."


def set_aside(directory: str, step: int, aside_dir: str, prefix: str = "") -> str:
    """Moves checkpoint ``step`` of ``directory`` into ``aside_dir`` as ``<prefix><step>`` (or
    ``<prefix><step>.<n>`` if that is taken), out of Orbax's sight; returns where it went."""
    os.makedirs(aside_dir, exist_ok=True)
    name = f"{prefix}{step}"
    target, n = os.path.join(aside_dir, name), 0
    while os.path.exists(target):
        n += 1
        target = os.path.join(aside_dir, f"{name}.{n}")
    os.rename(os.path.join(directory, str(step)), target)
    return target


def _all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (processes must agree on what they restored)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).min())


def restore_first_intact(
    manager: ocp.CheckpointManager,
    steps: Sequence[int],
    like: dict[str, Any],
    aside_dir: str,
    partial: bool = False,
) -> tuple[int, dict[str, Any]]:
    """(step, state) of the first of ``steps`` that restores (``restore``'s ``partial``);
    those before it that did not are reported in one line each and set aside into
    ``aside_dir``.

    Raises CheckpointError (one line, every step and why) when none restores.
    """
    failures: list[tuple[int, str]] = []
    for step in steps:
        reason = "another process could not restore it"
        try:
            state = restore(manager, step, like, partial)
            restored = True
        except Exception as e:  # noqa: BLE001 - whatever a damaged file raises
            restored, reason = False, error_reason(e)
        if not _all_processes(restored):
            failures.append((step, reason))
            continue
        for bad, why in failures:
            where = "(not moved: another process moves it)"
            if jax.process_index() == 0:
                try:
                    where = "moved to " + set_aside(str(manager.directory), bad, aside_dir)
                except OSError as e:
                    where = f"(could not move it: {e.strerror})"
            logging.warning(
                "Checkpoint %d of %s cannot be restored (%s); %s; using checkpoint %d instead",
                bad,
                manager.directory,
                why,
                where,
                step,
            )
        if failures:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("damaged checkpoints set aside")
            manager.reload()
        return step, state
    raise CheckpointError(
        f"no checkpoint in {manager.directory} can be restored: "
        + "; ".join(f"{step}: {why}" for step, why in failures)
        + " (none was moved; if the config changed, use the run's own config.json)"
    )


def ranked_steps(
    manager: ocp.CheckpointManager, config: ml_collections.ConfigDict, which: str
) -> list[int]:
    """Every step, the preferred first: ``latest`` newest first; ``best`` Orbax's best, then
    the others by ``config.best_metric`` (steps without metrics last), newest first on ties."""
    steps = sorted(manager.all_steps(), reverse=True)
    if which == "latest" or not steps:
        return steps
    get_metric = _metric_getter(config)
    sign = -1.0 if config.best_mode == "max" else 1.0
    scored = []
    for step in steps:
        saved = manager.metrics(step)
        scored.append((0, sign * get_metric(saved)) if saved else (1, 0.0))
    order = sorted(range(len(steps)), key=lambda i: scored[i])  # stable: newest first on ties
    ranked = [steps[i] for i in order]
    best = manager.best_step()
    if best in ranked:
        ranked.remove(best)
        ranked.insert(0, best)
    return ranked


def restore_latest(
    manager: ocp.CheckpointManager, like: dict[str, Any], aside_dir: str | None = None
) -> tuple[dict[str, Any], int]:
    """The latest saved state that restores and its completed-epoch count, or ``(like, 0)``
    if none is saved. Damaged newer ones are set aside into ``aside_dir`` (default: beside
    the checkpoint directory, ``<directory>_damaged``)."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return like, 0
    logging.info("Restoring checkpoint %d from %s", steps[0], manager.directory)
    aside_dir = aside_dir or str(manager.directory).rstrip("/") + "_damaged"
    step, state = restore_first_intact(manager, steps, like, aside_dir)
    return state, step


# ---------------------------------------------------------------------------------------------
# Mid-epoch checkpoints
# ---------------------------------------------------------------------------------------------


def create_mid_epoch_manager(directory: str) -> ocp.CheckpointManager:
    """The manager of a run's mid-epoch checkpoint (one at most; steps are global steps)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def save_mid_epoch(
    manager: ocp.CheckpointManager,
    step: int,
    state: dict[str, Any],
    epoch_so_far: dict[str, Any],
    position: dict[str, Any],
) -> None:
    """Saves global step ``step`` and waits: the state, the epoch's outputs and targets so far
    (NumPy arrays, step-major) and ``position`` (JSON: epoch, step in epoch, ...)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            epoch_so_far=ocp.args.StandardSave(epoch_so_far),
            position=ocp.args.JsonSave(position),
        ),
    )
    manager.wait_until_finished()


def mid_epoch_position(manager: ocp.CheckpointManager) -> tuple[int, dict[str, Any]] | None:
    """(step, position) of the mid-epoch checkpoint, None if there is none or it is unreadable
    (then ``restore_mid_epoch`` reports it)."""
    step = manager.latest_step()
    if step is None:
        return None
    try:
        return step, manager.restore(
            step, args=ocp.args.Composite(position=ocp.args.JsonRestore())
        ).position
    except Exception:  # noqa: BLE001 - a damaged file: restore_mid_epoch says which
        return step, {}


def restore_mid_epoch(
    manager: ocp.CheckpointManager, step: int, like: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, epoch so far) of mid-epoch checkpoint ``step``, the state restored into the
    structure, shapes and shardings of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            epoch_so_far=ocp.args.StandardRestore(),
        ),
    )
    return restored.state, restored.epoch_so_far
