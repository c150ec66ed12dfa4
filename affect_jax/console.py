"""What a person sees on the console; the full detail goes to the run's log file.

The console shows affect_jax's own INFO lines (progress, one summary per epoch, where results
went) and every library's warnings and errors, as ``HH:MM:SS message``. Other libraries' INFO
lines (Orbax's saves, TFDS, JAX's backends, clu's hyperparameter and metric dumps) and records
logged with ``extra=FILE_ONLY`` go only to the log file (``log_to_file``), which keeps every
record in absl's full format.

TensorFlow's and XLA's C++ start-up lines are written straight to the process's stderr, before
any Python logging: ``native_startup_logs`` catches them into the log file, and
``quiet_native_logs`` sets ``TF_CPP_MIN_LOG_LEVEL`` (unless the user did) so that their later
INFO and WARNING lines are not printed at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator

from absl import logging as absl_logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
FILE_ONLY = {"console": False}  # logging.info(..., extra=FILE_ONLY): the log file only
_native_startup_text: list[str] = []


def quiet_native_logs() -> None:
    """TensorFlow and XLA C++ logs: errors only (set before they are imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def native_startup_logs() -> Iterator[None]:
    """Catches what the process writes to its stderr (file descriptor 2) inside the block: the
    C++ libraries' start-up lines. Kept for ``log_to_file``; printed if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode(errors="replace")
            if failed:
                sys.stderr.write(text)
            elif text:
                _native_startup_text.append(text)


class StatusLine:
    """One line redrawn in place on a terminal (a progress bar); log lines print above it."""

    def __init__(self, stream=None):
        self._stream = stream
        self.shown = False

    @property
    def stream(self):
        return self._stream or sys.stderr

    def show(self, text: str) -> None:
        width = _terminal_width()
        self.stream.write("\r\033[K" + text[: width - 1])
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(2).columns
    except OSError:
        return 100


status_line = StatusLine()


def is_terminal() -> bool:
    """Whether the console is a terminal (a progress bar, not progress lines)."""
    return sys.stderr.isatty()


class ConsoleFilter(logging.Filter):
    """Lets through warnings and errors, and affect_jax's INFO lines not marked file-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and (
            not getattr(record, "console", True)
            or not os.path.abspath(record.pathname).startswith(PACKAGE_DIR)
        ):
            return False
        status_line.clear()  # the line prints where the progress bar was
        return True


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        if record.levelno >= logging.WARNING:
            return f"{clock} warning: {message}"
        return f"{clock} {message}"


def setup() -> None:
    """The console policy above, on absl's stderr handler; Python warnings become log records."""
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
        handler.addFilter(ConsoleFilter())
    handler.setFormatter(ConsoleFormatter())
    logging.captureWarnings(True)


def log_to_file(path: str) -> logging.Handler:
    """Appends every log record (absl's format) and the caught start-up lines to ``path``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(absl_logging.PythonFormatter())
    for text in _native_startup_text:
        handler.stream.write(text)
    logging.getLogger().addHandler(handler)
    return handler
