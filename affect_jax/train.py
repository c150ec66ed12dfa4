"""Training and evaluation: small pure functions and one driver, ``train_and_evaluate``.

The train state is a plain dict of pytrees (params, batch stats, optimizer state, step, epoch,
RNG key); the steps are pure ``jax.jit`` functions over it, run under a ``data`` device mesh.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from affect_jax import checkpointing, distributed, host_memory, metrics, models
from affect_jax.data import pipeline

State = dict[str, Any]
Batch = dict[str, jax.Array]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Model, optimizer, state
# ---------------------------------------------------------------------------------------------


def create_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The multi-task model, with ImageNet backbone weights when ``config.model.init`` says so."""
    if config.model.init not in ("imagenet", "random"):
        raise ValueError(
            f"config.model.init={config.model.init!r}; expected 'imagenet' or 'random'"
        )
    model = models.create_model(config, nnx.Rngs(params=config.seed))
    if config.model.init == "imagenet":
        if not config.model.weights:
            raise FileNotFoundError(
                "config.model.init='imagenet' needs the Keras ImageNet weights: pass "
                "--config.model.weights=DIR (written by scripts/port_weights.py) or a Keras "
                "application .h5 file, or train from scratch with --config.model.init=random"
            )
        from affect_jax import weights  # h5py and Orbax readers, only for ImageNet init

        weights.load_backbone_weights(model, config.model.weights)
    return model


def _param_labels(params: nnx.State) -> Any:
    """'backbone' or 'head' for every parameter leaf (by its path)."""

    def label(path, _):
        return "backbone" if getattr(path[0], "key", path[0]) == "backbone" else "head"

    return jax.tree_util.tree_map_with_path(label, params)


def scale_by_keras_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Keras's Adam direction: ``m * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)``.

    ``optax.scale_by_adam`` adds ``eps`` to the bias-corrected ``sqrt(v_hat)``; Keras adds it to
    the raw ``sqrt(v)``, i.e. Keras's effective eps is ``eps / sqrt(1 - b2^t)`` (32x larger at
    step 1 with b2=0.999), which changes the update of every small gradient: after one step,
    tests/test_keras_train_parity.py measures weights 2.7e-3 (relative) away from Keras's with
    ``optax.adam`` and within 4e-5 with this. Same state (``ScaleByAdamState``) as optax's Adam.
    """

    def init_fn(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=optax.tree.zeros_like(params),
                                      nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        t = count.astype(jnp.float32)
        alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda m, v: alpha * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(config: ml_collections.ConfigDict, params: nnx.State):
    """Keras's Adam (and its b1, b2, epsilon); the backbone frozen or on its own rate."""

    def adam(lr: float) -> optax.GradientTransformation:
        return optax.chain(
            scale_by_keras_adam(config.adam_b1, config.adam_b2, config.adam_epsilon),
            optax.scale_by_learning_rate(lr),
        )

    backbone_lr = config.backbone_learning_rate
    if backbone_lr < 0:
        backbone_lr = config.learning_rate
    backbone_tx = optax.set_to_zero() if config.model.freeze_backbone else adam(backbone_lr)
    return optax.multi_transform(
        {"backbone": backbone_tx, "head": adam(config.learning_rate)}, _param_labels(params)
    )


def create_train_state(config: ml_collections.ConfigDict, model: nnx.Module):
    """(graphdef, optimizer, state) with the state a plain dict of pytrees."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = create_optimizer(config, params)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "epoch": jnp.zeros((), jnp.int32),  # completed epochs: the data position
        "rng": jax.random.PRNGKey(config.seed),
    }
    return graphdef, tx, state


# ---------------------------------------------------------------------------------------------
# Losses and steps
# ---------------------------------------------------------------------------------------------


def weighted_ccc(y: jax.Array, p: jax.Array, w: jax.Array) -> jax.Array:
    """Concordance correlation (population moments) over the rows with weight ``w``."""
    n = jnp.maximum(w.sum(), 1.0)
    my, mp = (w * y).sum() / n, (w * p).sum() / n
    vy, vp = (w * (y - my) ** 2).sum() / n, (w * (p - mp) ** 2).sum() / n
    cov = (w * (y - my) * (p - mp)).sum() / n
    return 2.0 * cov / (vy + vp + (my - mp) ** 2 + 1e-8)


def compute_loss(
    outputs: dict[str, jax.Array], batch: Batch, loss_weights: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``w_cls * CE + w_reg * MSE (+ w_ccc * mean(1 - CCC))`` over the valid (mask=1) rows.

    Rows without valence/arousal (``has_va`` 0) do not count in the regression terms.
    """
    mask = batch["mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(
        outputs["class_logits"], batch["expression"]
    )
    ce = (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    va_weight = mask * batch["has_va"]
    squared = ((outputs["valence_arousal"] - batch["valence_arousal"]) ** 2).mean(-1)
    mse = (squared * va_weight).sum() / jnp.maximum(va_weight.sum(), 1.0)
    loss = loss_weights.classification * ce + loss_weights.regression * mse
    terms = {"ce": ce, "mse": mse}
    if loss_weights.ccc:
        ccc = jnp.stack([
            weighted_ccc(batch["valence_arousal"][:, d], outputs["valence_arousal"][:, d],
                         va_weight)
            for d in range(2)
        ])
        terms["ccc_loss"] = (1.0 - ccc).mean()
        loss = loss + loss_weights.ccc * terms["ccc_loss"]
    return loss, terms


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """A pure ``(state, batch) -> (state, outputs)`` training step (not yet jitted)."""
    loss_weights = config.loss_weights
    frozen = config.model.freeze_backbone

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        dropout_key = jax.random.fold_in(state["rng"], state["step"])

        # copy=True: fresh Variables owned by this trace, so BatchNorm may update them.
        def loss_fn(params, batch_stats):
            model = nnx.merge(graphdef, params, batch_stats, copy=True)
            outputs = model(
                batch["image"], train=True, rngs=nnx.Rngs(dropout=dropout_key),
                train_backbone=not frozen,
            )
            loss, terms = compute_loss(outputs, batch, loss_weights)
            _, _, new_batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
            return loss, (terms, outputs, new_batch_stats)

        (loss, (terms, outputs, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state["params"], state["batch_stats"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(
            state,
            params=optax.apply_updates(state["params"], updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            step=state["step"] + 1,
        )
        out = {
            "loss": loss,
            **terms,
            "predicted_class": outputs["class_logits"].argmax(-1),
            "valence_arousal": outputs["valence_arousal"],
        }
        return new_state, out

    return train_step


def make_train_steps(
    train_step: Callable[[State, Batch], tuple[State, dict[str, jax.Array]]],
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """Several steps in one XLA execution: ``(state, batches) -> (state, outputs)``.

    ``batches`` hold consecutive batches stacked on a leading axis; the outputs are stacked the
    same way. Why: XLA:CPU maps its temporaries afresh for every execution and page-faults them
    in (~3 GB and ~1 s for a ResNet50 step at batch 32, docs/performance.md); a ``lax.scan``
    reuses them for every step of the call. Keras calls this ``steps_per_execution``.
    """

    def train_steps(state: State, batches: Batch) -> tuple[State, dict[str, jax.Array]]:
        if jax.tree.leaves(batches)[0].shape[0] == 1:  # no loop around a single step
            state, out = train_step(state, jax.tree.map(lambda x: x[0], batches))
            return state, jax.tree.map(lambda x: x[None], out)
        return jax.lax.scan(train_step, state, batches)

    return train_steps


def make_eval_steps(
    eval_step: Callable[[State, Batch], dict[str, jax.Array]],
) -> Callable[[State, Batch], dict[str, jax.Array]]:
    """Several inference batches in one XLA execution: ``(state, batches) -> outputs``.

    ``batches`` and the outputs are stacked on a leading axis, as in ``make_train_steps`` and
    for the same reason: each execution maps its temporaries afresh (VGG16 bf16, batch 32:
    107,000 page faults per call; 0.83 s per batch with them, 0.58 s with the heap reused,
    docs/performance.md). A ``lax.map`` reuses them for every batch of the call.
    """

    def eval_steps(state: State, batches: Batch) -> dict[str, jax.Array]:
        if jax.tree.leaves(batches)[0].shape[0] == 1:  # no loop around a single batch
            out = eval_step(state, jax.tree.map(lambda x: x[0], batches))
            return jax.tree.map(lambda x: x[None], out)
        return jax.lax.map(lambda batch: eval_step(state, batch), batches)

    return eval_steps


def make_eval_step(
    graphdef: nnx.GraphDef, flip_tta: bool = False
) -> Callable[[State, Batch], dict[str, jax.Array]]:
    """A pure ``(state, batch) -> outputs`` inference step (optionally flip-averaged)."""

    def eval_step(state: State, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state["params"], state["batch_stats"])
        outputs = model(batch["image"], train=False)
        probs = jax.nn.softmax(outputs["class_logits"])
        va = outputs["valence_arousal"]
        if flip_tta:
            flipped = model(batch["image"][:, :, ::-1, :], train=False)
            probs = (probs + jax.nn.softmax(flipped["class_logits"])) / 2
            va = (va + flipped["valence_arousal"]) / 2
        ce = -jnp.log(jnp.take_along_axis(probs, batch["expression"][:, None], -1)[:, 0])
        return {"probs": probs, "valence_arousal": va, "ce": ce}

    return eval_step


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device, axis 'data'.

    Auto axes: XLA propagates the batch sharding and inserts the gradient all-reduce itself.
    """
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str) -> None:
    """The global batch must split evenly over the devices and over the processes."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"config.{what}={batch_size} is not divisible by the {n} devices")
    p = jax.process_count()
    if batch_size % p:
        raise ValueError(f"config.{what}={batch_size} is not divisible by the {p} processes")


def shard_batch(
    batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, stacked: bool = False
) -> Batch:
    """Process-local NumPy batch -> global arrays split over the 'data' axis.

    ``stacked``: the arrays hold several batches on a leading axis (``make_train_steps``);
    the rows, on the second axis, are split.
    """
    sharding = NamedSharding(mesh, P(None, "data") if stacked else P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """The same value on every device of the mesh."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    # Every process holds the same value (same seed, same checkpoint); device_put would check
    # that with one cross-process gather per leaf.
    def place(x: Any) -> jax.Array:
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, tree)


# ---------------------------------------------------------------------------------------------
# Evaluation over a whole split
# ---------------------------------------------------------------------------------------------


def predict_split(
    eval_steps: Callable, state: State, batches: Iterable[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh, batches_per_call: int = 1,
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
        global_chunk = shard_batch(
            {k: np.stack([batch[k] for batch in group]) for k in group[0]}, mesh, stacked=True)
        group.clear()
        outputs = eval_steps(state, global_chunk)
        rows = distributed.to_host({
            **outputs, "expression": global_chunk["expression"],
            "target_valence_arousal": global_chunk["valence_arousal"],
            "has_va": global_chunk["has_va"], "mask": global_chunk["mask"],
        })
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
    memory than training's (VGG16 bf16, eval batch 64: peak RSS 2.80 GB with one batch per
    call, 3.04 GB with 4, 3.29 GB with 8; docs/performance.md).
    """
    return max(1, config.steps_per_execution * config.batch_size // config.eval_batch_size)


def score_predictions(
    predictions: dict[str, np.ndarray], class_names: tuple[str, ...],
    has_valence_arousal: bool, loss_weights: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """The study's metrics (``metrics.compute_metrics``) plus the split's loss."""
    with_va = has_valence_arousal and bool(predictions["has_va"].all())
    va_true = predictions["target_valence_arousal"] if with_va else None
    va_pred = predictions["valence_arousal"] if with_va else None
    result = metrics.compute_metrics(
        predictions["expression"], predictions["probs"], va_true, va_pred, class_names
    )
    loss = loss_weights.classification * float(predictions["ce"].mean())
    if with_va:
        mse = float(((va_pred - va_true) ** 2).mean())
        loss += loss_weights.regression * mse
        if loss_weights.ccc:
            loss += loss_weights.ccc * (1.0 - (result["valence_ccc"] + result["arousal_ccc"]) / 2)
    result["loss"] = loss
    return result


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _epoch_train_metrics(outputs: list[dict[str, np.ndarray]], labels: np.ndarray,
                         targets: np.ndarray, has_va: np.ndarray) -> dict[str, float]:
    pred = np.concatenate([o["predicted_class"] for o in outputs])
    va = np.clip(np.concatenate([o["valence_arousal"] for o in outputs]), -1.0, 1.0)
    result = {
        "train_loss": float(np.mean([o["loss"] for o in outputs])),
        "train_accuracy": float((pred == labels).mean()),
    }
    if has_va.all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.MetricWarning)
            result["train_mean_ccc"] = float(
                np.mean([metrics.ccc(targets[:, d], va[:, d]) for d in range(2)])
            )
    return result


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    return value


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_history(path: str, completed_epochs: int) -> None:
    """Drops lines of epochs that were not checkpointed (a run killed in between)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= completed_epochs]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                logging.warning("The config differs from the one this workdir was started "
                                "with (%s); resuming with the new one.", path)
    with open(path, "w") as f:
        f.write(text)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains for ``config.num_epochs``, evaluating and checkpointing after every epoch.

    Resumes from the latest checkpoint in ``workdir``. Returns the final metrics record (also
    written to ``workdir/final_metrics.json``).
    """
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0
    if is_chief:
        _save_config(config, workdir)
    mesh = make_mesh()
    check_batch_size(config.batch_size, mesh, "batch_size")
    check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    per_call = config.steps_per_execution
    if not isinstance(per_call, int) or per_call < 1:
        raise ValueError(f"config.steps_per_execution={per_call!r}; expected an integer >= 1")

    # Process 0 first: it may prepare a data cache (TFDS) the others then read.
    with distributed.chief_first("make_splits"):
        splits = pipeline.make_splits(config, workdir if is_chief else None)
    class_names = splits.source.class_names
    has_va = splits.source.has_valence_arousal
    if not has_va:
        logging.warning("Data %r has no valence/arousal: the regression loss and metrics are "
                        "skipped%s.", splits.source.name,
                        f", and checkpoints are ranked by accuracy, not {config.best_metric}"
                        if config.best_metric in checkpointing.REGRESSION_KEYS else "")
    spe = pipeline.steps_per_epoch(len(splits.train), config.batch_size)
    if config.steps_per_epoch > 0:
        spe = min(spe, config.steps_per_epoch)
    total_steps = spe * config.num_epochs

    model = create_model(config)
    graphdef, tx, state = create_train_state(config, model)
    del model
    manager = checkpointing.create_manager(workdir, config)
    # Restored into the current mesh's shardings, whatever the device count that saved it.
    state, completed = checkpointing.restore_latest(manager, replicate(state, mesh))
    history_path = os.path.join(workdir, "metrics.jsonl")
    if is_chief:
        _truncate_history(history_path, completed)
    if completed:
        logging.info("Resumed from epoch %d (step %d) in %s", completed, completed * spe, workdir)
    # The initialisers' eager executables and heap are not needed again.
    host_memory.release_host_memory(clear_jit_caches=True)

    train_steps = jax.jit(make_train_steps(make_train_step(graphdef, tx, config)),
                          donate_argnums=(0,))
    executables = {}  # chunk length -> compiled train call
    # Validation calls, like training's, take several batches each.
    eval_steps = jax.jit(make_eval_steps(make_eval_step(graphdef)))
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if completed == 0:
        writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                              if not isinstance(v, dict)})

    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    # Throughput and ETA are timed from the end of the first call after compilation.
    timer_start, timed_steps = None, 0
    for epoch in range(completed, config.num_epochs):
        epoch_start = time.time()
        outputs, labels, targets, va_flags = [], [], [], []
        pending = None  # (first step, outputs) of the previous call, fetched after the next
        # Chunks of per_call consecutive batches (the last one may be shorter): one call each.
        chunks = pipeline.train_batches(
            splits.train, config, epoch, config.batch_size, **process,
        ).take(spe).batch(per_call).prefetch(1)
        step = epoch * spe  # steps done before this chunk
        for chunk in chunks.as_numpy_iterator():
            global_chunk = shard_batch(chunk, mesh, stacked=True)
            n = len(chunk["mask"])
            if n not in executables:  # the first call, or the first shorter last chunk
                jax.block_until_ready(state)  # time this call alone, not the previous one
                compile_start = time.time()
                executables[n] = train_steps.lower(state, global_chunk).compile()
                compile_seconds = time.time() - compile_start
                # The compiler's freed heap, before the step's temporaries are mapped.
                host_memory.release_host_memory()
                state, out = executables[n](state, global_chunk)
                jax.block_until_ready(out)
                seconds = time.time() - compile_start
                logging.info("Compiled the %d-step train call in %.1f s (or loaded it from the "
                             "compilation cache); its first call took %.1f s", n,
                             compile_seconds, seconds - compile_seconds)
                # Excluded from the throughput.
                timer_start = time.time() if timer_start is None else timer_start + seconds
            else:
                state, out = executables[n](state, global_chunk)
                timed_steps += n
            # The whole global batches' targets (other processes hold the rest of them).
            chunk_targets = distributed.to_host(
                {k: global_chunk[k] for k in ("expression", "valence_arousal", "has_va")})
            labels.append(chunk_targets["expression"].reshape(-1))
            targets.append(chunk_targets["valence_arousal"].reshape(-1, 2))
            va_flags.append(chunk_targets["has_va"].reshape(-1))
            if pending is not None:
                outputs += _fetch_checked(*pending)
            pending = (step, out)
            if (step + n) // config.log_every_steps > step // config.log_every_steps:
                rate = timed_steps / max(time.time() - timer_start, 1e-9)
                eta = (total_steps - step - n) / rate if rate else float("nan")
                logging.info(
                    "epoch %d/%d step %d/%d (%d/%d in epoch): loss %.4f, %.1f img/s, ETA %s",
                    epoch + 1, config.num_epochs, step + n, total_steps, step + n - epoch * spe,
                    spe, float(out["loss"][-1]), rate * config.batch_size,
                    _format_seconds(eta) if math.isfinite(eta) else "(measuring)",
                )
            step += n
        outputs += _fetch_checked(*pending)
        train_time = time.time() - epoch_start
        record = {"epoch": epoch + 1, "step": (epoch + 1) * spe}
        record.update(_epoch_train_metrics(
            outputs, np.concatenate(labels), np.concatenate(targets), np.concatenate(va_flags)))

        val = score_predictions(
            predict_split(eval_steps, state,
                          pipeline.eval_batches(splits.validation, config,
                                                config.eval_batch_size, **process), mesh,
                          eval_batches_per_call(config)),
            class_names, has_va, config.loss_weights,
        )
        record.update({f"val_{k}": v for k, v in val.items()})
        record["epoch_time_s"] = time.time() - epoch_start
        record["train_time_s"] = train_time
        state["epoch"] = replicate(jnp.asarray(epoch + 1, jnp.int32), mesh)
        if is_chief:
            _append_jsonl(history_path, record)
        scalars = {k: v for k, v in record.items() if np.isscalar(v) and k != "epoch"}
        writer.write_scalars(record["step"], scalars)
        writer.flush()
        checkpointing.save(manager, epoch + 1, state, val)
        host_memory.release_host_memory()  # e.g. the evaluation step's compiler heap
        logging.info(
            "epoch %d/%d done in %s: train loss %.4f acc %.3f | val loss %.4f acc %.3f "
            "F1 %.3f mean CCC %s", epoch + 1, config.num_epochs,
            _format_seconds(record["epoch_time_s"]), record["train_loss"],
            record["train_accuracy"], val["loss"], val["accuracy"], val["f1_macro"],
            f"{val['mean_ccc']:.3f}" if "mean_ccc" in val else "n/a",
        )
    manager.wait_until_finished()
    final = finalize(config, workdir, manager, state, splits, mesh, eval_steps)
    manager.close()
    writer.close()
    return final


def _fetch_checked(first_step: int, out: dict[str, jax.Array]) -> list[dict[str, np.ndarray]]:
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


def _epoch_times(workdir: str) -> dict[str, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        times = [json.loads(line)["epoch_time_s"] for line in f if line.strip()]
    return {"median": float(np.median(times)), "min": float(np.min(times)),
            "max": float(np.max(times))}


def finalize(
    config: ml_collections.ConfigDict, workdir: str, manager: ocp.CheckpointManager,
    state: State, splits: pipeline.DataSplits, mesh: jax.sharding.Mesh, eval_steps: Callable,
) -> dict[str, Any]:
    """Scores the best checkpoint on validation; writes final_metrics.json and the reports."""
    best = manager.best_step() or int(state["epoch"])
    if best != int(state["epoch"]):
        state = checkpointing.restore(manager, best, state)
    scores = score_predictions(
        predict_split(eval_steps, state, pipeline.eval_batches(
            splits.validation, config, config.eval_batch_size, jax.process_index(),
            jax.process_count()), mesh, eval_batches_per_call(config)),
        splits.source.class_names, splits.source.has_valence_arousal, config.loss_weights,
    )
    final = {
        "model": config.model.name,
        "num_classes": splits.source.num_classes,
        "class_names": list(splits.source.class_names),
        "data_source": splits.source.name,
        "epochs": config.num_epochs,
        "best_epoch": best,
        "best_metric": config.best_metric,
        "checkpoint": "best",
        "split": "validation",
        "num_examples": len(splits.validation),
        "metrics": scores,
    }
    if jax.process_index() == 0:
        # Only process 0 writes (and so can read) the history.
        final["time_per_epoch_s"] = _epoch_times(workdir)
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(json_safe(final), f, indent=2)
        from affect_jax import report  # matplotlib only where reports are written

        report.write_reports(workdir)
    logging.info("Final (best epoch %d) validation metrics: %s", best, {
        k: round(v, 4) for k, v in scores.items() if isinstance(v, float)})
    return final
