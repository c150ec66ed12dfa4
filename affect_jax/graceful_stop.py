"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption notice).

While it trains (``StopSignals.deferred``) the first signal only asks to stop: the driver
finishes the running train call (``steps_per_execution`` steps: a call cannot be cut short),
saves that exact point, waits for every save, and raises ``Stopped``; ``exit_on_stop`` turns it
into one line with the command that resumes and the exit status a shell gives the signal (130,
143). Outside training (reading data, compiling, the final scoring) nothing would be saved, so
the first signal raises ``Stopped`` at once. A second signal ends the process at once.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator

from absl import logging

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """128 + the signal number: what a shell reports for a process ended by that signal."""
    return 128 + signum


class Stopped(BaseException):
    """Training stopped on a signal (after saving where it was, when it was training).

    A BaseException, like KeyboardInterrupt: ``except Exception`` (e.g. around a checkpoint
    restore that may fail) must not swallow it.
    """

    def __init__(self, signum: int, where: str = ""):
        self.signum = signum
        self.where = where
        name = signal.Signals(signum).name
        super().__init__(f"Stopped by {name}{' ' + where if where else ''}")

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class StopSignals:
    """Installs the SIGINT/SIGTERM handlers for the block (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\n{name} again: exiting at once, without saving\n".encode())
            os._exit(exit_code(signum))
        self.signum = signum
        if not self._deferring:
            raise Stopped(signum)
        logging.warning(
            "%s: stopping after the running train call, once its point is saved "
            "(send it again to exit at once without saving)",
            name,
        )

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """In the block a signal only asks to stop (``requested``); one that came before the
        block raises ``Stopped`` on entry."""
        if self.signum is not None:
            raise Stopped(self.signum)
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def requested(self) -> bool:
        """Whether to stop now; in a multi-process run, whether any process got a signal (a
        collective: every process calls it at the same points)."""
        import jax

        if jax.process_count() == 1:
            return self.signum is not None
        import numpy as np
        from jax.experimental import multihost_utils

        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        if self.signum is None and signums.any():
            self.signum = int(signums.max())
        return self.signum is not None


def resume_command() -> str:
    """The command line of this process, as ``python -m affect_jax.main ...``."""
    return shlex.join(["python", "-m", "affect_jax.main", *sys.argv[1:]])


@contextlib.contextmanager
def exit_on_stop() -> Iterator[None]:
    """``main``'s wrapper: ``Stopped`` becomes one line naming the command that resumes, and
    the exit status 130 (SIGINT) or 143 (SIGTERM); no traceback."""
    try:
        yield
    except Stopped as stop:
        print(f"{stop}. Resume with: {resume_command()}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None
