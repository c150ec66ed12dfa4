"""The device mesh and where arrays live on it: batches split over 'data', the rest replicated."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device, axis 'data'.

    Auto axes: XLA propagates the batch sharding and inserts the gradient all-reduce itself.
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(
    batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, stacked: bool = False
) -> dict[str, jax.Array]:
    """Process-local NumPy batch -> global arrays split over the 'data' axis.

    ``stacked``: the arrays hold several batches on a leading axis (``steps.make_train_steps``);
    the rows, on the second axis, are split.
    """
    sharding = _batch_sharding(mesh, stacked)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def batch_shapes(
    fields: dict[str, tuple[tuple[int, ...], np.dtype]],
    batch_size: int,
    mesh: jax.sharding.Mesh,
    batches: int | None = None,
) -> dict[str, jax.ShapeDtypeStruct]:
    """What ``shard_batch`` gives, as ``jax.ShapeDtypeStruct``s, for a global batch of
    ``batch_size`` rows whose examples have ``fields`` ((shape, dtype) per key), or for
    ``batches`` such batches stacked (``stacked=True``)."""
    stacked = batches is not None
    sharding = _batch_sharding(mesh, stacked)
    lead = (batches, batch_size) if stacked else (batch_size,)
    return {
        k: jax.ShapeDtypeStruct((*lead, *shape), dtype, sharding=sharding)
        for k, (shape, dtype) in fields.items()
    }


def _batch_sharding(mesh: jax.sharding.Mesh, stacked: bool) -> NamedSharding:
    return NamedSharding(mesh, P(None, "data") if stacked else P("data"))


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


def replicated_shapes(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree``, replicated over the mesh: where a restored
    checkpoint goes, whatever the device count that saved it."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
