r"""Training/eval step and input-pipeline speed of affect-jax, optionally against Keras and PyTorch.

    python scripts/benchmark.py --model=resnet50 --dtype=float32,bfloat16 --batch_size=32 \
      --image_size=224 --steps=5 --warmup=2 [--lever=conv=xla --lever=conv=native] [--compare] \
      [--output=benchmark.json]

Model: the project's multi-task model (backbone, global average pool, Dense(8) softmax CE and
Dense(2) MSE, Adam 1e-4; no hidden layer, no dropout) on random 224x224 images, whole jitted
train steps (forward, backward, Adam, BatchNorm statistics), called as the training driver calls
them (``steps_per_execution`` steps, or evaluation batches, per call; every time is per
batch). ``--compare`` builds the
same model in Keras 3 / TensorFlow (`keras.applications`, ``mixed_bfloat16`` policy for bf16) and
PyTorch (scripts/torch_models.py, channels_last, ``torch.autocast`` bf16) when they are
installed, each called once per step (as ``model.fit`` and a PyTorch loop do).

Every contender (each ``--lever`` of affect-jax, Keras, PyTorch) runs in its own worker process,
so peak RSS and XLA flags are per contender; the workers stay alive and the parent runs them
ROUND BY ROUND (one step each, the order rotated every round), so that load from other processes
on a shared machine hits all contenders alike. Warm-up steps are excluded. Reported: median
images/s with min/max and IQR over ``--steps`` rounds, compile time (JAX: lower + compile; peers:
first call), peak RSS, achieved GFLOP/s (XLA's cost analysis of the affect-jax step, i.e. the same
nominal FLOPs for every contender), and per-round ratios affect-jax / peer with their spread.

Levers: ``--lever`` takes ``key=value`` items joined by ``+``; keys: ``conv`` (config.conv_impl:
auto, xla, native; or a path of affect_jax.ops.conv.PATHS pinned in every layer: dot1x1, XLA
with the 1x1 convolutions as dots ('auto' without the extension); onednn, oneDNN's direct
convolutions without Winograd; winograd, what 'native' runs), ``xla_flags`` (appended to
XLA_FLAGS in that worker),
``donate`` (0/1: donate the train state), ``steps`` (config.steps_per_execution: train steps
per XLA call; times are per step), ``act`` (config.activation_dtype: auto, compute, float32),
``bn`` (config.batch_norm_impl: auto, xla, native), ``pool`` (config.pool_impl: auto, xla,
native),
``malloc`` (glibc settings of that worker: ``reuse`` keeps freed memory in one heap, so XLA's
per-call temporary buffer is not mapped and zero-filled again every call; ``hugepages`` backs
large blocks with transparent huge pages).
``--lever=default`` is the config's defaults (conv=auto, steps=8, act=auto, bn=auto,
pool=auto). The first lever is the baseline the others are compared with.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags

ROOT = Path(__file__).resolve().parent.parent

FLAGS = flags.FLAGS
flags.DEFINE_list("model", ["resnet50"], "Backbones: resnet50, vgg16.")
flags.DEFINE_list("dtype", ["float32"], "Compute dtypes: float32, bfloat16.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("image_size", 224, "Square input side.")
flags.DEFINE_integer("steps", 5, "Timed rounds (>= 5 for a median with spread).")
flags.DEFINE_integer(
    "warmup", 2, "Untimed steps per contender after compilation (at least one call)."
)
flags.DEFINE_integer("num_classes", 8, "Classes of the expression head.")
flags.DEFINE_multi_string("lever", ["default"], "affect-jax variants (see module doc).")
flags.DEFINE_bool("compare", False, "Also run Keras/TF and PyTorch (when installed).")
flags.DEFINE_bool("eval", True, "Also time the eval (inference) step.")
flags.DEFINE_bool("input", False, "Also time the tf.data input pipeline (synthetic faces).")
flags.DEFINE_string("cache_dir", "", "JAX persistent compilation cache for the workers.")
flags.DEFINE_string("output", "benchmark.json", "JSON results file ('' = none).")
flags.DEFINE_string("worker", "", "Internal: run as a worker with this JSON spec.")

PREFIX = "@@BENCH "


# ---------------------------------------------------------------------------------------------
# Workers (one contender each; commands on stdin, results on stdout after PREFIX)
# ---------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


# glibc reads these when the process starts, so they are set in the worker's environment.
MALLOC_ENV = {
    "reuse": {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    },
    "hugepages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}


LEVER_KEYS = ("conv", "xla_flags", "donate", "malloc", "steps", "act", "bn", "pool")
# affect_jax.models.ACTIVATION_DTYPES, affect_jax.ops.native.IMPLS (config.conv_impl,
# batch_norm_impl, pool_impl) and affect_jax.ops.conv.PATHS (tested equal); the parent process
# does not import jax.
ACTIVATION_DTYPES = ("auto", "compute", "float32")
IMPLS = ("auto", "xla", "native")
CONV_PATHS = ("xla", "dot1x1", "onednn", "winograd")


def parse_lever(lever: str) -> dict[str, str]:
    """``--lever``'s ``key=value+...`` as a dict; app.UsageError for an unknown key or value."""
    if lever in ("", "default"):
        return {}
    out = {}
    for item in lever.split("+"):
        key, sep, value = item.partition("=")
        if not sep or key not in LEVER_KEYS:
            raise app.UsageError(f"bad --lever item {item!r} (keys: {', '.join(LEVER_KEYS)})")
        if key == "steps" and not (value.isdigit() and int(value) >= 1):
            raise app.UsageError(f"bad steps lever {value!r} (an integer >= 1)")
        if key == "act" and value not in ACTIVATION_DTYPES:
            raise app.UsageError(f"bad act lever {value!r} (one of {ACTIVATION_DTYPES})")
        if key == "conv" and value not in IMPLS + CONV_PATHS:
            raise app.UsageError(f"bad conv lever {value!r} (one of {IMPLS + CONV_PATHS[1:]})")
        if key in ("bn", "pool") and value not in IMPLS:
            raise app.UsageError(f"bad {key} lever {value!r} (one of {IMPLS})")
        if key == "malloc" and value not in MALLOC_ENV:
            raise app.UsageError(f"bad malloc lever {value!r} (one of {sorted(MALLOC_ENV)})")
        out[key] = value
    return out


def _default_config():
    """configs/default.py's config (loaded by path: configs/ is a directory, not a package)."""
    return runpy.run_path(str(ROOT / "configs" / "default.py"))["get_config"]()


def _nominal_flops(config, batch) -> float:
    """XLA's cost analysis of the train step with plain XLA convolutions (nothing compiled).

    The same nominal FLOPs for every lever: XLA cannot count inside custom calls (oneDNN).
    """
    import jax

    from affect_jax import steps

    reference = config.copy_and_resolve_references()
    reference.conv_impl = "xla"
    built = {}

    def build():
        model = steps.create_initial_model(reference)
        built["graphdef"], built["tx"], state = steps.create_train_state(reference, model)
        return state

    state = jax.eval_shape(build)
    lowered = jax.jit(steps.make_train_step(built["graphdef"], built["tx"], reference)).lower(
        state, batch
    )
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def _jax_worker(spec: dict[str, Any]):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from affect_jax import host_memory, steps
    from affect_jax.ops import conv

    if spec.get("cache_dir"):
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    lever = parse_lever(spec["lever"])
    config = _default_config()
    config.model.name = spec["model"]
    config.model.init = "random"
    config.model.hidden_sizes = ()
    config.model.dropout = 0.0
    config.data.num_classes = spec["num_classes"]
    config.data.image_size = spec["image_size"]
    config.compute_dtype = spec["dtype"]
    conv_lever = lever.get("conv", "auto")
    config.conv_impl = conv_lever if conv_lever in IMPLS else "auto"
    config.activation_dtype = lever.get("act", "auto")
    config.batch_norm_impl = lever.get("bn", "auto")
    config.pool_impl = lever.get("pool", "auto")
    config.batch_size = b = spec["batch_size"]
    s = spec["image_size"]
    model = steps.create_initial_model(config)
    if conv_lever not in IMPLS:
        conv.pin_path(model, conv_lever)
    graphdef, tx, state = steps.create_train_state(config, model)
    del model
    host_memory.release_host_memory(clear_jit_caches=True)  # as the training driver does
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(b, s, s, 3)).astype(np.float32)),
        "expression": jnp.asarray(rng.integers(0, spec["num_classes"], b).astype(np.int32)),
        "valence_arousal": jnp.asarray(rng.uniform(-1, 1, (b, 2)).astype(np.float32)),
        "mask": jnp.ones((b,), jnp.float32),
        "has_va": jnp.ones((b,), jnp.float32),
    }
    donate = (0,) if lever.get("donate", "1") == "1" else ()
    # As the training driver calls it: steps_per_execution batches per call.
    per_call = int(lever.get("steps", config.steps_per_execution))
    chunk = {name: jnp.stack([value] * per_call) for name, value in batch.items()}
    t0 = time.perf_counter()
    train_c = (
        jax.jit(
            steps.make_train_steps(steps.make_train_step(graphdef, tx, config)),
            donate_argnums=donate,
        )
        .lower(state, chunk)
        .compile()
    )
    compile_s = time.perf_counter() - t0
    # Evaluation as a loaded model runs it: weights prepared once (steps.InferenceStep, as the
    # Predictor does), per_call batches per call (make_eval_steps).
    eval_step = steps.make_eval_step(graphdef)
    prepared = jax.jit(eval_step.prepare)(
        {"params": state["params"], "batch_stats": state["batch_stats"]}
    )
    eval_c = jax.jit(steps.make_eval_steps(eval_step.on_prepared)).lower(prepared, chunk).compile()
    flops = _nominal_flops(config, batch)
    hlo = train_c.as_text()
    host_memory.release_host_memory()
    holder = {"state": state}

    def train_once() -> None:
        holder["state"], out = train_c(holder["state"], chunk)
        jax.block_until_ready((holder["state"], out))

    def eval_once() -> None:
        jax.block_until_ready(eval_c(prepared, chunk))

    info = {
        "compile_s": compile_s,
        "flops": flops,
        "steps_per_call": per_call,
        "hlo_convolutions": hlo.count(" convolution("),
        "hlo_dots": hlo.count(" dot("),
        "onednn_calls": hlo.count("affect_jax_onednn_conv"),
        "native_batch_norm_calls": hlo.count("affect_jax_batch_norm"),
    }
    return train_once, eval_once, info


def _keras_worker(spec: dict[str, Any]):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    if spec["dtype"] == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    b, s, n = spec["batch_size"], spec["image_size"], spec["num_classes"]
    app_fn = {"resnet50": keras.applications.ResNet50, "vgg16": keras.applications.VGG16}
    base = app_fn[spec["model"]](
        include_top=False, weights=None, input_shape=(s, s, 3), pooling="avg"
    )
    f = base.output
    model = keras.Model(
        base.input,
        [keras.layers.Dense(n, dtype="float32")(f), keras.layers.Dense(2, dtype="float32")(f)],
    )
    opt = keras.optimizers.Adam(1e-4)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(b, s, s, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, n, b).astype(np.int32))
    va = tf.constant(rng.uniform(-1, 1, (b, 2)).astype(np.float32))

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            logits, pred = model(x, training=True)
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            loss = ce + tf.reduce_mean(tf.square(pred - va))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def eval_step():
        logits, pred = model(x, training=False)
        return tf.nn.softmax(logits), pred

    t0 = time.perf_counter()
    train_step().numpy()
    compile_s = time.perf_counter() - t0
    eval_step()

    def eval_once() -> None:
        [t.numpy() for t in eval_step()]

    return (lambda: train_step().numpy()), eval_once, {"compile_s": compile_s}


def _torch_worker(spec: dict[str, Any]):
    import torch
    import torch.nn.functional as F
    from torch_models import MultiTask  # scripts/ is sys.path[0]: workers run this file

    torch.manual_seed(0)
    b, s, n = spec["batch_size"], spec["image_size"], spec["num_classes"]
    bf16 = spec["dtype"] == "bfloat16"
    model = MultiTask(spec["model"], n).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(b, 3, s, s).to(memory_format=torch.channels_last)
    y = torch.randint(0, n, (b,))
    va = torch.rand(b, 2) * 2 - 1

    def train_once() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, pred = model(x)
        loss = F.cross_entropy(logits.float(), y) + F.mse_loss(pred.float(), va)
        loss.backward()
        opt.step()
        loss.item()

    def eval_once() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, pred = model(x)
            torch.softmax(logits.float(), -1).sum().item()

    t0 = time.perf_counter()
    train_once()
    return (
        train_once,
        eval_once,
        {"compile_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()},
    )


def _input_worker(spec: dict[str, Any]):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from affect_jax.data import pipeline

    config = _default_config()
    config.data.source = "synthetic"
    config.model.init = "random"
    config.data.image_size = spec["image_size"]
    config.data.synthetic_size = max(256, 8 * spec["batch_size"])
    b = spec["batch_size"]
    t0 = time.perf_counter()
    splits = pipeline.make_splits(config)
    setup_s = time.perf_counter() - t0
    epoch = [0]

    def train_once() -> None:
        # A fresh 4-batch pass each time: nothing was prefetched while other workers ran.
        ds = pipeline.train_batches(splits.train, config, epoch[0], b).take(4)
        epoch[0] += 1
        for _ in ds.as_numpy_iterator():
            pass

    return train_once, None, {"compile_s": 0.0, "data_setup_s": setup_s, "batches_per_call": 4}


def run_worker(spec: dict[str, Any]) -> None:
    builder = {
        "jax": _jax_worker,
        "keras": _keras_worker,
        "torch": _torch_worker,
        "input": _input_worker,
    }[spec["kind"]]
    train_once, eval_once, info = builder(spec)
    # --warmup counts steps; a call may run several.
    per_call = info.get("steps_per_call", 1)
    for _ in range(max(1, -(-spec["warmup"] // per_call))):
        train_once()
        if eval_once is not None:
            eval_once()
    _send({"ready": True, **info, "rss_mb": _peak_rss_mb()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        fn = train_once if cmd == "train" else eval_once
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        _send({"t": seconds / per_call, "rss_mb": _peak_rss_mb()})


# ---------------------------------------------------------------------------------------------
# Parent: spawn, alternate, summarise
# ---------------------------------------------------------------------------------------------


class Worker:
    """A contender's process; `call(cmd)` runs one command and returns its JSON reply."""

    def __init__(self, spec: dict[str, Any], env: dict[str, str]):
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, __file__, f"--worker={json.dumps(spec)}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        raise RuntimeError(f"worker {self.spec['label']} died (exit {self.proc.wait()})")

    def call(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _stats(values: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": qs[0],
        "q3": qs[2],
    }


def _fmt(st: dict[str, float], digits: int = 2) -> str:
    return f"{st['median']:.{digits}f} [{st['min']:.{digits}f}-{st['max']:.{digits}f}]"


def _run_group(specs: list[dict[str, Any]], steps: int, do_eval: bool) -> list[dict[str, Any]]:
    workers = []
    try:
        for spec in specs:  # Started one after another: compile times are not contended.
            env = dict(os.environ)
            lever = parse_lever(spec.get("lever", ""))
            env.update(MALLOC_ENV.get(lever.get("malloc", ""), {}))
            xla_flags = lever.get("xla_flags", "")
            if xla_flags:
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
            print(f"  starting {spec['label']} ...", flush=True)
            workers.append(Worker(spec, env))
            print(f"    ready: compile {workers[-1].info.get('compile_s', 0):.1f}s", flush=True)
        times: dict[str, list[list[float]]] = {w.spec["label"]: [[], []] for w in workers}
        for r in range(steps):
            order = workers[r % len(workers) :] + workers[: r % len(workers)]
            for w in order:
                times[w.spec["label"]][0].append(w.call("train")["t"])
                if do_eval and w.spec["kind"] != "input":
                    times[w.spec["label"]][1].append(w.call("eval")["t"])
            print(
                f"  round {r + 1}/{steps}: "
                + ", ".join(f"{k} {v[0][-1]:.2f}s" for k, v in times.items()),
                flush=True,
            )
        results = []
        for w in workers:
            train_t, eval_t = times[w.spec["label"]]
            b = w.spec["batch_size"] * (4 if w.spec["kind"] == "input" else 1)
            res = {
                **w.spec,
                **{k: v for k, v in w.info.items() if k != "ready"},
                "train_times_s": train_t,
                "train_img_s": _stats([b / t for t in train_t]),
            }
            if eval_t:
                res["eval_times_s"] = eval_t
                res["eval_img_s"] = _stats([b / t for t in eval_t])
            res["peak_rss_mb"] = w.call("train")["rss_mb"]
            results.append(res)
        return results
    finally:
        for w in workers:
            w.close()


def _ratios(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, float]:
    """Per-round (alternating) ratios of a's images/s over b's: b_time / a_time."""
    ta, tb = a[f"{key}_times_s"], b[f"{key}_times_s"]
    return _stats([y / x for x, y in zip(ta, tb, strict=False)])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Too many arguments: {argv[1:]}")
    if FLAGS.worker:
        run_worker(json.loads(FLAGS.worker))
        return
    for lever in FLAGS.lever:
        parse_lever(lever)
    base = {
        "batch_size": FLAGS.batch_size,
        "image_size": FLAGS.image_size,
        "warmup": FLAGS.warmup,
        "num_classes": FLAGS.num_classes,
        "cache_dir": os.path.expanduser(FLAGS.cache_dir),
    }
    peers = []
    if FLAGS.compare:
        for kind, module in (("keras", "keras"), ("torch", "torch")):
            if _available(module):
                peers.append(kind)
            else:
                print(f"--compare: {module} not installed, skipped")
    all_results: list[dict[str, Any]] = []
    ratio_rows: list[dict[str, Any]] = []
    for model in FLAGS.model:
        for dtype in FLAGS.dtype:
            specs = [
                dict(
                    base,
                    kind="jax",
                    model=model,
                    dtype=dtype,
                    lever=lever,
                    label=f"affect-jax[{lever}]",
                )
                for lever in FLAGS.lever
            ]
            specs += [
                dict(base, kind=k, model=model, dtype=dtype, lever="", label=k) for k in peers
            ]
            print(
                f"== {model} {dtype} batch {FLAGS.batch_size} at {FLAGS.image_size} px: "
                f"{len(specs)} contenders, {FLAGS.steps} alternating rounds",
                flush=True,
            )
            results = _run_group(specs, FLAGS.steps, FLAGS.eval)
            jax_flops = results[0].get("flops", 0.0)
            for res in results:
                t = statistics.median(res["train_times_s"])
                res["gflops_per_s"] = jax_flops / t / 1e9 if jax_flops else None
            all_results += results
            first = results[0]
            for res in results[1:]:
                for key in ("train", "eval"):
                    if f"{key}_times_s" in res and f"{key}_times_s" in first:
                        ratio_rows.append(
                            {
                                "model": model,
                                "dtype": dtype,
                                "step": key,
                                "a": first["label"],
                                "b": res["label"],
                                **_ratios(first, res, key),
                            }
                        )
            for res in results[1 : len(FLAGS.lever)]:  # other levers vs every peer, too
                for peer in results[len(FLAGS.lever) :]:
                    ratio_rows.append(
                        {
                            "model": model,
                            "dtype": dtype,
                            "step": "train",
                            "a": res["label"],
                            "b": peer["label"],
                            **_ratios(res, peer, "train"),
                        }
                    )
    if FLAGS.input:
        print("== input pipeline (synthetic faces, train_batches)", flush=True)
        spec = dict(base, kind="input", model="-", dtype="-", lever="", label="input")
        all_results += _run_group([spec], FLAGS.steps, False)

    print("\nimages/s: median [min-max] over rounds; GFLOP/s from XLA's cost analysis")
    print(
        f"{'model':9} {'dtype':9} {'contender':34} {'train img/s':>20} {'eval img/s':>20} "
        f"{'GFLOP/s':>8} {'compile s':>9} {'peak RSS MB':>11}"
    )
    for r in all_results:
        ev = _fmt(r["eval_img_s"]) if "eval_img_s" in r else "-"
        gf = f"{r['gflops_per_s']:.0f}" if r.get("gflops_per_s") else "-"
        print(
            f"{r['model']:9} {r['dtype']:9} {r['label']:34} {_fmt(r['train_img_s']):>20} "
            f"{ev:>20} {gf:>8} {r.get('compile_s', 0):9.1f} {r['peak_rss_mb']:11.0f}"
        )
    if ratio_rows:
        print("\nratios (a / b images/s, per alternating round): median [min-max]")
        for q in ratio_rows:
            print(
                f"{q['model']:9} {q['dtype']:9} {q['step']:5} {q['a']:>30} / {q['b']:<30} "
                f"{_fmt(q, 2)}"
            )
    if FLAGS.output:
        out = {
            "flags": {
                k: FLAGS[k].value
                for k in (
                    "model",
                    "dtype",
                    "batch_size",
                    "image_size",
                    "steps",
                    "warmup",
                    "lever",
                    "compare",
                )
            },
            "host": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
            "results": all_results,
            "ratios": ratio_rows,
        }
        Path(FLAGS.output).write_text(json.dumps(out, indent=1))
        print(f"\nwrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
