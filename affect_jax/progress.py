"""Training progress on the console: compile times, throughput and ETA, per-epoch summaries.

Throughput counts only timed steps: the calls that compiled and the time between epochs
(validation, checkpointing) are left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from absl import logging


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``; ``65`` -> ``'1m05s'``."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressReporter:
    """Times the training calls and logs a progress line every ``log_every_steps`` steps.

    The driver opens a timed stretch (``start``) when nothing is running on the device, counts
    the steps of every call that did not compile (``count``) and closes the stretch (``stop``)
    once they have all finished, so the rate is steps over the time that ran them.
    """

    def __init__(self, *, num_epochs: int, steps_per_epoch: int, batch_size: int,
                 log_every_steps: int, clock: Callable[[], float] = time.time):
        self.num_epochs = num_epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = num_epochs * steps_per_epoch
        self.batch_size = batch_size
        self.log_every_steps = log_every_steps
        self._clock = clock
        self._timed_steps = 0
        self._timed_seconds = 0.0
        self._since: float | None = None  # start of the open stretch

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
        return self._timed_steps / max(seconds, 1e-9)

    def compiled(self, steps: int, compile_seconds: float, total_seconds: float) -> None:
        """Logs a call that compiled (its steps are not timed) and opens a new stretch."""
        logging.info("Compiled the %d-step train call in %.1f s (or loaded it from the "
                     "compilation cache); its first call took %.1f s", steps, compile_seconds,
                     total_seconds - compile_seconds)
        self.start()

    def after_call(self, epoch: int, step: int, steps: int, loss: Callable[[], float]) -> None:
        """Logs a progress line if the call of ``steps`` steps after global step ``step``
        passed a multiple of ``log_every_steps``.

        ``loss``: the call's last loss, fetched only when a line is logged; fetching it waits
        for the call, so its steps are finished when the rate is taken.
        """
        every = self.log_every_steps
        if (step + steps) // every <= step // every:
            return
        last_loss = loss()
        rate = self.steps_per_second
        done = step + steps
        eta = (self.total_steps - done) / rate if rate else float("nan")
        logging.info(
            "epoch %d/%d step %d/%d (%d/%d in epoch): loss %.4f, %.1f img/s, ETA %s",
            epoch + 1, self.num_epochs, done, self.total_steps,
            done - epoch * self.steps_per_epoch, self.steps_per_epoch, last_loss,
            rate * self.batch_size, format_duration(eta) if math.isfinite(eta) else "(measuring)",
        )

    def epoch_done(self, record: dict[str, Any], val: dict[str, Any]) -> None:
        """Logs an epoch's summary from its metrics record and validation scores."""
        logging.info(
            "epoch %d/%d done in %s: train loss %.4f acc %.3f | val loss %.4f acc %.3f "
            "balanced acc %.3f F1 %.3f mean CCC %s", record["epoch"], self.num_epochs,
            format_duration(record["epoch_time_s"]), record["train_loss"],
            record["train_accuracy"], val["loss"], val["accuracy"], val["balanced_accuracy"],
            val["f1_macro"],
            f"{val['mean_ccc']:.3f}" if "mean_ccc" in val else "n/a",
        )
