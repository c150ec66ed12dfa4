"""Batching of concurrent requests' faces into shared model calls, with a bounded queue.

A request is admitted (``admit``) when it arrives, before its body is read; at most
``max_pending`` are admitted at once and the rest are turned away (``Busy``), so a burst
costs no memory. Admitted requests hand their face crops to ``score``. One worker task takes
the oldest waiting request, adds the requests waiting behind it while their faces fit in
``max_batch``, and, while other admitted requests are still being decoded, waits up to
``max_wait_s`` for them; then it runs one model call on a dedicated thread. A request alone
is scored at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

ScoreFn = Callable[[Sequence[np.ndarray]], list[dict[str, Any]]]


class Busy(Exception):
    """The server already holds as many requests as it accepts."""


@dataclasses.dataclass
class Stats:
    """Counters since start, served by ``GET /health``."""

    requests: int = 0  # admitted
    rejected_busy: int = 0
    faces: int = 0  # scored
    model_calls: int = 0
    max_faces_per_call: int = 0
    model_seconds: float = 0.0  # spent in model calls (preparing crops and the network)
    pending: int = 0  # admitted and not yet answered

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_seconds"] = round(self.model_seconds, 3)
        d["mean_faces_per_call"] = (
            round(self.faces / self.model_calls, 3) if self.model_calls else 0.0
        )
        return d


@dataclasses.dataclass
class _Job:
    crops: Sequence[np.ndarray]
    future: asyncio.Future


class FaceBatcher:
    """Shares model calls between concurrent requests (see the module docstring).

    ``start`` and every other method run on the server's event loop.
    """

    def __init__(self, score: ScoreFn, max_batch: int, max_wait_s: float, max_pending: int):
        if max_batch < 1 or max_pending < 1 or max_wait_s < 0:
            raise ValueError(
                f"max_batch={max_batch} and max_pending={max_pending} must be "
                f">= 1, max_wait_s={max_wait_s} >= 0"
            )
        self._score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self.stats = Stats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one of the ``max_pending`` places for a request; ``Busy`` if none is free."""
        if self.stats.pending >= self.max_pending:
            self.stats.rejected_busy += 1
            raise Busy(
                f"the server is busy ({self.max_pending} requests in progress); try again shortly"
            )
        self.stats.pending += 1
        self.stats.requests += 1
        try:
            yield
        finally:
            self.stats.pending -= 1

    async def score(self, crops: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """The scores of an admitted request's crops, from a model call shared with others."""
        if not crops:
            return []
        assert self._queue is not None, "FaceBatcher.start() was not awaited"
        job = _Job(crops, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carried: _Job | None = None
        while True:
            batch = [carried or await self._queue.get()]
            carried = None
            faces = len(batch[0].crops)
            deadline = loop.time() + self.max_wait_s
            while faces < self.max_batch:
                if self._queue.empty():
                    # Wait only for requests already admitted (still being read or decoded).
                    waiting_for_others = self.stats.pending > len(batch)
                    if not waiting_for_others or loop.time() >= deadline:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                else:
                    job = self._queue.get_nowait()
                if faces + len(job.crops) > self.max_batch:
                    carried = job
                    break
                batch.append(job)
                faces += len(job.crops)
            await self._call(loop, batch, faces)

    async def _call(self, loop: asyncio.AbstractEventLoop, batch: list[_Job], faces: int) -> None:
        crops = [c for job in batch for c in job.crops]
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._score, crops)
        except Exception as e:  # answered to each request; the worker goes on
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        self.stats.model_seconds += time.perf_counter() - start
        self.stats.model_calls += 1
        self.stats.faces += faces
        self.stats.max_faces_per_call = max(self.stats.max_faces_per_call, faces)
        start = 0
        for job in batch:
            end = start + len(job.crops)
            if not job.future.done():  # a request whose client left is cancelled
                job.future.set_result(results[start:end])
            start = end
