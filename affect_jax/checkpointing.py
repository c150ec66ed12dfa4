"""Orbax checkpoints of the train state: the latest few plus the best by a validation metric.

How checkpoints are kept, ranked, saved and restored; ``run_dir`` says where a run keeps them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

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


def create_manager(directory: str, config: ml_collections.ConfigDict,
                   read_only: bool = False) -> ocp.CheckpointManager:
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
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=config.keep_checkpoints),
            policies.BestN(get_metric_fn=get_metric, reverse=config.best_mode == "min", n=1),
        ]),
        # Leftovers of a save interrupted by a kill.
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options)


def _scalar_metrics(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


def save(manager: ocp.CheckpointManager, epoch: int, state: dict[str, Any],
         val_metrics: dict[str, Any]) -> None:
    """Saves ``state`` as step ``epoch`` (asynchronously) with its validation metrics."""
    manager.save(epoch, args=ocp.args.StandardSave(state),
                 metrics=_scalar_metrics(val_metrics))


def restore(manager: ocp.CheckpointManager, step: int, like: dict[str, Any]) -> dict[str, Any]:
    """Restores step ``step`` into the structure, shapes and shardings of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(manager: ocp.CheckpointManager,
                   like: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The latest saved state and its completed-epoch count, or ``(like, 0)`` if none."""
    step = manager.latest_step()
    if step is None:
        return like, 0
    logging.info("Restoring checkpoint %d from %s", step, manager.directory)
    return restore(manager, step, like), step
