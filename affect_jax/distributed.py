"""Multi-process (multi-host) runs on JAX's own distributed runtime.

Every process runs the same command. ``initialize`` joins them into one JAX system (before any
JAX computation); the driver then builds one 'data' mesh over all their devices, each process
feeds its own slice of every global batch, and XLA reduces gradients across processes (gloo on
CPU, NCCL on GPU, ICI/DCN on TPU). A single process needs none of this: ``initialize`` then does
nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def detected_cluster() -> str | None:
    """The multi-process cluster manager JAX reads the process layout from, if any.

    The same environments JAX's ``jax.distributed.initialize()`` auto-detects, restricted to jobs
    of more than one process (a one-task SLURM job stays a plain single-process run). Cloud TPU
    pods on GCE are only found through their metadata server: pass ``--distributed=on`` there.
    """
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 and "OMPI_MCA_orte_hnp_uri" in env:
        return "ompi"
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in workers:
        return "tpu"
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str = "gloo",
    mode: str = "auto",
) -> bool:
    """Starts JAX's distributed runtime when this is a multi-process run; True if it did.

    ``mode``: 'auto' initialises when an address/count/id is given (arguments, or the env
    variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or a cluster
    is detected (``detected_cluster``); 'on' always initialises (JAX fills in whatever is unset
    from the cluster it finds); 'off' never does. Must run before any JAX computation.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode {mode!r}; expected 'auto', 'on' or 'off'")
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = (coordinator_address, num_processes, process_id)
    if mode == "off":
        return False
    if mode == "auto" and explicit == (None, None, None):
        cluster = detected_cluster()
        if cluster is None:
            return False
        logging.info("Detected a %s multi-process job: starting JAX's distributed runtime", cluster)
    elif mode == "auto" and None in explicit:
        # A partial explicit setting would otherwise hang waiting for a coordinator.
        raise ValueError(
            "a multi-process run needs all of --coordinator_address, --num_processes and "
            f"--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); got "
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, "
            f"process_id={process_id}"
        )
    # CPU devices of different processes talk through these collectives; the setting must
    # precede backend creation, and is ignored by GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logging.info(
        "JAX distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_chief() -> bool:
    """Process 0: the one that writes logs, metrics and reports."""
    return jax.process_index() == 0


@contextlib.contextmanager
def chief_first(name: str) -> Iterator[None]:
    """Runs the block on process 0 before the others (e.g. preparing a shared data cache)."""
    if jax.process_count() == 1:
        yield
        return
    if not is_chief():
        multihost_utils.sync_global_devices(f"{name}: chief done")
    yield
    if is_chief():
        multihost_utils.sync_global_devices(f"{name}: chief done")


def to_host(tree: Any) -> Any:
    """NumPy copies of the whole (global) values of a pytree of arrays.

    An array sharded over devices of other processes is gathered from all of them: a collective,
    so every process must call this with the same tree at the same point.
    """

    def get(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
