r"""Training/eval step and input-pipeline speed of affect-jax, optionally against Keras and PyTorch.

    python scripts/benchmark.py --model=resnet50 --dtype=float32,bfloat16 --batch_size=32 \
      --batch_sizes=1,32 --image_size=224 --steps=5 [--warmup=N] \
      [--lever=conv=xla --lever=conv=native] [--compare --peers=keras,torch,torch_compile] \
      [--notrain] [--eval_seconds=1] [--startup --startup_runs=3] [--output=benchmark.json]

Model: the project's multi-task model (backbone, global average pool, Dense(8) softmax CE and
Dense(2) MSE, Adam 1e-4; no hidden layer, no dropout) on random 224x224 images, whole jitted
train steps (forward, backward, Adam, BatchNorm statistics), called as the training driver calls
them (``steps_per_execution`` steps per call; every time is per batch). The inference step is
timed at each of ``--batch_sizes``: at the training batch size as the driver evaluates
(``steps_per_execution`` batches per call), at other sizes and under ``--notrain`` one batch per
call, as ``predict`` and ``serve`` call it. ``--compare`` builds the same model as
``--peers``: ``keras`` (Keras 3 / TensorFlow, `keras.applications`, ``mixed_bfloat16`` policy
for bf16), ``torch`` (PyTorch eager, scripts/torch_models.py, channels_last, ``torch.autocast``
bf16) and ``torch_compile`` (the same under ``torch.compile``, default mode; inference in eval
mode under ``torch.inference_mode`` with Inductor's ``freezing``), each called once per batch
(as ``model.fit`` and a PyTorch loop do). A peer that is not installed, or fails to build or
compile, is left out with one line saying why.

``--notrain`` times inference alone: the workers never compile or run a train step, as a
deployed model runs (in a worker that also trains, every inference call follows a train call
and meets the memory state that call leaves).

Warm-up: ``--warmup`` untimed steps per contender before the timed rounds (each one a train
step and one inference call per batch size); the default (-1) gives each contender
``WARMUP_STEPS``. The warm-up's seconds are reported, and each warm-up call's time is in the
JSON (``warmup_times_s``).

``--startup`` times cold starts (no compilation cache), ``--startup_runs`` each: from launch to
the end of the first train call of ``python -m affect_jax.main --config=configs/resnet50.py``
(random init, synthetic faces), split by its log lines into imports, data, model and state,
compile and first call; the same for that command resuming a run dir made once (one epoch of
one 8-step call) for a second epoch; and the wall-clock of ``python -m affect_jax.predict`` on
one image with that run dir.

Every contender (each ``--lever`` of affect-jax, Keras, PyTorch) runs in its own worker process,
so peak RSS and XLA flags are per contender; the workers stay alive and the parent runs them
ROUND BY ROUND (one step each, the order rotated every round), so that load from other processes
on a shared machine hits all contenders alike. In a round a train step is one call; an inference
step is the median of calls back to back for ``--eval_seconds`` (at least 3 unless one call
takes that long; 0: one call), the latency of a warm model: a lone call after the other
contenders' runs meets cold caches and sleeping threads, at batch 1 several times a warm call.
Warm-up steps are excluded. Reported: median images/s with min/max and IQR over ``--steps``
rounds, compile time (JAX: lower + compile; peers: first call), peak RSS, achieved GFLOP/s (XLA's
cost analysis of the affect-jax step, i.e. the same nominal FLOPs for every contender), and
per-round ratios affect-jax / peer with their spread.

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
import re
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
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
flags.DEFINE_integer("steps", 5, "Timed rounds (>= 5 for a median with spread; 0: none).")
flags.DEFINE_integer(
    "warmup",
    -1,
    "Untimed steps per contender before the timed rounds (at least one call); -1: each "
    "contender's default (WARMUP_STEPS).",
)
flags.DEFINE_integer("num_classes", 8, "Classes of the expression head.")
flags.DEFINE_multi_string("lever", ["default"], "affect-jax variants (see module doc).")
flags.DEFINE_bool("compare", False, "Also run the --peers (those installed).")
flags.DEFINE_list("peers", ["keras", "torch", "torch_compile"], "Peers of --compare.")
flags.DEFINE_bool("eval", True, "Also time the eval (inference) step.")
flags.DEFINE_bool(
    "train",
    True,
    "Time the train step. --notrain times inference alone, in worker processes that never "
    "train, as a deployed model runs.",
)
flags.DEFINE_list(
    "batch_sizes", [], "Batch sizes of the timed eval step (default: --batch_size), e.g. 1,32."
)
flags.DEFINE_float(
    "eval_seconds",
    1.0,
    "Each round times an inference step by calls back to back for at least this long (at "
    "least 3, unless one call takes this long) and takes their median, a warm call's latency; "
    "0: one call per round.",
)
flags.DEFINE_bool("input", False, "Also time the tf.data input pipeline (synthetic faces).")
flags.DEFINE_bool(
    "startup",
    False,
    "Also time cold starts (no compile cache): launch to the first train step of the ResNet50 "
    "config, and predict on one image with a ResNet50 run.",
)
flags.DEFINE_integer("startup_runs", 3, "Cold starts of each command for --startup.")
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


# Python modules each peer needs.
PEER_MODULES = {"keras": "keras", "torch": "torch", "torch_compile": "torch"}
# Untimed steps before the timed rounds (--warmup=-1): as many as the peers need for their last
# rounds to be as fast as their best (docs/performance.md); affect-jax compiles ahead of time.
WARMUP_STEPS = {"jax": 1, "keras": 3, "torch": 3, "torch_compile": 3, "input": 1}


def parse_peers(peers: list[str]) -> list[str]:
    """``--peers`` (deduplicated, in order); app.UsageError for an unknown one."""
    out = []
    for peer in peers:
        if peer not in PEER_MODULES:
            raise app.UsageError(f"bad --peers item {peer!r} (one of {', '.join(PEER_MODULES)})")
        if peer not in out:
            out.append(peer)
    return out


def parse_batch_sizes(values: list[str], batch_size: int) -> list[int]:
    """``--batch_sizes`` as integers (default: the training batch size)."""
    out = []
    for value in values or [str(batch_size)]:
        if not (value.strip().isdigit() and int(value) >= 1):
            raise app.UsageError(f"bad --batch_sizes item {value!r} (an integer >= 1)")
        if int(value) not in out:
            out.append(int(value))
    return out


def warmup_steps(kind: str, warmup: int) -> int:
    """``--warmup`` if given (>= 0), else the contender's default."""
    return WARMUP_STEPS[kind] if warmup < 0 else warmup


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
    rows = max([b, *spec["eval_batch_sizes"]])
    data = {
        "image": rng.normal(size=(rows, s, s, 3)).astype(np.float32),
        "expression": rng.integers(0, spec["num_classes"], rows).astype(np.int32),
        "valence_arousal": rng.uniform(-1, 1, (rows, 2)).astype(np.float32),
        "mask": np.ones((rows,), np.float32),
        "has_va": np.ones((rows,), np.float32),
    }
    batch = {name: jnp.asarray(value[:b]) for name, value in data.items()}
    donate = (0,) if lever.get("donate", "1") == "1" else ()
    # As the training driver calls it: steps_per_execution batches per call.
    per_call = int(lever.get("steps", config.steps_per_execution))
    chunk = {name: jnp.stack([value] * per_call) for name, value in batch.items()}
    training = spec.get("train", True)
    t0 = time.perf_counter()
    train_c = (
        jax.jit(
            steps.make_train_steps(steps.make_train_step(graphdef, tx, config)),
            donate_argnums=donate,
        )
        .lower(state, chunk)
        .compile()
        if training
        else None
    )
    compile_s = time.perf_counter() - t0
    # Evaluation as a loaded model runs it: weights prepared once (steps.InferenceStep, as the
    # Predictor does).
    eval_step = steps.make_eval_step(graphdef)
    prepared = jax.jit(eval_step.prepare)(
        {"params": state["params"], "batch_stats": state["batch_stats"]}
    )
    # Inference alone holds only the prepared weights, as a loaded model does.
    holder = {"state": state if training else None}
    del state
    evals = {}
    t0 = time.perf_counter()
    for eval_b in spec["eval_batch_sizes"]:
        # At the training batch size of a worker that trains as the driver evaluates (per_call
        # batches per call); otherwise one batch per call, as predict and serve call the step.
        n = per_call if eval_b == b and training else 1
        eval_chunk = {k: jnp.stack([jnp.asarray(v[:eval_b])] * n) for k, v in data.items()}
        eval_c = (
            jax.jit(steps.make_eval_steps(eval_step.on_prepared))
            .lower(prepared, eval_chunk)
            .compile()
        )

        def eval_once(eval_c=eval_c, eval_chunk=eval_chunk) -> None:
            jax.block_until_ready(eval_c(prepared, eval_chunk))

        evals[eval_b] = (eval_once, n)
    if not training:  # the compile time reported is then the inference steps'
        compile_s = time.perf_counter() - t0
    host_memory.release_host_memory()

    def train_once() -> None:
        holder["state"], out = train_c(holder["state"], chunk)
        jax.block_until_ready((holder["state"], out))

    info = {
        "compile_s": compile_s,
        "steps_per_call": per_call,
        "eval_batches_per_call": {str(k): n for k, (_, n) in evals.items()},
    }
    if training:  # what the train step holds and costs (its nominal FLOPs: a second lowering)
        hlo = train_c.as_text()
        info.update(
            flops=_nominal_flops(config, batch),
            hlo_convolutions=hlo.count(" convolution("),
            hlo_dots=hlo.count(" dot("),
            onednn_calls=hlo.count("affect_jax_onednn_conv"),
            native_batch_norm_calls=hlo.count("affect_jax_batch_norm"),
        )
    return train_once, {k: fn for k, (fn, _) in evals.items()}, info


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
    def eval_step(images):
        logits, pred = model(images, training=False)
        return tf.nn.softmax(logits), pred

    evals = {}
    for eval_b in spec["eval_batch_sizes"]:
        images = tf.constant(rng.normal(size=(eval_b, s, s, 3)).astype(np.float32))

        def eval_once(images=images) -> None:
            [t.numpy() for t in eval_step(images)]

        evals[eval_b] = eval_once
    compile_s = _first_calls_seconds(spec, lambda: train_step().numpy(), evals)
    return (lambda: train_step().numpy()), evals, {"compile_s": compile_s}


def _torch_worker(spec: dict[str, Any]):
    """PyTorch eager (kind 'torch') or torch.compile (kind 'torch_compile', default mode).

    torch.compile: the model compiled for training (forward and, through AOTAutograd, backward;
    Adam stays eager) and for inference (eval mode, ``torch.inference_mode``, Inductor's
    ``freezing``: the weights folded in as constants and prepacked for oneDNN, as a deployed
    model is). Shapes are static (``dynamic=False``): one program per batch size.
    """
    import torch
    import torch.nn.functional as F

    if str(ROOT / "scripts") not in sys.path:  # workers run this file; tests import it
        sys.path.insert(0, str(ROOT / "scripts"))
    from torch_models import MultiTask

    torch.manual_seed(0)
    b, s, n = spec["batch_size"], spec["image_size"], spec["num_classes"]
    bf16 = spec["dtype"] == "bfloat16"
    model = MultiTask(spec["model"], n).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(b, 3, s, s).to(memory_format=torch.channels_last)
    y = torch.randint(0, n, (b,))
    va = torch.rand(b, 2) * 2 - 1
    train_model = infer_model = model
    if spec["kind"] == "torch_compile":
        import torch._inductor.config

        torch._inductor.config.freezing = True  # applies to inference graphs only
        train_model = torch.compile(model, dynamic=False)
        infer_model = torch.compile(model, dynamic=False)

    def train_once() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, pred = train_model(x)
        loss = F.cross_entropy(logits.float(), y) + F.mse_loss(pred.float(), va)
        loss.backward()
        opt.step()
        loss.item()

    evals = {}
    for eval_b in spec["eval_batch_sizes"]:
        images = torch.randn(eval_b, 3, s, s).to(memory_format=torch.channels_last)

        def eval_once(images=images) -> None:
            model.eval()
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                logits, pred = infer_model(images)
                torch.softmax(logits.float(), -1).sum().item()

        evals[eval_b] = eval_once

    compile_s = _first_calls_seconds(spec, train_once, evals)
    return train_once, evals, {"compile_s": compile_s, "torch_threads": torch.get_num_threads()}


def _first_calls_seconds(spec: dict[str, Any], train_once, evals: dict[int, Any]) -> float:
    """A peer's compile time: its first train call, or with --notrain its first inference
    calls (the train step is then never traced)."""
    t0 = time.perf_counter()
    if spec.get("train", True):
        train_once()
    else:
        for eval_once in evals.values():
            eval_once()
    return time.perf_counter() - t0


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

    return train_once, {}, {"compile_s": 0.0, "data_setup_s": setup_s, "batches_per_call": 4}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_worker(spec: dict[str, Any]) -> None:
    builder = {
        "jax": _jax_worker,
        "keras": _keras_worker,
        "torch": _torch_worker,
        "torch_compile": _torch_worker,
        "input": _input_worker,
    }[spec["kind"]]
    try:
        train_once, evals, info = builder(spec)
        # Times are per batch: a call may run several (train steps, evaluation batches).
        training = spec.get("train", True)
        per_call = {"train": info.get("steps_per_call", 1)} if training else {}
        for eval_b in evals:
            per_call[f"eval@{eval_b}"] = info.get("eval_batches_per_call", {}).get(str(eval_b), 1)
        fns = {"train": train_once} if training else {}
        fns.update({f"eval@{k}": fn for k, fn in evals.items()})
        # The warm-up counts steps (at least one call): every call of each kind, times kept.
        warmup = {key: [] for key in fns}
        t0 = time.perf_counter()
        for _ in range(max(1, -(-spec["warmup"] // per_call.get("train", 1)))):
            for key, fn in fns.items():
                warmup[key].append(_seconds(fn) / per_call[key])
        info["warmup_s"] = time.perf_counter() - t0
        info["warmup_times_s"] = warmup
    except Exception as e:  # a peer that does not run here (e.g. torch.compile without a compiler)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        _send({"error": f"{type(e).__name__}: {first}"})
        return
    _send({"ready": True, **info, "rss_mb": _peak_rss_mb()})
    for line in sys.stdin:
        key = line.strip()
        if key == "quit":
            break
        seconds = timed_calls(fns[key], spec.get("eval_seconds", 0) if key != "train" else 0)
        _send({"t": seconds / per_call[key], "rss_mb": _peak_rss_mb()})


def timed_calls(fn, min_seconds: float) -> float:
    """Seconds of one call of `fn`: one call's time, or with `min_seconds` > 0 the median of
    calls back to back (at least 3) until they took that long; a first call that alone takes
    that long is the time.

    One batch-1 inference call after the other contenders' calls is dominated by cold caches
    and sleeping threads, several times a warm call's time, for every contender alike; the
    median of a burst is the latency a service answering requests sees. A call of seconds
    hardly meets that, and three of them would multiply the run's time.
    """
    times = [_seconds(fn)]
    if times[0] >= min_seconds:
        return times[0]
    while len(times) < 3 or sum(times) < min_seconds:
        times.append(_seconds(fn))
    return statistics.median(times)


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


def step_keys(eval_batch_sizes: list[int], train: bool = True) -> list[str]:
    """The timed steps: 'train' (unless not ``train``), then 'eval@B' per inference batch
    size."""
    return ["train"] * train + [f"eval@{b}" for b in eval_batch_sizes]


def _step_order(key: str) -> tuple[int, int]:
    return (0, 0) if key == "train" else (1, int(key[len("eval@") :]))


def images_per_batch(spec: dict[str, Any], key: str) -> int:
    if key.startswith("eval@"):
        return int(key[len("eval@") :])
    return spec["batch_size"] * (4 if spec["kind"] == "input" else 1)


def _start_workers(specs: list[dict[str, Any]]) -> list[Worker]:
    """Started one after another, so compile times are not contended. A peer that fails to
    start (e.g. torch.compile without a working compiler) is reported in one line and left
    out; affect-jax failing is an error."""
    workers = []
    for spec in specs:
        env = dict(os.environ)
        lever = parse_lever(spec.get("lever", ""))
        env.update(MALLOC_ENV.get(lever.get("malloc", ""), {}))
        xla_flags = lever.get("xla_flags", "")
        if xla_flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
        print(f"  starting {spec['label']} ...", flush=True)
        try:
            worker = Worker(spec, env)
            error = worker.info.get("error")
        except RuntimeError as e:
            worker, error = None, str(e)
        if error:
            if spec["kind"] == "jax":
                raise RuntimeError(f"{spec['label']} failed: {error}")
            print(f"  {spec['label']} does not run here, left out: {error}", flush=True)
            if worker is not None:
                worker.close()
            continue
        workers.append(worker)
        info = worker.info
        print(
            f"    ready: compile {info.get('compile_s', 0):.1f}s, warm-up "
            f"{info.get('warmup_s', 0):.1f}s",
            flush=True,
        )
    return workers


def _run_group(
    specs: list[dict[str, Any]], steps: int, eval_batch_sizes: list[int]
) -> list[dict[str, Any]]:
    workers = _start_workers(specs)
    try:
        keys = {
            w.spec["label"]: step_keys(
                [] if w.spec["kind"] == "input" else eval_batch_sizes, w.spec.get("train", True)
            )
            for w in workers
        }
        times: dict[str, dict[str, list[float]]] = {
            label: {key: [] for key in ks} for label, ks in keys.items()
        }
        for r in range(steps):
            order = workers[r % len(workers) :] + workers[: r % len(workers)]
            for w in order:
                for key in keys[w.spec["label"]]:
                    times[w.spec["label"]][key].append(w.call(key)["t"])
            print(
                f"  round {r + 1}/{steps}: "
                + ", ".join(f"{k} {next(iter(v.values()))[-1]:.2f}s" for k, v in times.items()),
                flush=True,
            )
        results = []
        for w in workers:
            res = {**w.spec, **{k: v for k, v in w.info.items() if k != "ready"}, "steps": {}}
            for key, ts in times[w.spec["label"]].items():
                n = images_per_batch(w.spec, key)
                res["steps"][key] = {"times_s": ts, "img_s": _stats([n / t for t in ts])}
            res["peak_rss_mb"] = w.call(keys[w.spec["label"]][0])["rss_mb"]
            results.append(res)
        return results
    finally:
        for w in workers:
            w.close()


def _ratios(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, float]:
    """Per-round (alternating) ratios of a's images/s over b's: b_time / a_time."""
    ta, tb = a["steps"][key]["times_s"], b["steps"][key]["times_s"]
    return _stats([y / x for x, y in zip(ta, tb, strict=False)])


def best_peer(results: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The peer (not affect-jax, not the input pipeline) with the highest median images/s."""
    peers = [r for r in results if r["kind"] not in ("jax", "input") and key in r["steps"]]
    return max(peers, key=lambda r: r["steps"][key]["img_s"]["median"], default=None)


def summary_table(results: list[dict[str, Any]]) -> str:
    """Markdown: per timed step, the first affect-jax contender against the best peer (median
    [min-max] of the per-round ratios), then every contender's peak RSS."""
    ours = results[0]
    lines = [
        f"| {ours['model']} {ours['dtype']} | ours img/s | best peer | peer img/s "
        "| ours / best peer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, step in ours["steps"].items():
        peer = best_peer(results, key)
        name = step_name(key, ours["batch_size"])
        if peer is None:
            lines.append(f"| {name} | {_fmt(step['img_s'])} | - | - | - |")
            continue
        lines.append(
            f"| {name} | {_fmt(step['img_s'])} | {peer['label']} "
            f"| {_fmt(peer['steps'][key]['img_s'])} | {_fmt(_ratios(ours, peer, key))} |"
        )
    rss = ", ".join(f"{r['label']} {r['peak_rss_mb']:.0f}" for r in results)
    return "\n".join(lines) + f"\n\nPeak RSS MB: {rss}\n"


def step_name(key: str, batch_size: int) -> str:
    if key == "train":
        return f"train, batch {batch_size}"
    return f"eval, batch {key[len('eval@') :]}"


# ---------------------------------------------------------------------------------------------
# Start-up: launch to the first train step, and predict on one image, without a compile cache
# ---------------------------------------------------------------------------------------------

NO_CACHE = "--config.compilation_cache_dir="
STARTUP_TRAIN = [
    "-m",
    "affect_jax.main",
    "--config=configs/resnet50.py",
    "--config.model.init=random",
    "--config.data.source=synthetic",
    NO_CACHE,
]
# Logged by the training driver after the first call (compile, then its first run); the
# compile overlaps building the model when it says so.
FIRST_CALL = re.compile(
    r"Compiled the (\d+)-step train call in ([\d.]+) s (while the model was built )?"
    r".*first call took ([\d.]+) s"
)
# Logged once JAX and TensorFlow are imported and the devices are known.
DEVICES = re.compile(r"JAX process \d+/\d+, devices")


def timed_lines(cmd: list[str], stop: re.Pattern | None, timeout: float) -> dict[str, Any]:
    """Runs ``cmd`` (from the repository root, without a JAX cache), and returns its output
    lines with their seconds since launch; stops it (SIGTERM) at the first line matching
    ``stop``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(ROOT),
        env=env,
    )
    lines, stopped = [], False
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            if stop is not None and stop.search(line):
                stopped = True
                break
            if time.perf_counter() - t0 > timeout:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "lines": lines,
        "stopped": stopped,
        "exit": proc.returncode,
        "wall_s": time.perf_counter() - t0,
    }


# Logged once the data splits are ready.
DATA = re.compile(r"Data '[^']*': \d+ train")


def train_startup(lines: list[tuple[float, str]]) -> dict[str, float] | None:
    """Seconds from launch to the end of the first train call and where they went: imports
    (to the devices line), data (to the data line), build (model and state, until
    compilation or, compiled ahead, until the first call), compile (or ``compile_ahead_s``,
    overlapping the build) and the first call. None if the first call's line is missing."""
    marks = {}
    for t, line in lines:
        for name, pattern in (("imports_s", DEVICES), ("data", DATA)):
            if name not in marks and pattern.search(line):
                marks[name] = t
        m = FIRST_CALL.search(line)
        if m:
            compile_s, call_s = float(m.group(2)), float(m.group(4))
            ahead = m.group(3) is not None
            out = {
                "first_step_s": t,
                "first_call_start_s": t - call_s,
                "steps_in_first_call": int(m.group(1)),
                "compile_ahead_s" if ahead else "compile_s": compile_s,
                "first_call_s": call_s,
            }
            before = t - call_s - (0.0 if ahead else compile_s)  # the end of the build
            if "imports_s" in marks:
                out["imports_s"] = marks["imports_s"]
                if "data" in marks:
                    out["data_s"] = marks["data"] - marks["imports_s"]
                out["build_s"] = before - marks.get("data", marks["imports_s"])
            return out
    return None


# The run dir made once: one epoch of one 8-step train call on 400 synthetic faces.
STARTUP_RUN = ["--config.steps_per_epoch=8", "--config.data.synthetic_size=400"]


def _startup_run_dir(tmp: Path) -> Path:
    """A ResNet50 run dir (``STARTUP_RUN``, no compile cache), which the resume timing resumes
    for a second epoch and predict loads, and one photo with a face (scikit-image's astronaut
    on a 640x480 JPEG): detection runs all three MTCNN stages and the model scores the face."""
    from PIL import Image
    from skimage import data

    run = tmp / "resnet50"
    result = timed_lines(
        [*STARTUP_TRAIN, f"--workdir={run}", "--config.num_epochs=1", *STARTUP_RUN], None, 1800
    )
    if result["exit"] != 0:
        tail = "\n".join(line for _, line in result["lines"][-20:])
        raise RuntimeError(f"creating the ResNet50 run dir failed:\n{tail}")
    photo = Image.new("RGB", (640, 480), (90, 90, 90))
    photo.paste(Image.fromarray(data.astronaut()).resize((512, 480)), (64, 0))
    photo.save(tmp / "one.jpg", quality=90)
    return run


def startup(runs: int) -> dict[str, Any]:
    """``runs`` cold starts of each command, alternating; medians [min-max]."""
    out: dict[str, Any] = {"train": [], "resume": [], "predict": []}
    with tempfile.TemporaryDirectory(prefix="affect_jax_startup_") as tmp_name:
        tmp = Path(tmp_name)
        print("== start-up: creating a ResNet50 run dir for predict ...", flush=True)
        run = _startup_run_dir(tmp)
        for i in range(runs):
            result = timed_lines(
                [*STARTUP_TRAIN, f"--workdir={tmp / f'train{i}'}"], FIRST_CALL, 900
            )
            parsed = train_startup(result["lines"])
            if parsed is None:
                tail = "\n".join(line for _, line in result["lines"][-20:])
                raise RuntimeError(f"no first train call in the training output:\n{tail}")
            out["train"].append(parsed)
            resumed = tmp / f"resume{i}"  # a fresh copy: the stop at the first call saves
            shutil.copytree(run, resumed)
            result = timed_lines(
                [*STARTUP_TRAIN, f"--workdir={resumed}", "--config.num_epochs=2", *STARTUP_RUN],
                FIRST_CALL,
                900,
            )
            resume = train_startup(result["lines"])
            if resume is None:
                tail = "\n".join(line for _, line in result["lines"][-20:])
                raise RuntimeError(f"no first train call in the resumed run's output:\n{tail}")
            out["resume"].append(resume)
            result = timed_lines(
                ["-m", "affect_jax.predict", f"--workdir={run}", str(tmp / "one.jpg")], None, 900
            )
            if result["exit"] != 0:
                tail = "\n".join(line for _, line in result["lines"][-20:])
                raise RuntimeError(f"predict failed (exit {result['exit']}):\n{tail}")
            out["predict"].append({"wall_s": result["wall_s"]})
            print(
                f"  run {i + 1}/{runs}: first train call starts {parsed['first_call_start_s']:.1f}"
                f"s, resumed {resume['first_call_start_s']:.1f}s; predict {result['wall_s']:.1f}s",
                flush=True,
            )
    return out


def startup_summary(runs: dict[str, Any]) -> str:
    """Markdown: median [min-max] seconds of each part of the cold starts."""
    lines = ["| start-up, no compile cache | seconds |", "| --- | --- |"]
    names = {
        "first_call_start_s": "train: launch to the first train call",
        "first_step_s": "train: launch to the end of the first train call",
        "imports_s": "  imports (to the devices line)",
        "data_s": "  data splits",
        "build_s": "  model and state",
        "compile_s": "  compile",
        "compile_ahead_s": "  compile, in a second thread during the imports and build",
        "first_call_s": "  first call",
    }
    for key, name in names.items():
        values = [r[key] for r in runs["train"] if key in r]
        if values:
            lines.append(f"| {name} | {_fmt(_stats(values), 1)} |")
    for key, name in (
        ("first_call_start_s", "resume: launch to the first train call"),
        ("first_step_s", "resume: launch to the end of the first train call"),
    ):
        values = [r[key] for r in runs.get("resume", [])]
        if values:
            lines.append(f"| {name} | {_fmt(_stats(values), 1)} |")
    wall = [r["wall_s"] for r in runs["predict"]]
    if wall:
        lines.append(f"| predict one image, wall-clock | {_fmt(_stats(wall), 1)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Too many arguments: {argv[1:]}")
    if FLAGS.worker:
        run_worker(json.loads(FLAGS.worker))
        return
    for lever in FLAGS.lever:
        parse_lever(lever)
    peers = parse_peers(FLAGS.peers) if FLAGS.compare else []
    eval_batch_sizes = parse_batch_sizes(FLAGS.batch_sizes, FLAGS.batch_size)
    base = {
        "batch_size": FLAGS.batch_size,
        "image_size": FLAGS.image_size,
        "num_classes": FLAGS.num_classes,
        "eval_batch_sizes": eval_batch_sizes if FLAGS.eval else [],
        "cache_dir": os.path.expanduser(FLAGS.cache_dir),
        "train": FLAGS.train,
        "eval_seconds": FLAGS.eval_seconds,
    }
    if not FLAGS.train and not FLAGS.eval:
        raise app.UsageError("--notrain with --noeval: nothing to time")
    for kind in list(peers):
        if not _available(PEER_MODULES[kind]):
            print(f"--peers: {PEER_MODULES[kind]} not installed, {kind} skipped")
            peers.remove(kind)
    all_results: list[dict[str, Any]] = []
    ratio_rows: list[dict[str, Any]] = []
    tables: list[str] = []
    for model in FLAGS.model if FLAGS.steps > 0 else []:
        for dtype in FLAGS.dtype:
            specs = [
                dict(
                    base,
                    kind="jax",
                    model=model,
                    dtype=dtype,
                    lever=lever,
                    label=f"affect-jax[{lever}]",
                    warmup=warmup_steps("jax", FLAGS.warmup),
                )
                for lever in FLAGS.lever
            ]
            specs += [
                dict(
                    base,
                    kind=k,
                    model=model,
                    dtype=dtype,
                    lever="",
                    label=k,
                    warmup=warmup_steps(k, FLAGS.warmup),
                )
                for k in peers
            ]
            print(
                f"== {model} {dtype} batch {FLAGS.batch_size} at {FLAGS.image_size} px: "
                f"{len(specs)} contenders, {FLAGS.steps} alternating rounds",
                flush=True,
            )
            results = _run_group(specs, FLAGS.steps, base["eval_batch_sizes"])
            jax_flops = results[0].get("flops", 0.0)
            for res in results:
                if "train" in res["steps"] and jax_flops:
                    t = statistics.median(res["steps"]["train"]["times_s"])
                    res["gflops_per_s"] = jax_flops / t / 1e9
            all_results += results
            tables.append(summary_table(results))
            n_ours = sum(r["kind"] == "jax" for r in results)
            for i, res in enumerate(results[1:], 1):
                for key in res["steps"]:
                    # the baseline lever against everything; other levers against the peers
                    if key in results[0]["steps"] and (key == "train" or i >= n_ours):
                        ratio_rows.append(ratio_row(results[0], res, key))
            for res in results[1:n_ours] if FLAGS.train else []:
                for peer in results[n_ours:]:
                    ratio_rows.append(ratio_row(res, peer, "train"))
    if FLAGS.input:
        print("== input pipeline (synthetic faces, train_batches)", flush=True)
        # The input pipeline's one timed step is its training pass, --notrain or not.
        spec = dict(
            base, kind="input", model="-", dtype="-", lever="", label="input", warmup=1, train=True
        )
        all_results += _run_group([spec], FLAGS.steps, [])
    startup_runs = startup(FLAGS.startup_runs) if FLAGS.startup else None

    if all_results:
        print_results(all_results, ratio_rows)
    for table in tables:
        print("\n" + table)
    if startup_runs is not None:
        print("\n" + startup_summary(startup_runs))
    if FLAGS.output:
        out = {
            "flags": {
                k: FLAGS[k].value
                for k in (
                    "model",
                    "dtype",
                    "batch_size",
                    "batch_sizes",
                    "image_size",
                    "steps",
                    "warmup",
                    "lever",
                    "compare",
                    "peers",
                    "startup",
                    "startup_runs",
                    "train",
                    "eval_seconds",
                )
            },
            "host": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
            "results": all_results,
            "ratios": ratio_rows,
            "startup": startup_runs,
        }
        Path(FLAGS.output).write_text(json.dumps(out, indent=1))
        print(f"\nwrote {FLAGS.output}")


def ratio_row(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "model": a["model"],
        "dtype": a["dtype"],
        "step": key,
        "a": a["label"],
        "b": b["label"],
        **_ratios(a, b, key),
    }


def print_results(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> None:
    # Every contender's timed steps, 'train' first (step_keys' order).
    keys = sorted(dict.fromkeys(k for r in results for k in r["steps"]), key=_step_order)
    print("\nimages/s: median [min-max] over rounds; GFLOP/s from XLA's cost analysis")
    print(
        f"{'model':9} {'dtype':9} {'contender':26} "
        + " ".join(f"{key + ' img/s':>20}" for key in keys)
        + f" {'GFLOP/s':>8} {'compile s':>9} {'warm-up s':>9} {'steps':>5} {'peak RSS MB':>11}"
    )
    for r in results:
        cells = [_fmt(r["steps"][k]["img_s"]) if k in r["steps"] else "-" for k in keys]
        gf = f"{r['gflops_per_s']:.0f}" if r.get("gflops_per_s") else "-"
        print(
            f"{r['model']:9} {r['dtype']:9} {r['label']:26} "
            + " ".join(f"{c:>20}" for c in cells)
            + f" {gf:>8} {r.get('compile_s', 0):9.1f} {r.get('warmup_s', 0):9.1f} "
            f"{r['warmup']:5d} {r['peak_rss_mb']:11.0f}"
        )
    if ratio_rows:
        print("\nratios (a / b images/s, per alternating round): median [min-max]")
        for q in ratio_rows:
            print(
                f"{q['model']:9} {q['dtype']:9} {q['step']:8} {q['a']:>26} / {q['b']:<14} "
                f"{_fmt(q, 2)}"
            )


if __name__ == "__main__":
    app.run(main)
