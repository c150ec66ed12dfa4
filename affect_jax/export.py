r"""A trained run as ONNX, TensorFlow SavedModel or LiteRT, with its preprocessing inside.

  python -m affect_jax.export --workdir=runs/resnet50 --output=resnet50.onnx
  python -m affect_jax.export --workdir=runs/resnet50 --which=latest --output=resnet50_saved_model
  python -m affect_jax.export --workdir=runs/resnet50 --output=resnet50.tflite

The format comes from the output path: ``.onnx`` (ONNX, by jax2onnx), ``.tflite`` (LiteRT, by
TensorFlow's converter from the SavedModel) or a path without extension (a SavedModel directory,
by jax2tf). Every format has one interface:

- input ``images``: uint8 RGB face crops ``[N, S, S, 3]``, N dynamic, S the run's image size;
- outputs ``probs`` ``[N, C]`` (softmax) and ``valence_arousal`` ``[N, 2]`` (clipped to
  [-1, 1]);
- the run's preprocessing ('caffe' or 'unit') inside the graph, and metadata (class names, image
  size, preprocessing, backbone, run, checkpoint, affect-jax version) inside the file: ONNX
  ``metadata_props``, the SavedModel's ``assets/affect_jax.json`` and ``metadata_json``
  attribute, the LiteRT model's ``affect_jax`` metadata entry and a sidecar ``.json`` file.

The graph is built with XLA's own convolution, BatchNorm and pooling (``PORTABLE_OPS``): the
oneDNN kernels are custom calls that no other runtime has. docs/export.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging as std_logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

import affect_jax
from affect_jax import cli
from affect_jax.errors import UserError

# The plain-XLA paths of every op with a custom-call alternative (configs/default.py).
PORTABLE_OPS = {"conv_impl": "xla", "batch_norm_impl": "xla", "pool_impl": "xla"}
FORMATS = {".onnx": "onnx", ".tflite": "tflite", "": "saved_model"}
INPUT_NAME = "images"
OUTPUT_NAMES = ("probs", "valence_arousal")
METADATA_NAME = "affect_jax"  # LiteRT metadata entry; SavedModel asset affect_jax.json
# Metadata values that are not strings (JSON-encoded in ONNX metadata_props).
NON_STRING_METADATA = ("class_names", "image_size", "width", "checkpoint_step")
ONNX_OPSET = 23
# Platforms the SavedModel's XLA module is lowered for (TensorFlow picks the one it runs on).
PLATFORMS = ("cpu", "cuda")


class ExportError(UserError, ValueError):
    """A request that cannot be exported, with what to do instead."""


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run's chosen checkpoint, with the model rebuilt on the portable ops."""

    workdir: str
    config: ml_collections.ConfigDict  # the run's config with PORTABLE_OPS, float32 compute
    class_names: tuple[str, ...]
    which: str
    step: int
    graphdef: nnx.GraphDef
    variables: dict[str, Any]  # {'params', 'batch_stats'}


def portable_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with PORTABLE_OPS and float32 compute (what every target runtime runs)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.update(PORTABLE_OPS)
    config.compute_dtype = "float32"
    return config


def load_run(workdir: str, which: str = "best") -> Run:
    """The run's config, class names and ``which`` checkpoint: everything export reads."""
    from affect_jax import run_dir, sharding  # TensorFlow and Orbax: only once a run is read

    if which not in ("best", "latest"):
        raise ExportError(f"which={which!r}; expected 'best' or 'latest'")
    config = portable_config(run_dir.load_config(workdir))
    class_names = run_dir.class_names(workdir, config)
    # The weights only: the optimizer state stays on disk.
    step, graphdef, variables = run_dir.restore_checkpoint(
        workdir, config, sharding.make_mesh(), which, variables_only=True
    )
    variables = jax.tree.map(np.asarray, variables)  # host copies: constants of the export
    return Run(os.path.abspath(workdir), config, class_names, which, step, graphdef, variables)


def metadata(run: Run) -> dict[str, Any]:
    """What a consumer needs besides the graph (stored in every format)."""
    size = int(run.config.data.image_size)
    return {
        "affect_jax_version": affect_jax.__version__,
        "backbone": str(run.config.model.name),
        "width": float(run.config.model.width),
        "class_names": list(run.class_names),
        "image_size": size,
        "preprocessing": preprocessing_mode(run.config),
        "input": f"{INPUT_NAME}: uint8 RGB [N, {size}, {size}, 3]",
        "outputs": (
            f"probs: float32 [N, {len(run.class_names)}] (softmax); valence_arousal: "
            "float32 [N, 2] (clipped to [-1, 1])"
        ),
        "run_workdir": run.workdir,
        "checkpoint": run.which,
        "checkpoint_step": int(run.step),
    }


def preprocessing_mode(config: ml_collections.ConfigDict) -> str:
    """'caffe' or 'unit', as ``pipeline.preprocessing_mode`` resolves it."""
    from affect_jax.data import pipeline

    return pipeline.preprocessing_mode(config)


# ---------------------------------------------------------------------------------------------
# The serving function
# ---------------------------------------------------------------------------------------------


def preprocess(images: jax.Array, mode: str) -> jax.Array:
    """uint8 RGB -> network input: ``pipeline.preprocess`` in JAX, the same float32 ops."""
    from affect_jax.data import pipeline

    x = images.astype(jnp.float32)
    if mode == "caffe":
        # lax.rev, not an indexing gather: LiteRT has no gather of a dynamic batch.
        return jax.lax.rev(x, (3,)) - jnp.asarray(pipeline.CAFFE_BGR_MEAN, jnp.float32)
    return x / 127.5 - 1.0


def serving_function(run: Run) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(variables, uint8 images) -> (probs, clipped valence_arousal)``, the exported graph."""
    from affect_jax import steps

    predict_step = steps.make_predict_step(run.graphdef)
    mode = preprocessing_mode(run.config)

    def serve(variables: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
        outputs = predict_step(variables, preprocess(images, mode))
        return outputs["probs"], jnp.clip(outputs["valence_arousal"], -1.0, 1.0)

    return serve


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def output_format(path: str) -> str:
    """'onnx', 'tflite' or 'saved_model' from the output path's extension."""
    extension = os.path.splitext(os.path.normpath(path))[1].lower()
    if extension not in FORMATS and not os.path.isdir(path):
        raise ExportError(
            f"--output={path}: unknown extension {extension!r}; expected .onnx (ONNX), "
            ".tflite (LiteRT) or a directory name without extension (TensorFlow SavedModel)"
        )
    return FORMATS.get(extension, "saved_model")


def sidecar_path(tflite_path: str) -> str:
    """The JSON metadata file written next to a ``.tflite`` model."""
    return os.path.splitext(tflite_path)[0] + ".json"


def export_onnx(run: Run, path: str) -> None:
    """ONNX by jax2onnx: the weights are initializers, the metadata ``metadata_props``."""
    to_onnx = _import_jax2onnx()
    import onnx  # a dependency of jax2onnx

    serve = serving_function(run)
    size = int(run.config.data.image_size)
    (batch,) = jax.export.symbolic_shape("N")
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    # jax2onnx prints debugging lines for some ops: keep the command's output to its own.
    with contextlib.redirect_stdout(io.StringIO()):
        model = to_onnx(
            lambda images: serve(run.variables, images),
            [spec],
            model_name="affect_jax",
            opset=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
        )
    model.producer_name, model.producer_version = "affect-jax", affect_jax.__version__
    for key, value in metadata(run).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, path)


def _import_jax2onnx():
    # jax2onnx logs a traceback for each optional plugin whose library it cannot import.
    std_logging.getLogger("jax2onnx").setLevel(std_logging.ERROR)
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ExportError(
            "ONNX export needs jax2onnx and onnx: pip install -c constraints.txt -e '.[export]'"
        ) from None

    return to_onnx


def saved_model_module(run: Run, metadata_dir: str):
    """A ``tf.Module`` serving the run: jax2tf's XLA module, the weights as variables."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    serve = serving_function(run)
    size = int(run.config.data.image_size)
    leaves, treedef = jax.tree.flatten(run.variables)

    def serve_leaves(leaves: Sequence[jax.Array], images: jax.Array):
        return serve(jax.tree.unflatten(treedef, leaves), images)

    converted = jax2tf.convert(
        serve_leaves,
        polymorphic_shapes=[None, f"(N, {size}, {size}, 3)"],
        with_gradient=False,
        native_serialization_platforms=PLATFORMS,
    )
    module = tf.Module()
    module.weights = [tf.Variable(leaf, trainable=False) for leaf in leaves]
    text = json.dumps(metadata(run), indent=2)
    metadata_file = os.path.join(metadata_dir, f"{METADATA_NAME}.json")
    with open(metadata_file, "w") as f:
        f.write(text)
    module.metadata_file = tf.saved_model.Asset(metadata_file)
    module.metadata_json = tf.Variable(text, trainable=False)

    @tf.function(
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, INPUT_NAME)],
        autograph=False,
    )
    def serving_default(images):
        probs, valence_arousal = converted(module.weights, images)
        return {"probs": probs, "valence_arousal": valence_arousal}

    module.serve = serving_default
    return module


def export_saved_model(run: Run, path: str) -> None:
    """TensorFlow SavedModel by jax2tf, signature ``serving_default``."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as scratch:
        module = saved_model_module(run, scratch)
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def export_tflite(run: Run, path: str) -> None:
    """LiteRT by TensorFlow's converter from the SavedModel, metadata embedded and beside it."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as scratch:
        saved = os.path.join(scratch, "saved_model")
        export_saved_model(run, saved)
        flatbuffer = tf.lite.TFLiteConverter.from_saved_model(saved).convert()
    text = json.dumps(metadata(run), indent=2)
    with open(path, "wb") as f:
        f.write(with_tflite_metadata(flatbuffer, text.encode()))
    with open(sidecar_path(path), "w") as f:
        f.write(text + "\n")


def with_tflite_metadata(flatbuffer: bytes, data: bytes) -> bytes:
    """The LiteRT model with ``data`` as its metadata entry METADATA_NAME."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


EXPORTERS = {"onnx": export_onnx, "saved_model": export_saved_model, "tflite": export_tflite}


def read_metadata(path: str) -> dict[str, Any]:
    """The metadata stored in an exported model (any of the three formats)."""
    fmt = output_format(path)
    if fmt == "onnx":
        import onnx

        props = onnx.load(path, load_external_data=False).metadata_props
        return {
            p.key: json.loads(p.value) if p.key in NON_STRING_METADATA else p.value for p in props
        }
    if fmt == "saved_model":
        with open(os.path.join(path, "assets", f"{METADATA_NAME}.json")) as f:
            return json.load(f)
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(path)
    (entry,) = [m for m in model.metadata or [] if m.name.decode() == METADATA_NAME]
    return json.loads(bytes(model.buffers[entry.buffer].data).decode())


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _outputs(path: str, fmt: str) -> list[str]:
    return [path, sidecar_path(path)] if fmt == "tflite" else [path]


def _check_output(path: str, fmt: str, overwrite: bool) -> None:
    existing = [p for p in _outputs(path, fmt) if os.path.lexists(p)]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]} already exists; pass --overwrite to replace it")
    if (
        fmt == "saved_model"
        and os.path.isdir(path)
        and os.listdir(path)
        and not os.path.isfile(os.path.join(path, "saved_model.pb"))
    ):
        raise ExportError(
            f"--output={path} is a directory that is not a SavedModel; refusing to replace it"
        )


def _move_into_place(source: str, target: str) -> None:
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    elif os.path.lexists(target):
        os.remove(target)
    os.replace(source, target)


def export_run(
    workdir: str, output: str, which: str = "best", overwrite: bool = False
) -> dict[str, Any]:
    """Exports run ``workdir``'s ``which`` checkpoint to ``output`` (format by extension).

    Returns the stored metadata with ``format`` and ``output``. The files are written beside
    ``output`` first and moved into place once complete, so a failed export replaces nothing.
    """
    fmt = output_format(output)
    _check_output(output, fmt, overwrite)
    run = load_run(workdir, which)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".affect_jax_export_") as scratch:
        staged = os.path.join(scratch, os.path.basename(os.path.normpath(output)))
        EXPORTERS[fmt](run, staged)
        for source, target in zip(_outputs(staged, fmt), _outputs(output, fmt), strict=True):
            _move_into_place(source, target)
    return {**metadata(run), "format": fmt, "output": os.path.abspath(output)}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined only when run, so importing the module defines none)."""
    flags.DEFINE_string("workdir", None, "The run directory (config.json, checkpoints/).")
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of --workdir to export.")
    flags.DEFINE_string(
        "output",
        None,
        "model.onnx (ONNX), model.tflite (LiteRT) or a "
        "directory name without extension (TensorFlow SavedModel).",
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
    flags.mark_flags_as_required(["workdir", "output"])


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    # A missing run, an existing output, ...: one line from cli.run.
    result = export_run(FLAGS.workdir, FLAGS.output, FLAGS.which, FLAGS.overwrite)
    logging.info(
        "Exported %s checkpoint %d (%s, %d classes, %d px, %s preprocessing) to %s (%s)",
        result["run_workdir"],
        result["checkpoint_step"],
        result["backbone"],
        len(result["class_names"]),
        result["image_size"],
        result["preprocessing"],
        result["output"],
        result["format"],
    )
    return 0


run = cli.console_script(define_flags, main, output_flag="output")  # affect-jax-export


if __name__ == "__main__":
    run()
