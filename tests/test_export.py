"""affect_jax.export: tiny VGG16 and ResNet50 runs as ONNX, SavedModel and LiteRT files that
compute what the JAX Predictor computes, with their metadata; the command line's errors."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from flax import nnx
from PIL import Image
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

import affect_jax
from affect_jax import export, models, predict
from affect_jax.data import synthetic
from affect_jax.data.source import AFFECTNET_CLASS_NAMES
from scripts import export_check
from tests.conftest import REPO, tiny_config

SIZE = 32
# Max abs difference to the JAX Predictor's outputs.
TOLERANCE = {"onnx": 1e-4, "saved_model": 1e-4, "tflite": 1e-3}
FILENAMES = {"onnx": "model.onnx", "saved_model": "saved_model", "tflite": "model.tflite"}
VGG_CLASSES = ["calm", "joy", "gloom", "awe", "dread", "ick", "fury", "scorn"]
# Both preprocessings and both class counts: VGG16 'caffe', 8 classes named by its
# final_metrics.json; ResNet50 'unit', AffectNet's 7. VGG16's best checkpoint is not its latest.
RUNS = {
    "vgg16": ({"data.preprocessing": "caffe"}, ((1, 0.6), (2, 0.2)), VGG_CLASSES),
    "resnet50": ({"data.preprocessing": "unit", "data.num_classes": 7}, ((1, 0.5),), None),
}


def _cli(*args):
    cmd = [sys.executable, "-m", "affect_jax.export", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _run(fmt, path, images):
    return export_check.RUNNERS[fmt](path, images)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (workdir, Predictor) of a 1/16-width run with random weights and statistics."""
    out = {}
    for name, (overrides, steps, class_names) in RUNS.items():
        config = tiny_config(**{"model.name": name, **overrides})
        workdir = str(tmp_path_factory.mktemp(name))
        export_check.write_random_run(config, workdir, steps, class_names)
        out[name] = workdir, predict.Predictor(workdir, batch_size=4)
    return out


@pytest.fixture(scope="module")
def faces():
    return synthetic.draw_faces(3, SIZE, 8, seed=3)["image"]


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """(name, format) -> path, exported by export_run; VGG16's ONNX by the command line."""
    root = tmp_path_factory.mktemp("exported")
    paths = {}
    for name, (workdir, _) in runs.items():
        for fmt, filename in FILENAMES.items():
            path = paths[name, fmt] = str(root / name / filename)
            if (name, fmt) == ("vgg16", "onnx"):
                result = _cli(f"--workdir={workdir}", f"--output={path}")
                assert result.returncode == 0, result.stderr[-3000:]
                assert f"to {path} (onnx)" in result.stderr
            else:
                result = export.export_run(workdir, path)
                assert result["format"] == fmt and result["output"] == path
    return paths


@pytest.mark.parametrize("fmt", list(FILENAMES))
@pytest.mark.parametrize("name", list(RUNS))
def test_exported_model_computes_what_the_predictor_does(name, fmt, runs, faces, exported):
    _, predictor = runs[name]
    expected = predictor.predict(faces)
    for images in (faces, faces[:1]):  # dynamic batch
        probs, va = _run(fmt, exported[name, fmt], images)
        assert probs.shape == (len(images), len(predictor.class_names))
        assert va.shape == (len(images), 2) and probs.dtype == va.dtype == np.float32
        np.testing.assert_allclose(
            probs, expected["probs"][: len(images)], rtol=0, atol=TOLERANCE[fmt]
        )
        np.testing.assert_allclose(
            va, expected["valence_arousal"][: len(images)], rtol=0, atol=TOLERANCE[fmt]
        )
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def _expected_metadata(name, workdir, predictor, step=1, which="best"):
    return {
        "affect_jax_version": affect_jax.__version__,
        "backbone": name,
        "width": 1 / 16,
        "class_names": list(predictor.class_names),
        "image_size": SIZE,
        "preprocessing": predictor.preprocessing,
        "input": f"images: uint8 RGB [N, {SIZE}, {SIZE}, 3]",
        "outputs": (
            f"probs: float32 [N, {len(predictor.class_names)}] (softmax); "
            "valence_arousal: float32 [N, 2] (clipped to [-1, 1])"
        ),
        "run_workdir": os.path.abspath(workdir),
        "checkpoint": which,
        "checkpoint_step": step,
    }


@pytest.mark.parametrize("name", list(RUNS))
def test_metadata_in_every_format(name, runs, exported):
    workdir, predictor = runs[name]
    expected = _expected_metadata(name, workdir, predictor)
    assert predictor.class_names == tuple(
        VGG_CLASSES if name == "vgg16" else AFFECTNET_CLASS_NAMES[:7]
    )
    for fmt in FILENAMES:
        assert export.read_metadata(exported[name, fmt]) == expected, fmt
    # As a consumer without affect-jax reads it.
    session = ort.InferenceSession(exported[name, "onnx"])
    onnx_meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(onnx_meta["class_names"]) == expected["class_names"]
    assert onnx_meta["preprocessing"] == expected["preprocessing"]
    assert int(onnx_meta["image_size"]) == SIZE
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert [o.name for o in session.get_outputs()] == ["probs", "valence_arousal"]
    loaded = tf.saved_model.load(exported[name, "saved_model"])
    assert json.loads(loaded.metadata_json.numpy()) == expected
    with open(loaded.metadata_file.asset_path.numpy()) as f:
        assert json.load(f) == expected
    tflite = exported[name, "tflite"]
    with open(export.sidecar_path(tflite)) as f:
        assert json.load(f) == expected
    signature = Interpreter(model_path=tflite).get_signature_list()["serving_default"]
    assert signature == {"inputs": ["images"], "outputs": ["probs", "valence_arousal"]}


@pytest.mark.parametrize("name", list(RUNS))
def test_graph_has_no_custom_call(name, exported):
    """The exported graph is XLA's portable path, whatever ops the run trained with."""
    config = export.portable_config(tiny_config(**{"model.name": name}))
    assert {config[k] for k in ("conv_impl", "batch_norm_impl", "pool_impl")} == {"xla"}
    model = nnx.eval_shape(lambda: models.create_model(config, nnx.Rngs(params=0)))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    run = export.Run(
        "run",
        config,
        ("a", "b"),
        "best",
        1,
        graphdef,
        {"params": params, "batch_stats": batch_stats},
    )
    images = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), np.uint8)
    lowered = jax.jit(export.serving_function(run)).lower(run.variables, images)
    assert "custom_call" not in lowered.as_text()
    model = onnx.load(exported[name, "onnx"])
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    tflite = flatbuffer_utils.read_model(exported[name, "tflite"])
    builtin = schema.BuiltinOperator
    assert all(code.builtinCode != builtin.CUSTOM for code in tflite.operatorCodes)


def test_latest_checkpoint_and_overwrite(runs, exported):
    workdir, predictor = runs["vgg16"]
    path = exported["vgg16", "onnx"]
    result = export.export_run(workdir, path, which="latest", overwrite=True)
    assert result["checkpoint_step"] == 2
    assert export.read_metadata(path) == _expected_metadata(
        "vgg16", workdir, predictor, 2, "latest"
    )
    assert [p for p in os.listdir(os.path.dirname(path)) if p.startswith(".")] == []


def test_bad_requests_get_one_clear_line(runs, tmp_path):
    workdir, _ = runs["resnet50"]
    existing = tmp_path / "taken.onnx"
    existing.write_bytes(b"keep me")
    cases = [
        (
            [f"--workdir={workdir}", f"--output={tmp_path / 'model.h5'}"],
            f"--output={tmp_path / 'model.h5'}: unknown extension '.h5'; expected .onnx (ONNX), "
            ".tflite (LiteRT) or a directory name without extension (TensorFlow SavedModel)",
        ),
        (
            [f"--workdir={workdir}", f"--output={existing}"],
            f"{existing} already exists; pass --overwrite to replace it",
        ),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if message in line]
        assert len(lines) == 1 and lines[0].endswith(message), result.stderr[-2000:]
    assert existing.read_bytes() == b"keep me"
    # The command line prints this error as the two above (OSError and ValueError alike);
    # in-process, since reaching it imports TensorFlow and Orbax.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(tiny_config().to_json_best_effort())
    message = f"no checkpoints in {unfinished / 'checkpoints'}: train first with"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}"):
        export.export_run(str(unfinished), str(tmp_path / "a.onnx"))
    # --overwrite replaces a SavedModel directory, never another one.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="is a directory that is not a SavedModel"):
        export.export_run(workdir, str(notes), overwrite=True)
    assert (notes / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["notes", "taken.onnx", "unfinished"]


def test_predict_onnx_script_needs_only_onnxruntime(runs, exported, faces, tmp_path):
    _, predictor = runs["vgg16"]
    folder = tmp_path / "faces"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(faces[0]).save(folder / "a.png")
    # Wider than high: its centre square is faces[1].
    Image.fromarray(np.pad(faces[1], ((0, 0), (4, 4), (0, 0)))).save(folder / "more" / "b.png")
    (folder / "notes.txt").write_text("not an image")
    # No affect_jax, jax or tensorflow in the script's process.
    code = (
        "import sys, runpy; sys.modules.update(affect_jax=None, jax=None, tensorflow=None); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    cmd = [
        sys.executable,
        "-c",
        code,
        f"{REPO}/scripts/predict_onnx.py",
        exported["vgg16", "onnx"],
        str(folder),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [os.path.relpath(r["path"], folder) for r in rows] == ["a.png", "more/b.png"]
    expected = predictor.predict(faces[:2])
    for row, probs, va in zip(rows, expected["probs"], expected["valence_arousal"], strict=True):
        got = np.array([float(row[f"prob_{c}"]) for c in VGG_CLASSES])
        np.testing.assert_allclose(got, probs, atol=1e-5)
        np.testing.assert_allclose([float(row["valence"]), float(row["arousal"])], va, atol=1e-5)
        assert row["expression"] == VGG_CLASSES[int(probs.argmax())]
