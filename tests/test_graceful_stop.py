"""Stop signals: a stop asked while training, raised outside it, a second signal exits at once.

The whole run stopped and resumed (exit codes, saved points, identical results): test_main.py.
"""

import os
import signal
import subprocess
import sys

import pytest

from affect_jax import graceful_stop
from tests.conftest import REPO


def test_a_signal_while_deferred_only_asks_to_stop():
    with graceful_stop.StopSignals() as signals:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.requested() and signals.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_signal_outside_training_stops_at_once():
    with pytest.raises(graceful_stop.Stopped) as stop:
        with graceful_stop.StopSignals():
            os.kill(os.getpid(), signal.SIGINT)
    assert stop.value.exit_code == 130 and str(stop.value) == "Stopped by SIGINT"
    assert graceful_stop.Stopped(signal.SIGTERM, "after epoch 1/3").exit_code == 143
    assert not isinstance(stop.value, Exception)  # `except Exception` does not swallow it


def test_exit_on_stop_prints_the_command_that_resumes(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py", "--config=c.py", "--workdir=/tmp/a b"])
    with pytest.raises(SystemExit) as exit_:
        with graceful_stop.exit_on_stop():
            raise graceful_stop.Stopped(signal.SIGTERM, "after epoch 1/3 (saved)")
    assert exit_.value.code == 143
    assert capsys.readouterr().err == (
        "Stopped by SIGTERM after epoch 1/3 (saved). Resume with: python -m affect_jax.main "
        "--config=c.py '--workdir=/tmp/a b'\n"
    )


# Waits in a deferred block (as training does) until stopped.
WAITER = (
    "import time; from affect_jax import graceful_stop\n"
    "with graceful_stop.StopSignals() as s, s.deferred():\n"
    "    print('ready', flush=True)\n"
    "    while True:\n"
    "        time.sleep(0.01)\n"
    "        if s.signum: print('asked', flush=True); time.sleep(600)\n"
)


def test_a_second_ctrl_c_exits_at_once():
    proc = subprocess.Popen(
        [sys.executable, "-c", WAITER],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "asked"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "SIGINT again: exiting at once, without saving" in stderr
    assert "Traceback" not in stderr
