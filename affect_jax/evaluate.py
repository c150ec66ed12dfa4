"""Scores a saved checkpoint of a run on a chosen split (``main --mode=eval``)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from affect_jax import checkpointing, distributed, models, train
from affect_jax.data import pipeline


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint: str = "best",
    split: str = "validation",
    flip_tta: bool = False,
) -> dict[str, Any]:
    """Scores the ``best`` or ``latest`` checkpoint on ``split``; writes the metrics JSON.

    The output is ``workdir/eval_<split>_<checkpoint>[_flip].json``.
    """
    manager = checkpointing.create_manager(workdir, config, read_only=True)
    step = manager.best_step() if checkpoint == "best" else manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first with "
            f"--mode=train --workdir={workdir}"
        )
    with distributed.chief_first("make_splits"):  # process 0 may prepare a shared cache
        splits = pipeline.make_splits(config)
    pools = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    pool = pools.get(split)
    if pool is None:
        raise ValueError(f"data source {splits.source.name!r} has no held-out 'test' pool")

    mesh = train.make_mesh()
    train.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    # Weights come from the checkpoint: no ImageNet file is needed to build the model.
    model = models.create_model(config, nnx.Rngs(params=config.seed))
    graphdef, _, like = train.create_train_state(config, model)
    # Restored into this mesh's shardings, whatever the device count that saved it.
    state = checkpointing.restore(manager, step, train.replicate(like, mesh))
    manager.close()

    eval_steps = jax.jit(train.make_eval_steps(train.make_eval_step(graphdef, flip_tta=flip_tta)))
    batches = pipeline.eval_batches(pool, config, config.eval_batch_size, jax.process_index(),
                                    jax.process_count())
    scores = train.score_predictions(
        train.predict_split(eval_steps, state, batches, mesh, train.eval_batches_per_call(config)),
        splits.source.class_names, splits.source.has_valence_arousal, config.loss_weights,
    )
    result = {
        "model": config.model.name,
        "num_classes": splits.source.num_classes,
        "class_names": list(splits.source.class_names),
        "data_source": splits.source.name,
        "checkpoint": checkpoint,
        "epoch": step,
        "split": split,
        "flip_tta": flip_tta,
        "num_examples": len(pool),
        "metrics": scores,
    }
    name = f"eval_{split}_{checkpoint}{'_flip' if flip_tta else ''}.json"
    if jax.process_index() == 0:
        with open(os.path.join(workdir, name), "w") as f:
            json.dump(train.json_safe(result), f, indent=2)
    logging.info("%s checkpoint (epoch %d) on %s (%d examples): %s", checkpoint, step, split,
                 len(pool), {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)})
    return result
