"""Handing the host memory a run's phases free back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import jax


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def can_trim_heap() -> bool:
    """Whether the C library can hand freed heap memory back (glibc's `malloc_trim`)."""
    return _malloc_trim() is not None


def release_host_memory(*, clear_jit_caches: bool = False) -> bool:
    """Returns memory freed by the previous phase to the OS; True if `malloc_trim` ran.

    Building a model eagerly and compiling a train step leave a few hundred MB freed inside
    glibc's heap, still counted in the process's RSS. The train step's temporaries are
    fresh mappings that cannot reuse it, so without this it adds to the run's peak.
    `clear_jit_caches` also drops JAX's compiled executables so far (e.g. the initialisers'
    eager ops, not run again); executables already held (`.compile()`'s) stay valid.
    """
    if clear_jit_caches:
        jax.clear_caches()
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
