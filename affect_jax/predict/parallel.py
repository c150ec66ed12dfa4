"""An ordered, bounded parallel map: decoding and detection run ahead of the model."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``fn(item)`` for every item, in order, computed by ``workers`` threads.

    A feeder thread draws ``items`` (so reading them, e.g. decoding video frames, overlaps with
    the consumer too) and keeps at most ``ahead`` results waiting. An exception of ``fn`` or of
    the items is raised here, at its place in the order.
    """
    pending: queue.Queue[Any] = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def put(entry: Any) -> bool:
        while not stop.is_set():
            try:
                pending.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed(pool: futures.Executor) -> None:
        try:
            for item in items:
                if not put(pool.submit(fn, item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
        put(_END)

    with futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="predict") as pool:
        feeder = threading.Thread(target=feed, args=(pool,), daemon=True)
        feeder.start()
        try:
            while (entry := pending.get()) is not _END:
                if isinstance(entry, BaseException):
                    raise entry
                yield entry.result()
        finally:
            stop.set()
            # Drain (and cancel) what waits, so a feeder blocked on a full queue sees the stop.
            while feeder.is_alive() or not pending.empty():
                try:
                    entry = pending.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(entry, futures.Future):
                    entry.cancel()
