"""The train call (``steps_per_execution`` train steps as one jitted program) and its
compilation before the train state exists.

The compile is seconds of a cold start, and it needs shapes only: the train state's
(``steps.abstract_train_state``) and the stacked batches' (``data.example_shapes``). So it runs
in a second thread while other work goes on. ``main`` starts it right after the imports of JAX
(``compile_early``), while the model is built and TensorFlow imported, when the call does not
depend on the data; otherwise ``train.setup`` starts it once the data are read. This module
imports no TensorFlow, so that ``main`` can start it first.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from affect_jax import sharding, steps
from affect_jax.data import example_shapes


@dataclasses.dataclass(frozen=True)
class CompiledAhead:
    """A train call compiled from shapes alone, before the train state existed."""

    executable: Callable
    signature: Any  # arg_signature of the (state, chunk) it was compiled for
    seconds: float  # its lowering and compilation


@dataclasses.dataclass(frozen=True)
class EarlyCall:
    """What ``compile_early`` made: the model's graph, the jitted train call and the call
    compiled for chunks of ``calls_before_data`` batches."""

    graphdef: nnx.GraphDef
    train_steps: Callable
    compiled: CompiledAhead


def jit_train_steps(
    config: ml_collections.ConfigDict, class_weights: np.ndarray | None
) -> tuple[nnx.GraphDef, steps.State, Callable]:
    """(graphdef, train state shapes, the jitted train call) of ``config``'s model: the call is
    ``steps.make_train_steps`` over the train step, the state donated. Nothing is computed."""
    graphdef, state_shapes = steps.abstract_train_state(config)
    tx = steps.create_optimizer(config, state_shapes["params"])
    step = steps.make_train_step(graphdef, tx, config, class_weights)
    return graphdef, state_shapes, jax.jit(steps.make_train_steps(step), donate_argnums=(0,))


def call_shapes(
    config: ml_collections.ConfigDict,
    state_shapes: steps.State,
    mesh: jax.sharding.Mesh,
    calls: int,
) -> tuple[Any, Any]:
    """The (state, chunk) shapes of a train call of ``calls`` batches, placed as the driver
    places them (the state replicated, the batches split over the mesh)."""
    return (
        sharding.replicated_shapes(state_shapes, mesh),
        sharding.batch_shapes(example_shapes(config), config.batch_size, mesh, batches=calls),
    )


def arg_signature(args: Any) -> Any:
    """What a compiled call is specific to: the structure of ``args`` and each leaf's shape,
    dtype, sharding and weak type (arrays and ``jax.ShapeDtypeStruct``s alike)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, [(x.shape, x.dtype, x.sharding, x.weak_type) for x in leaves]


def compile_ahead(train_steps: Any, args: tuple[Any, Any]) -> CompiledAhead:
    """``train_steps`` (jitted) compiled for ``args``, the (state, chunk) shapes."""
    start = time.time()
    executable = train_steps.lower(*args).compile()
    return CompiledAhead(executable, arg_signature(args), time.time() - start)


def compiles_before_data(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config``'s train call is fixed before the data are read: class weights come
    from the training split's counts and are constants of the call."""
    return config.loss_weights.get("class_weighting", "none") == "none"


def calls_before_data(config: ml_collections.ConfigDict) -> int:
    """Batches in a train call as far as the config says (``steps_per_execution``, capped by
    ``steps_per_epoch``); an epoch of fewer batches makes the data's call shorter."""
    if config.steps_per_epoch > 0:
        return min(config.steps_per_execution, config.steps_per_epoch)
    return config.steps_per_execution


def compile_early(config: ml_collections.ConfigDict) -> EarlyCall:
    """The train call of a run whose call is fixed before its data (``compiles_before_data``),
    compiled for ``calls_before_data`` batches; ``train.setup`` uses it when the data agree."""
    graphdef, state_shapes, train_steps = jit_train_steps(config, None)
    shapes = call_shapes(config, state_shapes, sharding.make_mesh(), calls_before_data(config))
    return EarlyCall(graphdef, train_steps, compile_ahead(train_steps, shapes))
