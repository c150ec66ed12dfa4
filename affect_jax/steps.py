"""The model, optimizer and train state, the losses, and the pure train/eval/predict steps.

The train state is a plain dict of pytrees (params, batch stats, optimizer state, step, epoch,
RNG key); the steps are pure functions over it, jitted by their callers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from affect_jax import models

State = dict[str, Any]
Batch = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# Model, optimizer, state
# ---------------------------------------------------------------------------------------------


# The initialisation program runs once: the least optimised code compiles fastest, and XLA's
# optimisations do not change its integer random bits or their scaling (tested bit for bit).
_INIT_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def init_model(config: ml_collections.ConfigDict, backbone: bool = True) -> nnx.Module:
    """``models.create_model(config, nnx.Rngs(params=config.seed))`` with the same parameters,
    materialised by one compiled program instead of one eager dispatch per initialiser.

    ``backbone=False``: the backbone's variables are zeros, for weights that replace every one
    of them. XLA then drops their random values from the program, which is most of its compile
    and run; the head's are the same either way (its keys do not depend on the backbone's).
    """
    graphdef = None

    def build() -> nnx.State:
        nonlocal graphdef
        graphdef, state = nnx.split(models.create_model(config, models.InitKeys(config.seed)))
        if not backbone:
            state["backbone"] = jax.tree.map(jnp.zeros_like, state["backbone"])
        return state

    state = jax.jit(build).lower().compile(compiler_options=_INIT_COMPILER_OPTIONS)()
    return nnx.merge(graphdef, state)


def create_initial_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The model training starts from: ``models.create_model``'s architecture (``init_model``),
    with the Keras ImageNet backbone weights when ``config.model.init`` says so (they replace
    every backbone variable, or loading fails: their random values are never computed)."""
    imagenet = config.model.init == "imagenet"
    model = init_model(config, backbone=not imagenet)
    if imagenet:
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
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
        )

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

    def fresh(params: nnx.State) -> State:
        return {
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "epoch": jnp.zeros((), jnp.int32),  # completed epochs: the data position
            "rng": jax.random.PRNGKey(config.seed),
        }

    rest = jax.jit(fresh)(params)  # one program, not an eager dispatch (and compile) per leaf
    return graphdef, tx, {"params": params, "batch_stats": batch_stats, **rest}


def initial_train_state(config: ml_collections.ConfigDict) -> State:
    """The train state a run starts from (``create_initial_model``'s model, fresh optimizer),
    before any checkpoint is restored into it."""
    _, _, state = create_train_state(config, create_initial_model(config))
    return state


def _abstract(
    config: ml_collections.ConfigDict,
    split: Callable[[nnx.Module], tuple[nnx.GraphDef, State]],
) -> tuple[nnx.GraphDef, State]:
    """(graphdef, state of ``jax.ShapeDtypeStruct`` leaves): ``split`` of ``config``'s model,
    traced once, never computed."""
    graphdef = None

    def state() -> State:
        nonlocal graphdef  # static: taken from the one trace of the model's construction
        graphdef, out = split(models.create_model(config, models.InitKeys(config.seed)))
        return out

    shapes = jax.eval_shape(state)
    return graphdef, shapes


def abstract_train_state(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, State]:
    """(graphdef, train state of ``jax.ShapeDtypeStruct`` leaves) of ``config``'s model.

    Shapes only, for restoring a checkpoint: initialising a model eagerly is slow and its values
    would be overwritten. No ImageNet file is read (the weights come from the checkpoint).
    """

    def train_state(model: nnx.Module) -> tuple[nnx.GraphDef, State]:
        graphdef, _, state = create_train_state(config, model)
        return graphdef, state

    return _abstract(config, train_state)


def abstract_variables(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, State]:
    """(graphdef, ``{'params', 'batch_stats'}`` of ``jax.ShapeDtypeStruct`` leaves): what
    inference restores (``abstract_train_state`` without the optimizer state; the same
    graphdef)."""

    def variables(model: nnx.Module) -> tuple[nnx.GraphDef, State]:
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return graphdef, {"params": params, "batch_stats": batch_stats}

    return _abstract(config, variables)


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
    outputs: dict[str, jax.Array],
    batch: Batch,
    loss_weights: ml_collections.ConfigDict,
    class_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``w_cls * CE + w_reg * MSE (+ w_ccc * mean(1 - CCC))`` over the valid (mask=1) rows.

    ``class_weights`` (``imbalance.class_weights``: one per class, averaging 1 over the training
    examples) weight each row's cross-entropy by its class; the sum is still divided by the row
    count, so the term keeps its size. The regression terms are never weighted by class. Rows
    without valence/arousal (``has_va`` 0) do not count in the regression terms.
    """
    mask = batch["mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(
        outputs["class_logits"], batch["expression"]
    )
    ce_weight = mask if class_weights is None else mask * class_weights[batch["expression"]]
    ce = (ce * ce_weight).sum() / jnp.maximum(mask.sum(), 1.0)
    va_weight = mask * batch["has_va"]
    squared = ((outputs["valence_arousal"] - batch["valence_arousal"]) ** 2).mean(-1)
    mse = (squared * va_weight).sum() / jnp.maximum(va_weight.sum(), 1.0)
    loss = loss_weights.classification * ce + loss_weights.regression * mse
    terms = {"ce": ce, "mse": mse}
    if loss_weights.ccc:
        ccc = jnp.stack(
            [
                weighted_ccc(
                    batch["valence_arousal"][:, d], outputs["valence_arousal"][:, d], va_weight
                )
                for d in range(2)
            ]
        )
        terms["ccc_loss"] = (1.0 - ccc).mean()
        loss = loss + loss_weights.ccc * terms["ccc_loss"]
    return loss, terms


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    class_weights: np.ndarray | None = None,
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """A pure ``(state, batch) -> (state, outputs)`` training step (not yet jitted);
    ``class_weights`` weight the cross-entropy per class (``compute_loss``)."""
    loss_weights = config.loss_weights
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights, jnp.float32)
    frozen = config.model.freeze_backbone

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        dropout_key = jax.random.fold_in(state["rng"], state["step"])

        # copy=True: fresh Variables owned by this trace, so BatchNorm may update them.
        def loss_fn(params, batch_stats):
            model = nnx.merge(graphdef, params, batch_stats, copy=True)
            outputs = model(
                batch["image"],
                train=True,
                rngs=nnx.Rngs(dropout=dropout_key),
                train_backbone=not frozen,
            )
            loss, terms = compute_loss(outputs, batch, loss_weights, class_weights)
            _, _, new_batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
            return loss, (terms, outputs, new_batch_stats)

        (loss, (terms, outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"]
        )
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
    in (docs/performance.md); a ``lax.scan`` reuses them for every step of the call. Keras calls
    this ``steps_per_execution``.
    """

    def train_steps(state: State, batches: Batch) -> tuple[State, dict[str, jax.Array]]:
        if jax.tree.leaves(batches)[0].shape[0] == 1:  # no loop around a single step
            state, out = train_step(state, jax.tree.map(lambda x: x[0], batches))
            return state, jax.tree.map(lambda x: x[None], out)
        return jax.lax.scan(train_step, state, batches)

    return train_steps


def make_prepare_inference(graphdef: nnx.GraphDef) -> Callable[[State], State]:
    """A pure ``variables -> prepared variables`` function (not yet jitted).

    ``variables`` hold ``params`` and ``batch_stats`` (a train state does); the result has the
    same structure with the parameters rewritten for inference (``MultiTaskModel
    .prepare_inference``: ResNet50's BatchNorms folded into its convolutions), which
    ``InferenceStep.on_prepared`` takes. They are derived from the weights, so they must be
    prepared again whenever the weights change.
    """

    def prepare_inference(variables: State) -> State:
        # jax arrays: the folding assigns to the variables, which host (NumPy) leaves refuse.
        variables = jax.tree.map(jnp.asarray, variables)
        model = nnx.merge(graphdef, variables["params"], variables["batch_stats"], copy=True)
        model.prepare_inference()
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return {"params": params, "batch_stats": batch_stats}

    return prepare_inference


@dataclasses.dataclass(frozen=True)
class InferenceStep:
    """An inference step in two parts: ``prepare`` (``make_prepare_inference``) and
    ``on_prepared(prepared, inputs)``. Called as ``step(variables, inputs)`` it prepares inside
    the call, so its result can never come from stale weights; a caller whose weights are
    fixed (the ``Predictor``) prepares once and calls ``on_prepared``."""

    prepare: Callable[[State], State]
    on_prepared: Callable[[State, Any], dict[str, jax.Array]]

    def __call__(self, variables: State, inputs: Any) -> dict[str, jax.Array]:
        return self.on_prepared(self.prepare(variables), inputs)


def _predictions(
    apply: Callable[[jax.Array], dict[str, jax.Array]], images: jax.Array, flip_tta: bool = False
) -> dict[str, jax.Array]:
    """``{'probs', 'valence_arousal'}`` of the model function ``apply`` (images -> its
    outputs) on ``images``; ``flip_tta`` averages them with those of the horizontally flipped
    images. What every predict step returns."""
    outputs = apply(images)
    probs = jax.nn.softmax(outputs["class_logits"])
    va = outputs["valence_arousal"]
    if flip_tta:
        flipped = apply(images[:, :, ::-1, :])
        probs = (probs + jax.nn.softmax(flipped["class_logits"])) / 2
        va = (va + flipped["valence_arousal"]) / 2
    return {"probs": probs, "valence_arousal": va}


def make_predict_step(graphdef: nnx.GraphDef, flip_tta: bool = False) -> InferenceStep:
    """A pure ``(variables, images) -> {'probs', 'valence_arousal'}`` inference step.

    ``variables`` hold ``params`` and ``batch_stats`` (a train state does); ``flip_tta``
    averages over a horizontally flipped copy. No labels: what prediction on new images runs.
    It computes the model's ``train=False`` function on prepared parameters (``InferenceStep``).
    """

    def on_prepared(prepared: State, images: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, prepared["params"], prepared["batch_stats"])
        return _predictions(lambda x: model(x, train=False, prepared=True), images, flip_tta)

    return InferenceStep(make_prepare_inference(graphdef), on_prepared)


def make_reference_predict_step(
    graphdef: nnx.GraphDef,
) -> Callable[[State, jax.Array], dict[str, jax.Array]]:
    """``make_predict_step``'s function (without flip TTA) computed layer by layer as trained
    (BatchNorm separate, no preparation): the reference the prepared path is tested against."""

    def predict_step(variables: State, images: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
        return _predictions(lambda x: model(x, train=False), images)

    return predict_step


def make_eval_step(graphdef: nnx.GraphDef, flip_tta: bool = False) -> InferenceStep:
    """A pure ``(state, batch) -> outputs`` evaluation step: the predict step's outputs plus
    each example's cross-entropy (``ce``); an ``InferenceStep`` like the predict step."""
    predict_step = make_predict_step(graphdef, flip_tta)

    def on_prepared(prepared: State, batch: Batch) -> dict[str, jax.Array]:
        out = predict_step.on_prepared(prepared, batch["image"])
        ce = -jnp.log(jnp.take_along_axis(out["probs"], batch["expression"][:, None], -1)[:, 0])
        return {**out, "ce": ce}

    return InferenceStep(predict_step.prepare, on_prepared)


def make_eval_steps(
    eval_step: InferenceStep | Callable[[State, Batch], dict[str, jax.Array]],
) -> Callable[[State, Batch], dict[str, jax.Array]]:
    """Several inference batches in one XLA execution: ``(state, batches) -> outputs``.

    ``batches`` and the outputs are stacked on a leading axis, as in ``make_train_steps`` and
    for the same reason: each execution maps its temporaries afresh (docs/performance.md). A
    ``lax.map`` reuses them for every batch of the call. An ``InferenceStep`` prepares the
    state once per call, for all its batches (so a call after a training step sees the new
    weights); to run on variables prepared once, pass its ``on_prepared``.
    """

    def eval_steps(state: State, batches: Batch) -> dict[str, jax.Array]:
        step = eval_step
        if isinstance(eval_step, InferenceStep):
            prepared = eval_step.prepare(state)
            state, step = prepared, eval_step.on_prepared
        if jax.tree.leaves(batches)[0].shape[0] == 1:  # no loop around a single batch
            out = step(state, jax.tree.map(lambda x: x[0], batches))
            return jax.tree.map(lambda x: x[None], out)
        return jax.lax.map(lambda batch: step(state, batch), batches)

    return eval_steps
