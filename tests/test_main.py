"""The command line end to end: a short run, config errors, kill-and-resume equivalence."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tests.conftest import REPO, TINY_FLAGS, XLA_CACHE


def _main(workdir, *extra, config="configs/default.py"):
    return [
        sys.executable,
        "-m",
        "affect_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        *extra,
    ]


def _run(cmd, timeout=600, env=None):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def strict_json_loads(text):
    """json.loads that refuses NaN, Infinity and -Infinity, as other JSON readers do."""
    return json.loads(text, parse_constant=_reject_constant)


def _same(a, b):
    """Equality that treats NaN as equal to NaN (undefined metrics are NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _val_history(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [
        {k: v for k, v in r.items() if k.startswith("val_") or k in ("epoch", "step", "train_loss")}
        for r in rows
    ]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = _run(_main(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_run_writes_everything(reference_run):
    workdir, result = reference_run
    files = set(os.listdir(workdir))
    for name in (
        "config.json",
        "metrics.jsonl",
        "final_metrics.json",
        "report.md",
        "training_curves.png",
        "confusion_matrix.png",
        "checkpoints",
    ):
        assert name in files, (name, files)
    assert any(f.startswith("events.out.tfevents") for f in files)
    history = _val_history(workdir)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert final["num_classes"] == 8 and final["data_source"] == "synthetic"
    for key in ("accuracy", "f1_macro", "auc", "pr_auc", "kappa", "mean_ccc", "valence_rmse"):
        assert key in final["metrics"]
    assert "ETA" in result.stderr
    assert "epoch 3/3 done" in result.stderr
    # Strict JSON: undefined metrics (e.g. the precision of a class never predicted) are null.
    records = [
        strict_json_loads(line)
        for line in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    ]
    assert any(v is None for r in records for v in r.values())
    strict_json_loads(open(os.path.join(workdir, "final_metrics.json")).read())


def test_rerun_of_finished_run_resumes_without_training(reference_run):
    workdir, _ = reference_run
    before = json.load(open(os.path.join(workdir, "final_metrics.json")))
    log_path = os.path.join(workdir, "run.log")
    log_start = os.path.getsize(log_path)
    result = _run(_main(workdir), env=dict(os.environ, JAX_LOG_COMPILES="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from epoch 3" in result.stderr
    assert "step 2/12" not in result.stderr  # no training step ran
    with open(log_path) as f:
        f.seek(log_start)
        rerun_log = f.read()
    assert "jit(eval_steps)" in rerun_log  # JAX logs its compiles here
    assert "train_steps" not in rerun_log  # nor is the train call compiled
    after = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert _same(after["metrics"], before["metrics"])


def _kill_when(cmd, condition, timeout=300):
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.time()
    while not condition():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - start < timeout
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("kill_at", ["first_metrics_line", "mid_second_epoch"])
def test_sigkill_and_rerun_gives_identical_results(reference_run, tmp_path, kill_at):
    reference, _ = reference_run
    workdir = str(tmp_path)
    history = os.path.join(workdir, "metrics.jsonl")

    def lines():
        return open(history).read().count("\n") if os.path.exists(history) else 0

    if kill_at == "first_metrics_line":
        # Right after epoch 1's metrics are written, while its checkpoint is being saved.
        _kill_when(_main(workdir), lambda: lines() >= 1)
    else:
        ckpt = os.path.join(workdir, "checkpoints", "1")
        _kill_when(_main(workdir), lambda: os.path.isdir(ckpt))
        time.sleep(1.0)
    result = _run(_main(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _same(_val_history(workdir), _val_history(reference))
    got = json.load(open(os.path.join(workdir, "final_metrics.json")))
    want = json.load(open(os.path.join(reference, "final_metrics.json")))
    assert _same(got["metrics"], want["metrics"])
    assert got["best_epoch"] == want["best_epoch"]


def test_steps_per_execution_that_does_not_divide_the_epoch(reference_run, tmp_path):
    """3 steps per call over 4-step epochs (calls of 3 and 1) trains as 4 calls of 1 would."""
    reference, _ = reference_run  # the default: one call of 4 steps per epoch
    result = _run(_main(str(tmp_path), "--config.steps_per_execution=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Compiled the 1-step train call") == 1  # not every epoch
    assert result.stderr.count("Compiled the 3-step train call") == 1
    # The calls of 3 were compiled during setup; the shorter last one when it came.
    assert re.search(r"Compiled the 3-step train call in [\d.]+ s while the model", result.stderr)
    assert re.search(r"Compiled the 1-step train call in [\d.]+ s \(", result.stderr)
    for step in (3, 4, 7, 8, 11, 12):  # a progress line for every call that passes 2, 4, ...
        assert f"step {step}/12 " in result.stderr, step
    got, want = _val_history(str(tmp_path)), _val_history(reference)
    assert [r["step"] for r in got] == [4, 8, 12]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in g:  # NaN (undefined metrics) equals NaN
            np.testing.assert_allclose(
                np.asarray(g[key], float),
                np.asarray(w[key], float),
                rtol=1e-4,
                atol=1e-5,
                err_msg=key,
            )


def test_resumed_run_takes_its_train_steps_from_the_compilation_cache(tmp_path):
    workdir, cache = str(tmp_path / "run"), str(tmp_path / "xla_cache")
    first = _run(_main(workdir, "--config.num_epochs=1", f"--config.compilation_cache_dir={cache}"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert any(name.startswith("jit_train_steps-") for name in os.listdir(cache))
    # JAX_LOG_COMPILES makes JAX log persistent-cache hits as warnings.
    resumed = _run(
        _main(workdir, "--config.num_epochs=2", f"--config.compilation_cache_dir={cache}"),
        env=dict(os.environ, JAX_LOG_COMPILES="1"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from epoch 1" in resumed.stderr
    # The call compiles while TensorFlow is imported, whose start-up lines go to run.log only.
    with open(os.path.join(workdir, "run.log")) as f:
        assert "Persistent compilation cache hit for 'jit_train_steps'" in f.read()


def test_bad_steps_per_execution_is_a_clear_error(tmp_path):
    result = _run(_main(str(tmp_path), "--config.steps_per_execution=0"))
    assert result.returncode == 1
    assert _error_lines(result) == ["error: config.steps_per_execution=0: expected an integer >= 1"]


def _error_lines(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()


def test_unknown_config_key_is_a_clear_error(tmp_path):
    result = _run(_main(str(tmp_path), "--config.no_such_field=1"))
    assert result.returncode == 2
    assert _error_lines(result) == [
        "error: --config.no_such_field=1: the config has no field 'no_such_field' "
        "(configs/default.py lists every field)"
    ]


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = _run(_main(str(tmp_path), config="configs/no_such_config.py"))
    assert result.returncode == 2
    assert _error_lines(result) == [
        "error: --config=configs/no_such_config.py: no such file (--helpfull lists the flags)"
    ]


def test_bad_config_value_is_a_clear_error(tmp_path):
    result = _run(_main(str(tmp_path), "--config.batch_size=lots"))
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert line.startswith("error: flag --config.batch_size=lots: invalid literal for int()")


def test_bad_values_are_refused_one_line_each_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    result = _run(
        _main(
            str(workdir),
            "--config.model.name=alexnet",
            "--config.num_epochs=0",
            "--config.learning_rate=-1",
        )
    )
    assert result.returncode == 1
    assert _error_lines(result) == [
        "error: config.model.name='alexnet': expected one of 'resnet50', 'vgg16'",
        "error: config.num_epochs=0: expected an integer >= 1",
        "error: config.learning_rate=-1.0: expected a number > 0",
    ]
    assert not workdir.exists()
    # --traceback shows where a user error was raised.
    result = _run(_main(str(workdir), "--config.num_epochs=0", "--traceback"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError: config.num_epochs=0" in result.stderr


def test_study_config_without_data_says_what_to_pass(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "affect_jax.main",
        "--config=configs/resnet50.py",
        f"--workdir={tmp_path}",
    ]
    result = _run(cmd)
    assert result.returncode != 0
    assert "--config.data.dir" in result.stderr and "synthetic" in result.stderr


def test_eval_mode_scores_a_checkpoint_on_a_chosen_split(reference_run):
    workdir, _ = reference_run
    result = _run(
        _main(workdir, "--mode=eval", "--checkpoint=latest", "--split=test", "--flip_tta")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.load(open(os.path.join(workdir, "eval_test_latest_flip.json")))
    assert scored["split"] == "test" and scored["epoch"] == 3 and scored["flip_tta"]
    assert scored["num_examples"] == 120 // 5  # the synthetic source's held-out pool
    assert sum(map(sum, scored["metrics"]["confusion_matrix"])) == scored["num_examples"]
    # Scoring the best checkpoint on validation reproduces the training run's final metrics.
    result = _run(_main(workdir, "--mode=eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    best = json.load(open(os.path.join(workdir, "eval_validation_best.json")))
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert best["epoch"] == final["best_epoch"]
    assert _same(best["metrics"], final["metrics"])
    for name in ("eval_test_latest_flip.json", "eval_validation_best.json"):
        strict_json_loads(open(os.path.join(workdir, name)).read())


def test_console_for_people_and_the_run_log_for_detail(reference_run):
    workdir, result = reference_run
    console = result.stderr
    for noise in ("Orbax", "orbax", "[Hyperparameters]", "cuda", "I0000", "Traceback"):
        assert noise not in console, noise
    assert max(len(line) for line in console.splitlines()) < 200
    log = open(os.path.join(workdir, "run.log")).read()
    for detail in (
        "checkpoint_manager.py",
        "[Hyperparameters]",
        "val_precision_neutral",
        "epoch 3/3 done",
    ):
        assert detail in log, detail


def test_demo_console_stays_short(tmp_path):
    """The whole console of the demo (its first epoch of 15 here) stays under 100 lines."""
    epochs = 1
    result = _run(
        [
            sys.executable,
            "-m",
            "affect_jax.main",
            "--config=configs/demo.py",
            f"--workdir={tmp_path}",
            f"--config.num_epochs={epochs}",
            f"--config.compilation_cache_dir={XLA_CACHE}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    per_epoch = sum(line[9:].startswith(f"epoch {epochs}/") for line in lines)
    fixed = len(lines) - epochs * per_epoch
    assert per_epoch <= 5 and fixed <= 8, result.stderr
    assert fixed + 15 * per_epoch < 100


# ---------------------------------------------------------------------------------------------
# What a run guarantees: one run per workdir, damaged checkpoints, stop signals, resume config
# ---------------------------------------------------------------------------------------------


def _last_line(stderr):
    return stderr.strip().splitlines()[-1]


def test_a_second_run_is_refused_and_a_killed_holders_lock_taken_over(reference_run):
    from tests.test_run_lock import start_holder

    workdir, _ = reference_run
    holder = start_holder(workdir)  # a live process holding the run's lock
    try:
        refused = _run(_main(workdir))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert refused.returncode != 0
    assert f"{workdir} is in use by another run (train on host " in _last_line(refused.stderr)
    assert f"PID {holder.pid}, started " in _last_line(refused.stderr)
    assert "Resumed" not in refused.stderr  # refused before anything was read or written
    # The holder was killed: the next command takes its lock over, here to be refused for its
    # config (a different model width) in one line naming the field.
    taken = _run(_main(workdir, "--config.model.width=0.125"))
    assert "Took over the lock of " in taken.stderr and f"PID {holder.pid}" in taken.stderr
    assert taken.returncode != 0
    assert _last_line(taken.stderr).endswith(
        f"cannot resume {workdir} with this config: model.width (0.0625 -> 0.125) differs from "
        "the run's config and would not fit its checkpoints or data split; start a new run "
        f"with another --workdir, or resume with the values of {workdir}/config.json"
    )


def test_a_damaged_newest_checkpoint_is_set_aside_and_its_epoch_redone(reference_run, tmp_path):
    reference, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    newest = os.path.join(workdir, "checkpoints", "3")
    files = [os.path.join(d, f) for d, _, names in os.walk(newest) for f in names]
    os.truncate(max(files, key=os.path.getsize), 100)
    result = _run(_main(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Checkpoint 3 of {workdir}/checkpoints cannot be restored (" in result.stderr
    assert "Resumed from epoch 2" in result.stderr
    assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["3"]
    assert _same(_val_history(workdir), _val_history(reference))
    got = json.load(open(os.path.join(workdir, "final_metrics.json")))
    want = json.load(open(os.path.join(reference, "final_metrics.json")))
    assert _same(got["metrics"], want["metrics"])


# 12 one-step calls per epoch, a progress line after each: signals land between calls.
STOP_FLAGS = [
    "--config.steps_per_execution=1",
    "--config.steps_per_epoch=12",
    "--config.num_epochs=2",
    "--config.log_every_steps=1",
]


def _signal_when(cmd, condition, signum, timeout=300):
    """Runs ``cmd``, sends ``signum`` once ``condition(stderr so far)`` holds; the result."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
    start = time.time()

    def stderr():
        log.seek(0)
        return log.read()

    while not condition(stderr()):
        assert proc.poll() is None, "the run ended before the signal:\n" + stderr()[-3000:]
        assert time.time() - start < timeout
        time.sleep(0.02)
    proc.send_signal(signum)
    proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", stderr())


def test_sigint_after_an_epoch_and_sigterm_mid_epoch_resume_exactly(tmp_path):
    reference, workdir = str(tmp_path / "reference"), str(tmp_path / "run")
    result = _run(_main(reference, *STOP_FLAGS))
    assert result.returncode == 0, result.stderr[-3000:]
    history = os.path.join(workdir, "metrics.jsonl")

    # Ctrl-C right after epoch 1's metrics line, while its checkpoint is being written.
    stopped = _signal_when(
        _main(workdir, *STOP_FLAGS), lambda _: os.path.exists(history), signal.SIGINT
    )
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert _last_line(stopped.stderr) == (
        "Stopped by SIGINT after epoch 1/2 (saved). Resume with: "
        + shlex.join(["python", "-m", "affect_jax.main", *_main(workdir, *STOP_FLAGS)[3:]])
    )
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # whole, no tmp folder

    # SIGTERM (preemption) two steps into epoch 2: the run stops mid-epoch, saved.
    stopped = _signal_when(
        _main(workdir, *STOP_FLAGS), lambda err: "step 14/24 " in err, signal.SIGTERM
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert "Resumed from epoch 1 (step 12)" in stopped.stderr
    assert _last_line(stopped.stderr).startswith("Stopped by SIGTERM in epoch 2/2 after step ")
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # epochs only
    assert os.listdir(os.path.join(workdir, "checkpoint_mid_epoch"))

    resumed = _run(_main(workdir, *STOP_FLAGS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(mid-epoch checkpoint)" in resumed.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoint_mid_epoch"))
    assert _same(_val_history(workdir), _val_history(reference))
    got = json.load(open(os.path.join(workdir, "final_metrics.json")))
    want = json.load(open(os.path.join(reference, "final_metrics.json")))
    assert _same(got["metrics"], want["metrics"])
    assert got["best_epoch"] == want["best_epoch"]
