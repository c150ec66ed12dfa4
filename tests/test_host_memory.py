import jax
import numpy as np
import pytest

from affect_jax import host_memory

glibc = pytest.mark.skipif(
    not host_memory.can_trim_heap(), reason="the C library has no malloc_trim (not glibc)"
)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@glibc
def test_freed_heap_goes_back_to_the_os():
    # 200 MB of blocks below glibc's mmap threshold live in its heap; one block allocated
    # after them keeps the heap's top in use, so freeing them does not shrink the heap.
    blocks = [bytearray(4000) for _ in range(50_000)]
    keep_top = bytearray(4000)
    before = _rss_mb()
    del blocks
    freed = _rss_mb()
    assert host_memory.release_host_memory()
    after = _rss_mb()
    assert before - freed < 50, (before, freed)  # Still resident: glibc kept it.
    assert freed - after > 150, (freed, after)
    assert len(keep_top) == 4000


def test_clearing_jit_caches_keeps_compiled_executables_valid():
    traces = []

    def double_plus_one(x):
        traces.append(x)  # Runs only when jit traces (cache misses).
        return x * 2 + 1

    f = jax.jit(double_plus_one)
    compiled = jax.jit(lambda x: x - 1).lower(np.float32(1)).compile()
    assert f(np.float32(1)) == 3 and f(np.float32(2)) == 5 and len(traces) == 1
    host_memory.release_host_memory(clear_jit_caches=True)
    assert compiled(np.float32(1)) == 0 and f(np.float32(2)) == 5
    assert len(traces) == 2  # The cache was emptied: traced (and compiled) again.
