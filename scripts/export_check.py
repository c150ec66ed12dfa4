r"""Exports full-size ResNet50 and VGG16 to every format and checks them against JAX.

  python scripts/export_check.py --output_dir=/tmp/export_check [--repeats=3]

For each backbone (random weights, default width, 224 px): a run directory is written (no
training), exported to ONNX, SavedModel and LiteRT, and each file is run on the same uint8 crops
as the JAX ``Predictor``. Prints export time, file size and max abs difference per format, then
images/s of onnxruntime and of the Predictor (the JAX evaluation step) at batch 1 and 32,
medians of ``--repeats`` timings. The figures go into docs/export.md.
"""

from __future__ import annotations

import os
import runpy
import statistics
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FORMATS = {"onnx": "model.onnx", "saved_model": "saved_model", "tflite": "model.tflite"}


def write_random_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    steps_metrics: tuple[tuple[int, float], ...] = ((1, 0.5),),
    class_names: list[str] | None = None,
) -> str:
    """A run directory without training: ``config.json`` and one checkpoint per step.

    The weights are the random initialisation (``config.model.init='random'``), the BatchNorm
    statistics random too (a trained run's are not zero and one). ``steps_metrics``: (step,
    validation mean CCC) of each checkpoint. ``class_names`` go into ``final_metrics.json``.
    """
    import json

    from affect_jax import checkpointing, run_dir, steps

    os.makedirs(workdir, exist_ok=True)
    run_dir.save_config(config, workdir)
    if class_names is not None:
        with open(os.path.join(workdir, run_dir.FINAL_METRICS), "w") as f:
            json.dump({"class_names": class_names}, f)
    _, _, state = steps.create_train_state(config, steps.create_initial_model(config))
    rng = np.random.default_rng(config.seed)

    def statistic(path, x):
        is_var = "var" in jax.tree_util.keystr(path)
        values = rng.uniform(0.5, 2.0, x.shape) if is_var else rng.normal(0.0, 0.2, x.shape)
        return jax.numpy.asarray(values, x.dtype)

    state["batch_stats"] = jax.tree_util.tree_map_with_path(statistic, state["batch_stats"])
    manager = run_dir.checkpoint_manager(workdir, config)
    for step, mean_ccc in steps_metrics:
        checkpointing.save(manager, step, state, {"mean_ccc": mean_ccc, "accuracy": 0.5})
        manager.wait_until_finished()
    manager.close()
    return workdir


def run_onnx(path: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return tuple(session.run(["probs", "valence_arousal"], {"images": images}))


def run_saved_model(path: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    return out["probs"].numpy(), out["valence_arousal"].numpy()


def run_tflite(path: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    out = Interpreter(model_path=path).get_signature_runner("serving_default")(images=images)
    return out["probs"], out["valence_arousal"]


RUNNERS = {"onnx": run_onnx, "saved_model": run_saved_model, "tflite": run_tflite}


def file_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def paired_rates(first, second, images: np.ndarray, repeats: int) -> tuple[float, float]:
    """Images/s of two predict functions: medians of ``repeats`` alternating timed calls
    (after one warm-up call each), so both see the same machine load."""
    first(images)
    second(images)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for predict, spent in zip((first, second), times, strict=True):
            start = time.perf_counter()
            predict(images)
            spent.append(time.perf_counter() - start)
    return tuple(len(images) / statistics.median(t) for t in times)


def check_backbone(name: str, root: str, repeats: int) -> list[str]:
    """Markdown table rows for one backbone."""
    import onnxruntime as ort

    from affect_jax import export, predict

    config = runpy.run_path(os.path.join(CONFIGS, f"{name}.py"))["get_config"]()
    config.model.init = "random"
    config.data.source = "synthetic"
    config.compilation_cache_dir = ""
    images = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), np.uint8)
    workdir = write_random_run(config, os.path.join(root, name, "run"))
    predictor = predict.Predictor(workdir, batch_size=32)
    expected = predictor.predict(images)
    spread = (
        np.ptp(expected["probs"], axis=0).max(),
        np.ptp(expected["valence_arousal"], axis=0).max(),
    )
    # Random weights: the outputs hardly vary over the crops; the differences are to be read
    # against this spread.
    print(
        f"{name}: outputs over the crops span up to {spread[0]:.1e} (probs) and "
        f"{spread[1]:.1e} (valence/arousal)"
    )
    rows = []
    for fmt, filename in FORMATS.items():
        path = os.path.join(root, name, filename)
        start = time.perf_counter()
        export.export_run(workdir, path, overwrite=True)
        seconds = time.perf_counter() - start
        probs, va = RUNNERS[fmt](path, images)
        diff = max(
            np.abs(probs - expected["probs"]).max(), np.abs(va - expected["valence_arousal"]).max()
        )
        size = file_size(path) / 2**20
        rows.append(f"| {name} | {fmt} | {seconds:.1f} s | {size:.1f} MiB | {diff:.1e} |")
        print(rows[-1], flush=True)
    session = ort.InferenceSession(
        os.path.join(root, name, "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 32):
        jax_predictor = predict.Predictor(workdir, batch_size=batch)
        ort_rate, jax_rate = paired_rates(
            lambda a: session.run(None, {"images": a}),
            jax_predictor.predict,
            images[:batch],
            repeats,
        )
        rows.append(
            f"| {name} | {batch} | {ort_rate:.1f} | {jax_rate:.1f} | {ort_rate / jax_rate:.2f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def main(argv):
    del argv
    print(
        f"jax {jax.__version__}, devices {jax.devices()}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| backbone | format | export time | size | max abs diff vs JAX |\n"
        "| backbone | batch | onnxruntime images/s | JAX Predictor images/s | ratio |"
    )
    for name in FLAGS.backbones:
        check_backbone(name, FLAGS.output_dir, FLAGS.repeats)


if __name__ == "__main__":
    flags.DEFINE_string("output_dir", "/tmp/affect_jax_export_check", "Runs and exported files.")
    flags.DEFINE_list("backbones", ["resnet50", "vgg16"], "Backbones to check.")
    flags.DEFINE_integer("repeats", 5, "Timed calls per throughput figure (median).")
    app.run(main)
