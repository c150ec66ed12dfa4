"""scripts/benchmark.py: lever parsing and the per-worker environment it implies."""

import io
import json

import pytest
from absl import app

from scripts import benchmark


def test_levers_parse():
    assert benchmark.parse_lever("default") == {}
    assert benchmark.parse_lever("conv=onednn+malloc=reuse") == {
        "conv": "onednn",
        "malloc": "reuse",
    }
    assert benchmark.parse_lever("xla_flags=--a=1 --b=2") == {"xla_flags": "--a=1 --b=2"}
    assert benchmark.parse_lever("steps=1") == {"steps": "1"}
    assert benchmark.parse_lever("act=float32+steps=1") == {"act": "float32", "steps": "1"}
    assert benchmark.parse_lever("bn=xla") == {"bn": "xla"}
    assert benchmark.parse_lever("pool=xla+bn=native") == {"pool": "xla", "bn": "native"}
    assert benchmark.MALLOC_ENV["reuse"]["MALLOC_MMAP_MAX_"] == "0"


@pytest.mark.parametrize(
    "lever, match",
    [
        ("conv", "bad --lever item"),
        ("threads=4", "keys: conv"),
        ("malloc=tcmalloc", "bad malloc lever"),
        ("steps=0", "bad steps lever"),
        ("steps=four", "bad steps lever"),
        ("act=bfloat16", "bad act lever"),
        ("bn=onednn", "bad bn lever"),
        ("pool=onednn", "bad pool lever"),
        ("conv=dot", "bad conv lever"),
        ("conv=im2col", "bad conv lever"),
    ],
)
def test_bad_levers_are_usage_errors(lever, match):
    with pytest.raises(app.UsageError, match=match):
        benchmark.parse_lever(lever)


def test_act_conv_bn_and_pool_levers_take_the_configs_values():
    from affect_jax.models import ACTIVATION_DTYPES
    from affect_jax.ops import batch_norm, conv, max_pool, native

    assert benchmark.ACTIVATION_DTYPES == ACTIVATION_DTYPES
    assert benchmark.IMPLS == native.IMPLS == conv.IMPLS == batch_norm.IMPLS == max_pool.IMPLS
    assert benchmark.CONV_PATHS == conv.PATHS


def test_peers_parse():
    assert benchmark.parse_peers(["keras", "torch", "torch_compile"]) == [
        "keras",
        "torch",
        "torch_compile",
    ]
    assert benchmark.parse_peers(["torch_compile", "torch_compile"]) == ["torch_compile"]
    with pytest.raises(app.UsageError, match="bad --peers item 'jax'"):
        benchmark.parse_peers(["keras", "jax"])


def test_batch_sizes_parse_and_default_to_the_batch_size():
    assert benchmark.parse_batch_sizes([], 32) == [32]
    assert benchmark.parse_batch_sizes(["1", "32", "1"], 16) == [1, 32]
    for bad in ("0", "x", "-1"):
        with pytest.raises(app.UsageError, match=f"bad --batch_sizes item '{bad}'"):
            benchmark.parse_batch_sizes(["1", bad], 32)
    assert benchmark.step_keys([1, 32]) == ["train", "eval@1", "eval@32"]
    assert benchmark.step_keys([1, 32], train=False) == ["eval@1", "eval@32"]


def test_warmup_is_the_contenders_default_unless_given():
    assert benchmark.warmup_steps("torch_compile", -1) == benchmark.WARMUP_STEPS["torch_compile"]
    assert benchmark.warmup_steps("keras", -1) == benchmark.WARMUP_STEPS["keras"]
    assert benchmark.warmup_steps("keras", 0) == 0
    assert benchmark.warmup_steps("jax", 7) == 7


def _result(label, kind, times):
    steps = {}
    for key, ts in times.items():
        n = 32 if key == "train" else int(key.split("@")[1])
        steps[key] = {"times_s": ts, "img_s": benchmark._stats([n / t for t in ts])}
    return {
        "label": label,
        "kind": kind,
        "model": "resnet50",
        "dtype": "bfloat16",
        "batch_size": 32,
        "steps": steps,
        "peak_rss_mb": {"jax": 2816.0, "keras": 3904.0}.get(kind, 2476.0),
    }


def test_summary_table_takes_the_best_peer_per_step_and_per_round_ratios():
    # Seconds per batch in three alternating rounds. Training: torch (1.6 s) is the best peer;
    # batch-1 inference: keras (0.05 s) is.
    ours = _result(
        "affect-jax[default]", "jax", {"train": [1.0, 2.0, 1.0], "eval@1": [0.04, 0.04, 0.1]}
    )
    keras = _result("keras", "keras", {"train": [4.0, 4.0, 4.0], "eval@1": [0.05, 0.05, 0.05]})
    torch = _result("torch", "torch", {"train": [1.6, 1.6, 1.2], "eval@1": [0.2, 0.2, 0.2]})
    results = [ours, keras, torch]
    assert benchmark.best_peer(results, "train")["label"] == "torch"
    assert benchmark.best_peer(results, "eval@1")["label"] == "keras"
    # per round: peer time / our time
    ratio = benchmark._ratios(ours, torch, "train")
    assert ratio["median"] == pytest.approx(1.2)
    assert (ratio["min"], ratio["max"]) == pytest.approx((0.8, 1.6))
    table = benchmark.summary_table(results).splitlines()
    assert table[0].startswith("| resnet50 bfloat16 | ours img/s | best peer |")
    assert table[2] == (
        "| train, batch 32 | 32.00 [16.00-32.00] | torch | 20.00 [20.00-26.67] | 1.20 [0.80-1.60] |"
    )
    assert table[3] == (
        "| eval, batch 1 | 25.00 [10.00-25.00] | keras | 20.00 [20.00-20.00] | 1.25 [0.50-1.25] |"
    )
    assert table[-1] == "Peak RSS MB: affect-jax[default] 2816, keras 3904, torch 2476"


def test_summary_table_without_peers():
    ours = _result("affect-jax[default]", "jax", {"train": [1.0, 1.0]})
    line = benchmark.summary_table([ours]).splitlines()[2]
    assert line == "| train, batch 32 | 32.00 [32.00-32.00] | - | - | - |"


_STARTUP_LINES = [
    (0.3, "I1205 some C++ start-up line"),
    (4.0, "19:06:27 JAX process 0/1, devices: [CpuDevice(id=0)]"),
    (9.5, "19:06:53 Data 'synthetic': 3200 train / 800 validation examples (...)"),
    (12.0, "19:06:56 Data 'synthetic': 3200 train / 800 validation examples (again)"),
]
_LOGGED_PHASES = {
    "first_step_s": 26.0,
    "first_call_start_s": 23.8,
    "steps_in_first_call": 8,
    "imports_s": 4.0,
    "data_s": 5.5,
}


@pytest.mark.parametrize(
    "first_call_line, phases, summary_line",
    [
        (
            "Compiled the 8-step train call in 3.8 s (or loaded it from the compilation "
            "cache); its first call took 2.2 s",
            {"build_s": 10.5, "compile_s": 3.8, "first_call_s": 2.2},
            "|   compile | 3.8 [3.8-3.8] |",
        ),
        # Compiled during the model's build: the build runs until the first call.
        (
            "Compiled the 8-step train call in 3.8 s while the model was built (or loaded it "
            "from the compilation cache); its first call took 2.2 s",
            {"build_s": 14.3, "compile_ahead_s": 3.8, "first_call_s": 2.2},
            "|   compile, in a second thread during the imports and build | 3.8 [3.8-3.8] |",
        ),
    ],
    ids=["compiled-after-the-build", "compiled-during-the-build"],
)
def test_startup_timing_splits_the_logged_phases(first_call_line, phases, summary_line):
    lines = [*_STARTUP_LINES, (26.0, f"19:07:30 {first_call_line}")]
    out = benchmark.train_startup(lines)
    assert out == pytest.approx({**_LOGGED_PHASES, **phases})
    assert benchmark.train_startup(lines[:-1]) is None
    summary = benchmark.startup_summary(
        {"train": [out], "resume": [out], "predict": [{"wall_s": 9.0}]}
    )
    assert "| train: launch to the first train call | 23.8 [23.8-23.8] |" in summary
    assert "| train: launch to the end of the first train call | 26.0 [26.0-26.0] |" in summary
    assert "| resume: launch to the first train call | 23.8 [23.8-23.8] |" in summary
    assert summary_line in summary
    assert "| predict one image, wall-clock | 9.0 [9.0-9.0] |" in summary


def test_a_peer_that_fails_is_reported_in_one_line(monkeypatch, capsys):
    def broken(spec):
        raise RuntimeError("Compiler: cc not found\nlong traceback text")

    monkeypatch.setattr(benchmark, "_torch_worker", broken)
    benchmark.run_worker({"kind": "torch_compile"})
    out = capsys.readouterr().out.strip()
    assert out == benchmark.PREFIX + '{"error": "RuntimeError: Compiler: cc not found"}'


@pytest.mark.parametrize("train", [True, False])
def test_notrain_workers_never_train_and_time_only_inference(monkeypatch, capsys, train):
    calls = []

    def worker(spec):
        evals = {1: lambda: calls.append("eval@1"), 32: lambda: calls.append("eval@32")}
        compile_s = benchmark._first_calls_seconds(spec, lambda: calls.append("train"), evals)
        return (lambda: calls.append("train")), evals, {"compile_s": compile_s}

    monkeypatch.setattr(benchmark, "_torch_worker", worker)
    monkeypatch.setattr("sys.stdin", io.StringIO("eval@1\neval@32\nquit\n"))
    benchmark.run_worker({"kind": "torch", "warmup": 2, "train": train})
    lines = capsys.readouterr().out.strip().splitlines()
    ready = json.loads(lines[0][len(benchmark.PREFIX) :])
    assert ready["ready"] and len(lines) == 3
    timed = ["eval@1", "eval@32"]
    if train:  # compile (first train call), two warm-up rounds of every step, the timed calls
        assert calls == ["train"] + ["train", "eval@1", "eval@32"] * 2 + timed
        assert set(ready["warmup_times_s"]) == {"train", "eval@1", "eval@32"}
    else:
        assert calls == ["eval@1", "eval@32"] * 3 + timed
        assert set(ready["warmup_times_s"]) == {"eval@1", "eval@32"}


@pytest.mark.parametrize(
    "min_seconds, durations, calls, seconds",
    [
        (0.0, [0.5, 0.1, 0.1], 1, 0.5),  # one call per round
        (1.0, [0.9, 0.1, 0.1, 0.1], 3, 0.1),  # a cold first call is not the latency
        (1.0, [0.3, 0.3, 0.2, 0.3, 9.0], 4, 0.3),  # calls until the burst took 1 s
        (1.0, [1.5, 0.1, 0.1], 1, 1.5),  # a call that alone takes 1 s is warm enough
    ],
)
def test_inference_rounds_time_the_median_of_a_burst(
    monkeypatch, min_seconds, durations, calls, seconds
):
    left = list(durations)
    monkeypatch.setattr(benchmark, "_seconds", lambda fn: left.pop(0))
    assert benchmark.timed_calls(None, min_seconds) == seconds
    assert len(durations) - len(left) == calls


def test_failed_peers_are_left_out_and_ours_is_an_error(monkeypatch, capsys):
    class FakeWorker:
        def __init__(self, spec, env):
            self.spec = spec
            self.info = {"error": "boom"} if spec["kind"] != "keras" else {"ready": True}
            self.closed = False

        def close(self):
            self.closed = True

    monkeypatch.setattr(benchmark, "Worker", FakeWorker)
    specs = [{"kind": k, "label": k} for k in ("keras", "torch_compile")]
    started = benchmark._start_workers(specs)
    assert [w.spec["label"] for w in started] == ["keras"]
    assert "torch_compile does not run here, left out: boom" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="affect-jax failed: boom"):
        benchmark._start_workers([{"kind": "jax", "label": "affect-jax"}])


def test_torch_compile_peer_compiles_train_and_inference_at_tiny_size():
    pytest.importorskip("torch", reason="PyTorch is an optional benchmark peer")
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    spec = {
        "kind": "torch_compile",
        "model": "vgg16",
        "batch_size": 2,
        "image_size": 32,
        "num_classes": 8,
        "dtype": "float32",
        "eval_batch_sizes": [1, 2],
    }
    try:
        train_once, evals, info = benchmark._torch_worker(spec)
        train_once()
        for fn in evals.values():
            fn()
    finally:
        torch._inductor.config.freezing = False
    assert sorted(evals) == [1, 2]
    assert info["compile_s"] > 0
    # one graph for training, one per inference batch size
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3
    torch._dynamo.reset()
