"""Scores a saved checkpoint of a run on a chosen split (``main --mode=eval``)."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import logging

from affect_jax import config_checks, distributed, evaluation, run_dir, run_lock, sharding, steps
from affect_jax.data import pipeline


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint: str = "best",
    split: str = "validation",
    flip_tta: bool = False,
) -> dict[str, Any]:
    """Scores the ``best`` or ``latest`` checkpoint on ``split``; writes the metrics JSON.

    The output is ``workdir/eval_<split>_<checkpoint>[_flip].json``. Holds the workdir's lock
    (it writes into the run, and may set a damaged checkpoint aside); refuses a config that does
    not fit the run (``run_dir.check_config``).
    """
    config_checks.validate(config, training=False)
    run_dir.open_checkpoints(workdir, config).close()  # a clear error before locking
    with run_lock.hold(workdir, "eval"):
        run_dir.check_config(config, workdir, "score")
        return _evaluate(config, workdir, checkpoint, split, flip_tta)


def _evaluate(
    config: ml_collections.ConfigDict, workdir: str, checkpoint: str, split: str, flip_tta: bool
) -> dict[str, Any]:
    mesh = sharding.make_mesh()
    # Scoring needs the weights only: the optimizer state stays on disk.
    step, graphdef, variables = run_dir.restore_checkpoint(
        workdir, config, mesh, which=checkpoint, variables_only=True
    )
    with distributed.chief_first("make_splits"):  # process 0 may prepare a shared cache
        splits = pipeline.make_splits(config)
    pools = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    pool = pools.get(split)
    if pool is None:
        raise ValueError(f"data source {splits.source.name!r} has no held-out 'test' pool")

    eval_steps = jax.jit(steps.make_eval_steps(steps.make_eval_step(graphdef, flip_tta=flip_tta)))
    scores = evaluation.score_split(eval_steps, variables, pool, splits.source, config, mesh)
    result = evaluation.result_record(
        config,
        splits.source,
        scores,
        len(pool),
        checkpoint=checkpoint,
        epoch=step,
        split=split,
        flip_tta=flip_tta,
    )
    if jax.process_index() == 0:
        run_dir.write_json(
            os.path.join(workdir, run_dir.eval_result_name(split, checkpoint, flip_tta)), result
        )
    logging.info(
        "%s checkpoint (epoch %d) on %s (%d examples): %s",
        checkpoint,
        step,
        split,
        len(pool),
        {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)},
    )
    return result
