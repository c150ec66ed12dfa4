"""The workdir lock: a live holder refuses others, a dead one's lock is taken over."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from absl import logging

from affect_jax import run_dir, run_lock
from tests.conftest import REPO

# A process that takes the lock, says so, and holds it until it is killed.
HOLDER = (
    "import sys, time; from affect_jax import run_lock; "
    "run_lock.RunLock(sys.argv[1], 'train').acquire(); print('locked', flush=True); "
    "time.sleep(600)"
)


def start_holder(workdir) -> subprocess.Popen:
    """A live process holding ``workdir``'s lock (killed by the caller)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def warnings(monkeypatch):
    lines = []
    monkeypatch.setattr(logging, "warning", lambda fmt, *args: lines.append(fmt % args))
    return lines


def test_a_live_holder_is_named_and_a_killed_one_taken_over(tmp_path, warnings):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(run_lock.WorkdirLockedError) as error:
            run_lock.RunLock(str(tmp_path), "eval").acquire()
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(
            f"{tmp_path} is in use by another run (train on host "
            f"{socket.gethostname()}, PID {holder.pid}, started "
        )
        assert "use another --workdir" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock.RunLock(str(tmp_path), "train") as lock:
        assert len(warnings) == 1
        assert warnings[0].startswith(
            f"Took over the lock of {tmp_path} from train on host {socket.gethostname()}, "
            f"PID {holder.pid}, started "
        )
        assert warnings[0].endswith(
            "which ended without releasing it (killed, or its machine restarted)"
        )
        record = json.loads(open(lock.path).read())
        assert record["pid"] == os.getpid() and record["command"] == "train"
    assert open(tmp_path / run_dir.LOCK).read() == ""  # released cleanly: no record left


def test_a_released_lock_is_taken_without_a_warning(tmp_path, warnings):
    for _ in range(2):
        with run_lock.RunLock(str(tmp_path)):
            pass
    assert warnings == []
    assert os.path.exists(tmp_path / run_dir.LOCK)  # the file stays: see run_lock


def _record(**changes):
    return {**run_lock.holder_record("train"), **changes}


def test_holder_is_gone_compares_host_boot_and_process_start(tmp_path):
    assert not run_lock.holder_is_gone(_record())  # this very process
    assert not run_lock.holder_is_gone(_record(host="elsewhere", pid=2**22 + 1))  # can't tell
    assert run_lock.holder_is_gone(_record(boot_id="an-earlier-boot"))
    assert run_lock.holder_is_gone(_record(process_start="1"))  # the PID was reused
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run_lock.holder_is_gone(_record(pid=int(dead.stdout)))


@pytest.mark.parametrize("holder", ["alive", "gone"])
def test_without_flock_the_record_decides(tmp_path, monkeypatch, warnings, holder):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    record = _record() if holder == "alive" else _record(boot_id="an-earlier-boot")
    (tmp_path / run_dir.LOCK).write_text(json.dumps(record))
    lock = run_lock.RunLock(str(tmp_path))
    if holder == "alive":
        with pytest.raises(run_lock.WorkdirLockedError, match=f"PID {os.getpid()}"):
            lock.acquire()
    else:
        lock.acquire()
        lock.release()
        assert any(line.startswith("Took over") for line in warnings)
