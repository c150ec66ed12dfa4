"""Training progress on the console: compile times, throughput and ETA, per-epoch summaries.

On a terminal a progress bar is redrawn in place after every call; otherwise (a log, a pipe) a
progress line is logged every ``log_every_steps`` steps (the run's log file gets those lines in
both cases). The rate is steps over the time that ran them: a call that compiled counts with the
time of its run alone (the compile time is logged apart), and the time between epochs
(validation, checkpointing) is left out of the rate but counted in the ETA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from absl import logging

from affect_jax import console

BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``; ``65`` -> ``'1m05s'``."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#####---------------]`` for a quarter."""
    filled = min(width, width * done // max(total, 1))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class ProgressReporter:
    """Times the training calls; draws a progress bar or logs progress lines, and a summary per
    epoch.

    The driver opens a timed stretch (``start``) when nothing is running on the device, counts
    the steps of every call that did not compile (``count``) and closes the stretch (``stop``)
    once they have all finished, so the rate is steps over the time that ran them.
    """

    def __init__(
        self,
        *,
        num_epochs: int,
        steps_per_epoch: int,
        batch_size: int,
        log_every_steps: int,
        clock: Callable[[], float] = time.time,
        interactive: bool | None = None,
        status: console.StatusLine | None = None,
    ):
        self.num_epochs = num_epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = num_epochs * steps_per_epoch
        self.batch_size = batch_size
        self.log_every_steps = log_every_steps
        self.interactive = console.is_terminal() if interactive is None else interactive
        self._status = status or console.status_line
        self._clock = clock
        self._timed_steps = 0
        self._timed_seconds = 0.0
        self._since: float | None = None  # start of the open stretch
        self._between_epochs: list[float] = []  # seconds of validation + checkpointing
        self._last_loss: float | None = None

    def start(self) -> None:
        """Opens a timed stretch (the device is idle)."""
        self._since = self._clock()

    def stop(self) -> None:
        """Closes the open stretch (every counted step has finished)."""
        if self._since is not None:
            self._timed_seconds += self._clock() - self._since
            self._since = None

    def count(self, steps: int) -> None:
        """``steps`` more steps ran in the open stretch."""
        self._timed_steps += steps

    @property
    def steps_per_second(self) -> float:
        """Over the timed stretches so far, the open one up to now; 0 before any."""
        seconds = self._timed_seconds
        if self._since is not None:
            seconds += self._clock() - self._since
        return self._timed_steps / seconds if seconds > 0 else 0.0

    def eta_seconds(self, done: int) -> float:
        """Seconds left after global step ``done``: the remaining steps at the measured rate,
        plus the measured time between epochs for every epoch end still ahead (NaN before a
        rate is known)."""
        rate = self.steps_per_second
        if not rate:
            return float("nan")
        seconds = (self.total_steps - done) / rate
        if self._between_epochs:
            epoch_ends_left = self.num_epochs - len(self._between_epochs)
            seconds += epoch_ends_left * sum(self._between_epochs) / len(self._between_epochs)
        return seconds

    def compiled(
        self,
        steps: int,
        compile_seconds: float,
        total_seconds: float,
        ahead_seconds: float | None = None,
    ) -> None:
        """Logs a call that compiled; its run (without the compile) is timed. Opens a new
        stretch. ``ahead_seconds``: the call was compiled in that time while the model was
        built (``compile_seconds`` is then only the time taken to pick it up)."""
        run_seconds = total_seconds - compile_seconds
        if ahead_seconds is None:
            where = f"in {compile_seconds:.1f} s"
        else:
            where = f"in {ahead_seconds:.1f} s while the model was built"
        logging.info(
            "Compiled the %d-step train call %s (or loaded it from the compilation cache); "
            "its first call took %.1f s",
            steps,
            where,
            run_seconds,
        )
        self._timed_steps += steps
        self._timed_seconds += run_seconds
        self.start()

    def after_call(self, epoch: int, step: int, steps: int, loss: Callable[[], float]) -> None:
        """Reports the call of ``steps`` steps after global step ``step``: redraws the bar (on
        a terminal) and logs a progress line if the call passed a multiple of
        ``log_every_steps``.

        ``loss``: the call's last loss, fetched only when a line is logged; fetching it waits
        for the call, so its steps are finished when the rate is taken.
        """
        done = step + steps
        every = self.log_every_steps
        if done // every > step // every:
            self._last_loss = loss()
            self._log_line(epoch, done)
        if self.interactive:
            self._draw_bar(epoch, done)

    def _eta_text(self, done: int) -> str:
        eta = self.eta_seconds(done)
        return format_duration(eta) if math.isfinite(eta) else "(measuring)"

    def _log_line(self, epoch: int, done: int) -> None:
        logging.info(
            "epoch %d/%d step %d/%d (%d/%d in epoch): loss %.4f, %.1f img/s, ETA %s",
            epoch + 1,
            self.num_epochs,
            done,
            self.total_steps,
            done - epoch * self.steps_per_epoch,
            self.steps_per_epoch,
            self._last_loss,
            self.steps_per_second * self.batch_size,
            self._eta_text(done),
            extra=console.FILE_ONLY if self.interactive else None,
        )

    def _draw_bar(self, epoch: int, done: int) -> None:
        in_epoch = done - epoch * self.steps_per_epoch
        loss = f" | loss {self._last_loss:.4f}" if self._last_loss is not None else ""
        self._status.show(
            f"epoch {epoch + 1}/{self.num_epochs} {format_bar(in_epoch, self.steps_per_epoch)} "
            f"{in_epoch}/{self.steps_per_epoch}{loss} | "
            f"{self.steps_per_second * self.batch_size:.1f} img/s | ETA {self._eta_text(done)}"
        )

    def epoch_done(self, record: dict[str, Any], val: dict[str, Any]) -> None:
        """Logs an epoch's summary from its metrics record and validation scores."""
        self._status.clear()
        self._between_epochs.append(record["epoch_time_s"] - record["train_time_s"])
        logging.info(
            "epoch %d/%d done in %s: train loss %.4f acc %.3f | val loss %.4f acc %.3f "
            "balanced acc %s F1 %s mean CCC %s",
            record["epoch"],
            self.num_epochs,
            format_duration(record["epoch_time_s"]),
            record["train_loss"],
            record["train_accuracy"],
            val["loss"],
            val["accuracy"],
            format_number(val.get("balanced_accuracy")),
            format_number(val["f1_macro"]),
            format_number(val.get("mean_ccc")),
        )


def format_number(value: Any) -> str:
    """``0.1234`` -> ``'0.123'``; undefined (NaN, None) -> ``'n/a'``."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.3f}"
    return "n/a"
