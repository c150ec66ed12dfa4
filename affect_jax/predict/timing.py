"""Time spent per stage of prediction, summed over the threads that run the stages."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

TIMED_STAGES = ("decode", "detect", "prepare", "model")


class StageTimes(dict):
    """Seconds per stage (a dict, stage -> seconds) that any thread adds to with ``timed``."""

    def __init__(self, stages: Sequence[str] = TIMED_STAGES):
        super().__init__(dict.fromkeys(stages, 0.0))
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Adds the time of the ``with`` block to ``stage`` (not when the block raises)."""
        start = time.perf_counter()
        yield
        with self._lock:
            self[stage] += time.perf_counter() - start
