"""Preparing a TFDS dataset once, safely: one process at a time, leftovers of a killed one removed.

TFDS writes a preparation into ``incomplete.<random>_<version>/`` beside the version directory
and renames it when done; a preparation that is killed leaves that folder behind for good.
``prepare_once`` holds an exclusive lock on the dataset config's directory while it prepares, so
any ``incomplete.*`` folder it finds there belongs to a preparation that is gone: it is removed.
The lock (``fcntl.flock``) is released by the kernel when its holder dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

INCOMPLETE_PREFIX = "incomplete."
LOCK_FILE = ".prepare.lock"


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process prepares
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_incomplete(directory: Path) -> list[Path]:
    """Removes the ``incomplete.*`` folders in ``directory``; returns them."""
    leftovers = sorted(p for p in directory.glob(f"{INCOMPLETE_PREFIX}*") if p.is_dir())
    for path in leftovers:
        logging.warning("Removing %s, left by an interrupted data preparation", path)
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def prepare_once(builder: tfds.core.DatasetBuilder, **download_and_prepare_kwargs: Any) -> bool:
    """Prepares ``builder`` unless it is prepared; returns whether it prepared it now.

    Under the lock: a concurrent preparation of the same config is waited for and then reused.
    """
    if builder.is_prepared():
        return False
    config_dir = Path(os.fspath(builder.data_dir)).parent
    with _exclusive(config_dir):
        if builder.is_prepared():  # prepared by the process we waited for
            return False
        remove_incomplete(config_dir)
        builder.download_and_prepare(**download_and_prepare_kwargs)
    return True
