"""Data parallelism over devices and processes (docs/scaling.md).

A run on 1, 2 or 4 CPU devices, or on 2 processes joined by jax.distributed (gloo), gives the
same losses and metrics as on one device, and its checkpoints resume on another device count.
Each device count needs its own process (JAX fixes it at start-up), so runs are subprocesses of
``affect_jax.main`` (sharing the suite's persistent XLA cache).

Tolerance: every logged loss and metric within ``ATOL`` of the one-device run. Different device
counts reduce float32 sums (BatchNorm moments, gradients, the loss) in different orders, so
predictions may differ in the last bits (measured: at most 6e-7, the largest a correlation of
the barely trained model's nearly constant predictions; ``ATOL`` is twice that).
Ranking metrics are the exception: the tiny, barely trained model's class probabilities of
different examples can be within one float32 ulp of each other, and a last-bit change then swaps
a pair; one swapped pair moves the macro ROC-AUC by 1 / (8 classes * positives * negatives)
(about 0.002 here) and the PR-AUC by a few times that, hence ``RANK_ATOL`` for ``auc``/``pr_auc``
(measured: no swap, a difference of 0).
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from affect_jax import config_checks, distributed
from affect_jax.data import pipeline
from affect_jax.data.source import ExamplePool, decode_raw_image
from tests.conftest import REPO, TINY_FLAGS

ATOL = 1.2e-6
RANK_ATOL = 0.01
EPOCHS = ["--config.num_epochs=2", "--config.steps_per_epoch=2"]
TIMEOUT = 600


# ---------------------------------------------------------------------------------------------
# In-process: input sharding, flags, errors
# ---------------------------------------------------------------------------------------------


def _pool(n: int) -> ExamplePool:
    rng = np.random.default_rng(0)
    return ExamplePool(
        {
            "image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            "expression": (np.arange(n) % 5).astype(np.int32),
            "valence": rng.uniform(-1, 1, n).astype(np.float32),
            "arousal": np.arange(n, dtype=np.float32),  # the row's index: where each example went
            "id": np.arange(n),
        },
        decode_raw_image,
    )


def test_processes_read_their_slices_of_the_single_process_batches(tiny):
    tiny.data.image_size = 8
    tiny.augment.enabled = True  # per-example seeds: same augmentation whichever process reads
    pool = _pool(50)

    def batches(index, count, start=0):
        ds = pipeline.train_batches(
            pool, tiny, 1, 8, start_step=start, process_index=index, process_count=count
        )
        return list(ds.as_numpy_iterator())

    single = batches(0, 1)
    halves = batches(0, 2), batches(1, 2)
    assert len(single) == len(halves[0]) == len(halves[1]) == 50 // 8
    for whole, first, second in zip(single, *halves, strict=True):
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))
    resumed = batches(1, 2, start=3)
    for a, b in zip(halves[1][3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_over_processes_score_every_example_once(tiny):
    tiny.data.image_size = 8
    pool = _pool(37)
    per_process = [list(pipeline.eval_batches(pool, tiny, 16, p, 4)) for p in range(4)]
    assert [len(b) for b in per_process] == [3, 3, 3, 3]  # same count: no process waits alone
    single = list(pipeline.eval_batches(pool, tiny, 16))
    for i, whole in enumerate(single):
        for key in whole:
            np.testing.assert_array_equal(
                whole[key], np.concatenate([b[i][key] for b in per_process])
            )
    rows = np.concatenate([b["valence_arousal"][:, 1] for b in single])
    mask = np.concatenate([b["mask"] for b in single])
    np.testing.assert_array_equal(np.sort(rows[mask > 0]), np.arange(37))
    assert not rows[mask == 0].any()  # padding is zeros


def test_batch_must_split_over_devices_and_processes(tiny):
    with pytest.raises(pipeline.DataConfigError, match="3 processes"):
        pipeline.process_rows(16, 8, 0, 3)
    tiny.batch_size = 6
    assert config_checks.config_errors(tiny, device_count=1, process_count=1) == []
    errors = config_checks.config_errors(tiny, device_count=1, process_count=4)
    assert errors == ["config.batch_size=6: expected a multiple of the 4 processes"]


def test_batch_size_must_divide_devices(tiny):
    errors = config_checks.config_errors(tiny, device_count=3, process_count=1)
    assert errors == [
        "config.batch_size=8: expected a multiple of the 3 devices",
        "config.eval_batch_size=16: expected a multiple of the 3 devices",
    ]


def test_distributed_initialize_is_a_no_op_for_one_process(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_PROCESS_ADDRESSES",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_cluster() is None
    assert not distributed.initialize()
    assert not distributed.initialize("10.0.0.1:1234", 2, 0, mode="off")
    with pytest.raises(ValueError, match="--num_processes"):
        distributed.initialize("10.0.0.1:1234")  # would wait forever for the others
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detected_cluster() is None  # a one-task job is a plain run
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.detected_cluster() == "slurm"


def test_distributed_initialize_passes_flags_env_or_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a: calls.append(a))
    for name in (
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_PROCESS_ADDRESSES",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize("10.0.0.1:1234", 4, 3)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.initialize()
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.initialize()  # JAX reads the rest from SLURM
    assert calls == [("10.0.0.1:1234", 4, 3), ("10.0.0.2:99", 2, 1), (None, None, None)]


# ---------------------------------------------------------------------------------------------
# End to end: subprocesses of affect_jax.main
# ---------------------------------------------------------------------------------------------


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": str(devices),
            # The tiny model's programs compile in well under JAX's 1 s caching threshold.
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
    )
    return env


def _command(workdir, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "affect_jax.main",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        *EPOCHS,
        *extra,
    ]


def device_counts(log: str) -> list[int]:
    """The device count of each ``JAX process P/N, devices: [...]`` line main logs at start."""
    lines = re.findall(r"JAX process \d+/\d+, devices: \[(.*)\]", log)
    return [len(re.findall(r"\bid=\d+", devices)) for devices in lines]


def _run(workdir, *extra: str, devices: int = 1) -> None:
    result = subprocess.run(
        _command(workdir, *extra),
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The run really had that many devices (not a device count the environment failed to set).
    assert device_counts(result.stderr) == [devices], result.stderr[-3000:]


def _numbers(value, prefix="") -> dict[str, float]:
    """Flat {path: number} of the numeric leaves of a JSON value."""
    if isinstance(value, dict):
        return {
            k: v
            for key, item in value.items()
            for k, v in _numbers(item, f"{prefix}{key}.").items()
        }
    if isinstance(value, list):
        return {
            k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{prefix}{i}.").items()
        }
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix.rstrip("."): float(value)}
    return {}


def _results(workdir) -> dict[str, float]:
    """Every epoch's losses and metrics and the final metrics (not timings)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    numbers = _numbers(
        {"history": history, "final": final["metrics"], "best_epoch": final["best_epoch"]}
    )
    return {k: v for k, v in numbers.items() if not k.endswith("time_s")}


def assert_same_results(workdir, reference) -> float:
    """Same losses and metrics as ``reference`` within ATOL; returns the largest difference."""
    got, want = _results(workdir), _results(reference)
    assert got.keys() == want.keys(), set(got) ^ set(want)
    worst = {"ranking": 0.0, "other": 0.0}
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
            continue
        kind = "ranking" if key.rsplit(".", 1)[-1].endswith("auc") else "other"
        difference = abs(got[key] - value)
        assert difference <= (RANK_ATOL if kind == "ranking" else ATOL), (key, got[key], value)
        worst[kind] = max(worst[kind], difference)
    print(f"{workdir}: max difference {worst['other']:.3g} (auc, pr_auc: {worst['ranking']:.3g})")
    return worst["other"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """Two epochs on one device."""
    workdir = str(tmp_path_factory.mktemp("one_device"))
    _run(workdir)
    return workdir


def test_two_devices_match_one(reference, tmp_path):
    _run(tmp_path, devices=2)
    assert_same_results(tmp_path, reference)


def test_checkpoints_resume_across_device_counts(reference, tmp_path):
    # Epoch 1 on 4 devices, epoch 2 (and the final scoring) on 1.
    four_then_one = tmp_path / "four_then_one"
    _run(four_then_one, "--config.num_epochs=1", devices=4)
    _run(four_then_one, devices=1)
    assert_same_results(four_then_one, reference)
    # The one-device run's epoch-1 checkpoint, as if killed then; epoch 2 on 4 devices.
    one_then_four = tmp_path / "one_then_four"
    shutil.copytree(reference, one_then_four)
    shutil.rmtree(one_then_four / "checkpoints" / "2")
    os.remove(one_then_four / "final_metrics.json")
    _run(one_then_four, devices=4)
    assert_same_results(one_then_four, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(reference, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    workdir = tmp_path / "run"
    procs, logs = [], []
    for index in range(2):
        logs.append(open(tmp_path / f"process_{index}.log", "w+"))
        cmd = _command(
            workdir,
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={index}",
        )
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=logs[-1], stderr=subprocess.STDOUT)
        )
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for index, (code, log) in enumerate(zip(codes, logs, strict=True)):
        log.seek(0)
        text = log.read()
        log.close()
        assert code == 0, text[-3000:]
        assert f"JAX process {index}/2, devices:" in text
        assert device_counts(text) == [2], text[-3000:]  # one device per process, two in all
    assert_same_results(workdir, reference)
    # Only process 0 writes the logs: one history line per epoch, one TensorBoard file.
    with open(workdir / "metrics.jsonl") as f:
        assert len(f.readlines()) == 2
    assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
