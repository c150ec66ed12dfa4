"""Whole-split evaluation: predictions over padded batches, the study's scores, the record.

The driver scores validation after every epoch and the best checkpoint at the end;
``evaluate`` scores a saved checkpoint on a chosen split. Both go through ``score_split`` and
write ``result_record``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from affect_jax import console, distributed, metrics, sharding, steps
from affect_jax.data import pipeline
from affect_jax.data.source import ExamplePool, Source


def predict_split(
    eval_steps: Callable,
    state: steps.State,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    batches_per_call: int = 1,
) -> dict[str, np.ndarray]:
    """Runs ``eval_steps`` (``make_eval_steps``) over padded batches, ``batches_per_call`` per
    call (the last call may take fewer); returns the unpadded per-example arrays.

    With several processes, ``batches`` are this process's slices and the result is the whole
    split's, gathered from every process (the same on all).
    """
    if not isinstance(batches_per_call, int) or batches_per_call < 1:
        raise ValueError(f"batches_per_call={batches_per_call!r}; expected an integer >= 1")
    collected: dict[str, list[np.ndarray]] = {}

    def run(group: list[dict[str, np.ndarray]]) -> None:
        # The host batches and their stacked copy are dropped before the call's temporaries
        # are mapped: only the device copy of the call's inputs stays.
        global_chunk = sharding.shard_batch(
            {k: np.stack([batch[k] for batch in group]) for k in group[0]}, mesh, stacked=True
        )
        group.clear()
        outputs = eval_steps(state, global_chunk)
        rows = distributed.to_host(
            {
                **outputs,
                "expression": global_chunk["expression"],
                "target_valence_arousal": global_chunk["valence_arousal"],
                "has_va": global_chunk["has_va"],
                "mask": global_chunk["mask"],
            }
        )
        # [calls' batches, rows, ...] -> [rows, ...], batch after batch.
        rows = {k: v.reshape(-1, *v.shape[2:]) for k, v in rows.items()}
        keep = rows.pop("mask") > 0
        for k, v in rows.items():
            collected.setdefault(k, []).append(v[keep])

    group: list[dict[str, np.ndarray]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == batches_per_call:
            run(group)
    if group:
        run(group)
    return {k: np.concatenate(v) for k, v in collected.items()}


def eval_batches_per_call(config: ml_collections.ConfigDict) -> int:
    """Evaluation batches per XLA call: as many images as a training call holds, at least one.

    ``steps_per_execution`` training batches' worth, so a call's stacked inputs take no more
    memory than training's (docs/performance.md).
    """
    return max(1, config.steps_per_execution * config.batch_size // config.eval_batch_size)


def score_predictions(
    predictions: dict[str, np.ndarray],
    class_names: tuple[str, ...],
    has_valence_arousal: bool,
    loss_weights: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """The study's metrics (``metrics.compute_metrics``) plus the split's loss."""
    with_va = has_valence_arousal and bool(predictions["has_va"].all())
    va_true = predictions["target_valence_arousal"] if with_va else None
    va_pred = predictions["valence_arousal"] if with_va else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", metrics.MetricWarning)
        result = metrics.compute_metrics(
            predictions["expression"], predictions["probs"], va_true, va_pred, class_names
        )
    for w in caught:
        if issubclass(w.category, metrics.MetricWarning):  # null in the results: no news
            logging.info("%s", w.message, extra=console.FILE_ONLY)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    loss = loss_weights.classification * float(predictions["ce"].mean())
    if with_va:
        mse = float(((va_pred - va_true) ** 2).mean())
        loss += loss_weights.regression * mse
        if loss_weights.ccc:
            loss += loss_weights.ccc * (1.0 - (result["valence_ccc"] + result["arousal_ccc"]) / 2)
    result["loss"] = loss
    return result


def score_split(
    eval_steps: Callable,
    state: steps.State,
    pool: ExamplePool,
    source: Source,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> dict[str, Any]:
    """``score_predictions`` of ``eval_steps`` over every example of ``pool``.

    Every process calls it; each reads its slice of the evaluation batches.
    """
    batches = pipeline.eval_batches(
        pool, config, config.eval_batch_size, jax.process_index(), jax.process_count()
    )
    return score_predictions(
        predict_split(eval_steps, state, batches, mesh, eval_batches_per_call(config)),
        source.class_names,
        source.has_valence_arousal,
        config.loss_weights,
    )


def result_record(
    config: ml_collections.ConfigDict,
    source: Source,
    scores: dict[str, Any],
    num_examples: int,
    **fields: Any,
) -> dict[str, Any]:
    """What scored a checkpoint (model, classes, data), ``fields`` (which checkpoint, split,
    ...), then ``num_examples`` and ``metrics``: final_metrics.json and the eval_*.json files."""
    return {
        "model": config.model.name,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "data_source": source.name,
        **fields,
        "num_examples": num_examples,
        "metrics": scores,
    }
