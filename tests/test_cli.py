"""User errors in one line, exit codes, the console (the command lines end to end: test_main)."""

import errno
import logging
import os
import subprocess
import sys

import pytest

from affect_jax import cli, config_checks, console
from affect_jax.data.affectnet import DataError
from affect_jax.data.pipeline import DataConfigError
from affect_jax.weights import WeightFileError


@pytest.mark.parametrize(
    "error",
    [
        config_checks.ConfigError("config.batch_size=0: expected an integer >= 1\nsecond line"),
        DataError("no usable example in val_set"),
        DataConfigError("fewer than batch_size"),
        WeightFileError("weights.h5 holds vgg16 weights but the model is resnet50"),
        FileNotFoundError("no checkpoints in /run/checkpoints"),
    ],
)
def test_user_errors_are_their_message(error):
    assert cli.user_error_message(error) == str(error)


def test_bugs_keep_their_traceback():
    assert cli.user_error_message(KeyError("params")) is None
    assert cli.user_error_message(ValueError("shapes (3,) and (4,) mismatch")) is None
    try:  # a bug while handling a user error is still a bug
        try:
            raise FileNotFoundError("x")
        except FileNotFoundError:
            raise TypeError("bug") from None
    except TypeError as e:
        assert cli.user_error_message(e) is None


def test_a_user_error_raised_from_inside_a_library_is_found():
    try:
        try:
            raise DataError("bad file")
        except DataError as e:
            raise RuntimeError("worker failed") from e
    except RuntimeError as e:
        assert cli.user_error_message(e) == "bad file"


def test_a_full_disk_names_the_path_and_what_to_do():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl")
    assert cli.user_error_message(full, "workdir") == (
        "no space left on device writing /runs/a/metrics.jsonl: free some space or pass "
        "another --workdir"
    )
    try:  # deep in a checkpoint writer's thread, re-raised by another exception
        try:
            raise full
        except OSError as e:
            raise RuntimeError("Event loop is closed") from e
    except RuntimeError as e:
        assert cli.user_error_message(e, "output").startswith(
            "no space left on device writing /runs/a/metrics.jsonl"
        )
    tensorstore = ValueError("OUT_OF_RANGE: Error writing local file: No space left on device")
    assert cli.user_error_message(tensorstore) == "no space left on device: free some space"


def test_console_shows_our_info_and_everyones_warnings(tmp_path):
    record = logging.LogRecord
    ours = record("absl", logging.INFO, f"{console.PACKAGE_DIR}/train.py", 1, "epoch 1", (), None)
    library = record(
        "absl", logging.INFO, "/site-packages/orbax/checkpoint.py", 1, "Saving", (), None
    )
    warning = record(
        "absl", logging.WARNING, "/site-packages/orbax/checkpoint.py", 1, "slow", (), None
    )
    detail = record("absl", logging.INFO, f"{console.PACKAGE_DIR}/main.py", 1, "config", (), None)
    detail.console = False
    shown = console.ConsoleFilter()
    assert [shown.filter(r) for r in (ours, library, warning, detail)] == [True, False, True, False]
    formatter = console.ConsoleFormatter()
    assert formatter.format(ours)[8:] == " epoch 1"  # HH:MM:SS first
    assert formatter.format(warning)[8:] == " warning: slow"
    error = record(
        "absl", logging.ERROR, "x.py", 1, "config.seed=0.5: expected an integer", (), None
    )
    assert formatter.format(error) == "error: config.seed=0.5: expected an integer"


SKIP_TEARDOWN_PROGRAM = """
import atexit, sys, threading, time
from affect_jax import cli

def main(argv):
    atexit.register(lambda: sys.stderr.write("exit handlers ran\\n"))
    # Normal interpreter exit would wait for this non-daemon thread for a minute.
    threading.Thread(target=time.sleep, args=(60,)).start()
    for i in range(100_000):
        sys.stdout.write(f"row {i}\\n")  # buffered: lost if the exit does not flush
    return 3

cli.run(main, skip_teardown=True)
"""


def test_skip_teardown_ends_with_the_exit_code_flushed_output_and_exit_handlers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered
    result = subprocess.run(
        [sys.executable, "-c", SKIP_TEARDOWN_PROGRAM],
        capture_output=True,
        text=True,
        timeout=45,  # a normal exit waits 60 s for the thread: TimeoutExpired
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 3
    rows = result.stdout.splitlines()
    assert len(rows) == 100_000 and rows[-1] == "row 99999"
    assert "exit handlers ran" in result.stderr
