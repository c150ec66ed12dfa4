r"""The command line of prediction: a thin layer over ``Predictor``.

  python -m affect_jax.predict --workdir=runs/resnet50 --face=detect --output=preds.csv \
      photos/ selfie.jpg interview.mp4
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import tensorflow as tf
from absl import app, flags, logging

from affect_jax import run_dir
from affect_jax.predict.faces import FACE_MODES, STATUS_OK, read_boxes
from affect_jax.predict.predictor import Predictor

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined only when run, so importing the module defines none)."""
    flags.DEFINE_string("workdir", None, "The run directory (config.json, checkpoints/).")
    flags.DEFINE_string(
        "checkpoint",
        None,
        "One Orbax step directory, RUN/checkpoints/N, "
        "instead of --workdir (the run's config.json is read from RUN).",
    )
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of --workdir to use.")
    flags.DEFINE_enum("format", "csv", ["csv", "jsonl"], "Output format.")
    flags.DEFINE_string("output", None, "Output file (default: standard output).")
    flags.DEFINE_enum(
        "face",
        "none",
        list(FACE_MODES),
        "'none': the whole image is the face; "
        "'detect': the largest face found by a frontal-face cascade; 'box': "
        "boxes from --boxes.",
    )
    flags.DEFINE_string(
        "boxes", None, "--face=box: CSV path, face_x, face_y, face_width, face_height[, frame]."
    )
    flags.DEFINE_integer("every_n_frames", 1, "Videos: score frames 0, N, 2N, ...", lower_bound=1)
    flags.DEFINE_integer("batch_size", 32, "Images per step.", lower_bound=1)
    flags.DEFINE_bool("flip_tta", False, "Average over a horizontally flipped copy.")
    flags.DEFINE_integer("log_every", 100, "Progress line every N predicted faces.", lower_bound=1)


def _workdir_and_step(checkpoint: str) -> tuple[str, int]:
    """RUN/checkpoints/N -> (RUN, N)."""
    path = os.path.normpath(os.path.abspath(checkpoint))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {checkpoint!r} does not exist")
    name = os.path.basename(path)
    if not name.isdigit():
        raise ValueError(
            f"--checkpoint={checkpoint!r} is not an Orbax step directory (RUN/checkpoints/N)"
        )
    return os.path.dirname(os.path.dirname(path)), int(name)


def _write_rows(rows: Iterable[dict[str, Any]], columns: Sequence[str], fmt: str, out) -> int:
    """Writes rows as they come; returns how many have status 'ok'."""
    ok = 0
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
    for row in rows:
        ok += row["status"] == STATUS_OK
        if writer is not None:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        else:
            out.write(json.dumps(row) + "\n")
        out.flush()
    return ok


def main(argv: Sequence[str]) -> int:
    inputs = list(argv[1:])
    if not inputs:
        raise app.UsageError("give at least one image, folder or video to predict on")
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    if FLAGS.face == "box" and not FLAGS.boxes:
        raise app.UsageError("--face=box needs --boxes=CSV")
    # TensorFlow only resizes images here: keep it off any accelerator, as main does.
    tf.config.experimental.set_visible_devices([], "GPU")
    try:
        if FLAGS.checkpoint:
            workdir, step = _workdir_and_step(FLAGS.checkpoint)
        else:
            workdir, step = FLAGS.workdir, None
        config = run_dir.load_config(workdir)
        if config.get("compilation_cache_dir"):
            jax.config.update(
                "jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir)
            )
        predictor = Predictor(
            workdir, FLAGS.which, FLAGS.batch_size, step=step, flip_tta=FLAGS.flip_tta
        )
        boxes = read_boxes(FLAGS.boxes) if FLAGS.face == "box" else None
        out = open(FLAGS.output, "w", newline="") if FLAGS.output else sys.stdout
    except (OSError, ValueError) as e:  # FileNotFoundError included: a missing run or file
        logging.error("%s", e)
        return 1
    rows = predictor.iter_predictions(
        inputs, FLAGS.face, boxes, FLAGS.every_n_frames, FLAGS.log_every
    )
    try:
        ok = _write_rows(rows, predictor.columns, FLAGS.format, out)
    finally:
        if out is not sys.stdout:
            out.close()
    if ok == 0:
        logging.error("Nothing could be predicted.")
        return 1
    return 0
