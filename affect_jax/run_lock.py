"""One writer per run directory: the lock that training and ``--mode=eval`` hold.

The lock is ``fcntl.flock`` on ``<workdir>/run.lock`` (``run_dir.LOCK``), held for the whole
command. Why flock: the kernel releases it when its holder's process ends however it ends
(SIGKILL, a crash), so a dead run never blocks its workdir and nothing has to guess whether a
holder is still alive. The file also holds a JSON record of the holder (host, PID, process start,
boot id, start time): a second command names it when it refuses, and a record still there when
the lock is free (its holder was killed) is reported when the lock is taken over. The file is
never deleted: a process that unlinked it could let two others lock two different files.

Where the filesystem has no flock (some network filesystems), the record alone decides: a
holder on this machine is gone when the machine has rebooted since, or its PID is unused or
belongs to a process started at another time. A holder on another host is taken to be alive.

Readers (prediction, reports, export) take no lock. Multi-process runs: process 0 holds it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from absl import logging

from affect_jax.errors import UserError

LOCK_FILE = "run.lock"  # run_dir.LOCK names it for the rest of the package


class WorkdirLockedError(UserError, RuntimeError):
    """Another live command holds the run directory's lock."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None if none runs.

    With the boot id it tells a live holder from a later process that reuses its PID.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # Field 22; the command name (field 2) may hold spaces, so count after its ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def holder_record(command: str) -> dict[str, Any]:
    """What identifies this process as a lock holder."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": process_start(os.getpid()) or "",
        "boot_id": _boot_id(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
    }


def describe(holder: dict[str, Any]) -> str:
    """``'train on host h, PID 12, started 2024-...'`` (what is known of it)."""
    if not holder:
        return "a holder that has not written its record yet"
    return (
        f"{holder.get('command', 'a command')} on host {holder.get('host', '?')}, "
        f"PID {holder.get('pid', '?')}, started {holder.get('started', '?')}"
    )


def holder_is_gone(holder: dict[str, Any]) -> bool:
    """Whether the process of ``holder`` has provably ended (only decidable on its host)."""
    if holder.get("host") != socket.gethostname():
        return False
    boot_id = _boot_id()
    if boot_id and holder.get("boot_id") and holder["boot_id"] != boot_id:
        return True  # the machine has rebooted since
    start = process_start(int(holder.get("pid", -1)))
    if start is None:
        return True
    return bool(start and holder.get("process_start") and start != holder["process_start"])


def _read_record(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        record = json.loads(data) if data.strip() else {}
    except ValueError:  # a holder writing it right now, or a damaged file
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


class RunLock:
    """The exclusive lock of ``workdir``; ``acquire`` refuses at once when it is held."""

    def __init__(self, workdir: str, command: str = "train"):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.command = command
        self._fd: int | None = None

    def _refusal(self, holder: dict[str, Any]) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"{self.workdir} is in use by another run ({describe(holder)}; lock file "
            f"{self.path}): wait for it to end or stop it, or use another --workdir"
        )

    def acquire(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(fd)
            previous = _read_record(fd)
            if previous:
                logging.warning(
                    "Took over the lock of %s from %s, which ended without releasing it "
                    "(killed, or its machine restarted)",
                    self.workdir,
                    describe(previous),
                )
            _write_record(fd, holder_record(self.command))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(_read_record(fd)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logging.warning(
                "%s: this filesystem has no file locks (%s); going by the holder record alone",
                self.path,
                e.strerror,
            )
            holder = _read_record(fd)
            if holder and not holder_is_gone(holder):
                raise self._refusal(holder) from None

    def release(self) -> None:
        """Clears the record (a clean end) and unlocks; the file stays."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str, command: str = "train") -> Iterator[None]:
    """Holds ``workdir``'s lock for the block: process 0 locks, every process learns whether
    it could, so a refused multi-process run stops on every process."""
    import jax  # here: the lock itself needs no JAX (tests start processes that only lock)

    if jax.process_count() == 1:
        with RunLock(workdir, command):
            yield
        return
    import numpy as np
    from jax.experimental import multihost_utils

    lock, error = None, None
    if jax.process_index() == 0:
        lock = RunLock(workdir, command)
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            lock, error = None, e
    locked = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is not None:
        raise error
    if not locked:
        raise WorkdirLockedError(f"{workdir} is in use by another run (process 0 says which)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
