r"""The command line of prediction: a thin layer over ``Predictor``.

  python -m affect_jax.predict --workdir=runs/resnet50 --face=detect --output=preds.csv \
      photos/ selfie.jpg interview.mp4
"""

from __future__ import annotations

import csv
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from typing import Any

import jax
from absl import app, flags, logging

from affect_jax import cli as command_line
from affect_jax import graceful_stop, run_dir, strict_json
from affect_jax.predict import media, resume
from affect_jax.predict.detectors import (
    DEFAULT_MIN_CONFIDENCE,
    DETECT_MAX_SIDE,
    DETECTORS,
    LBP_MIN_FACE,
    make_detector,
)
from affect_jax.predict.faces import FACE_MODES, FACE_SELECTIONS, STATUS_OK, read_boxes
from affect_jax.predict.predictor import DEFAULT_WORKERS, Predictor

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
    flags.DEFINE_bool(
        "resume",
        False,
        "Continue an interrupted prediction into --output (same run, options and inputs): "
        "inputs whose rows it holds are skipped, the rest appended.",
    )
    flags.DEFINE_enum(
        "face",
        "auto",
        list(FACE_MODES),
        "'auto': detected faces, or the whole image where none is found (a tight crop); "
        "'detect': detected faces only ('no_face' rows where none is found); 'none': the whole "
        "image is the face; 'box': boxes from --boxes.",
    )
    flags.DEFINE_enum(
        "faces", "all", list(FACE_SELECTIONS), "Detected faces scored: 'all' or the 'largest'."
    )
    flags.DEFINE_enum(
        "detector", "mtcnn", list(DETECTORS), "Face detector: MTCNN or the LBP cascade."
    )
    flags.DEFINE_float(
        "min_face_confidence",
        DEFAULT_MIN_CONFIDENCE,
        "MTCNN faces with a lower confidence are dropped (the LBP cascade gives none).",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_integer(
        "detect_size",
        DETECT_MAX_SIDE,
        "Images are searched for faces downscaled to at most this many pixels a side; smaller "
        "is faster and misses more small faces.",
        lower_bound=LBP_MIN_FACE,
    )
    flags.DEFINE_bool(
        "align", False, "Rotate each detected face so its eyes are level (needs MTCNN)."
    )
    flags.DEFINE_string(
        "boxes", None, "--face=box: CSV path, face_x, face_y, face_width, face_height[, frame]."
    )
    flags.DEFINE_integer("every_n_frames", 1, "Videos: score frames 0, N, 2N, ...", lower_bound=1)
    flags.DEFINE_integer(
        "detect_every",
        1,
        "Videos: detect faces on every Nth scored frame; the frames between reuse its faces.",
        lower_bound=1,
    )
    flags.DEFINE_float(
        "smooth",
        None,
        "Videos: exponential moving average of the probabilities, valence and arousal along "
        "each face track; the weight (0 < ALPHA <= 1) of the newest frame.",
    )
    flags.DEFINE_integer(
        "workers",
        DEFAULT_WORKERS,
        "Threads that read files, detect faces and prepare crops ahead of the model.",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "batch_size",
        32,
        "Faces per model call. Unset with only a few image files: the smallest power of two "
        "with one face per image (one photo: 1), so a lone face is not padded to 32.",
        lower_bound=1,
    )
    flags.DEFINE_bool("flip_tta", False, "Average over a horizontally flipped copy.")
    flags.DEFINE_integer("log_every", 100, "Progress line every N predicted faces.", lower_bound=1)


def batch_size_for(inputs: Sequence[str], requested: int, explicit: bool, devices: int) -> int:
    """Faces per model call: `requested` if given `explicit`ly or if any input is a folder or
    a video; for image files only, the smallest power of two >= their count, at most
    `requested`: a call runs its whole batch (padded), so one face in a call of 32 costs as
    much as 32. A multiple of `devices` (the batch is split across them)."""
    only_images = all(os.path.isfile(path) and media.media_kind(path) == "image" for path in inputs)
    size = requested
    if not explicit and only_images:
        size = min(requested, 1 << (len(inputs) - 1).bit_length())
    return -(-size // devices) * devices


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


def _in_background(fn: Callable[[], Any]) -> futures.Future:
    """``fn()`` run in a daemon thread; its result (or exception) in the future."""
    future: futures.Future = futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - raised by future.result()
            future.set_exception(e)

    threading.Thread(target=run, name="predict-setup", daemon=True).start()
    return future


def _build_detector():
    """The face detector when faces are detected (None otherwise): run while the model loads."""
    if FLAGS.face not in ("auto", "detect"):
        return None
    return make_detector(FLAGS.detector, FLAGS.min_face_confidence, FLAGS.detect_size)


def _write_rows(
    rows: Iterable[dict[str, Any]], columns: Sequence[str], fmt: str, out, header: bool = True
) -> int:
    """Writes rows as they come, each flushed (an interrupted run keeps them; ``resume``);
    returns how many have status 'ok'. ``header``: a CSV's header line first."""
    ok = 0
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
        if header:
            writer.writeheader()
    for row in rows:
        ok += row["status"] == STATUS_OK
        if writer is not None:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        else:
            out.write(strict_json.dumps(row) + "\n")
        out.flush()
    return ok


def _resumed_inputs(inputs: Sequence[str], progress: resume.Progress) -> list[str]:
    """The inputs (folders expanded) that ``progress`` does not hold, with a line saying so."""
    expanded = list(media.expand_inputs(inputs))
    left = resume.remaining(expanded, progress.done)
    logging.info(
        "Resuming %s: %d of %d inputs done (%d rows kept, %d ok); predicting the other %d",
        FLAGS.output,
        len(expanded) - len(left),
        len(expanded),
        progress.rows,
        progress.ok,
        len(left),
    )
    return left


def main(argv: Sequence[str]) -> int:
    """``predict``, stopped by SIGINT (Ctrl-C) or SIGTERM with one line: the rows written so
    far stay in --output, and the line gives the command that continues (``--resume``)."""
    with graceful_stop.StopSignals():
        try:
            return _predict(argv)
        except graceful_stop.Stopped as stop:
            if FLAGS.output:
                command = ["python", "-m", "affect_jax.predict", *sys.argv[1:]]
                if not FLAGS.resume:
                    command.insert(3, "--resume")
                print(
                    f"{stop}. {FLAGS.output} keeps every row written; continue with: "
                    f"{shlex.join(command)}",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(f"{stop}.", file=sys.stderr, flush=True)
            return stop.exit_code


def _predict(argv: Sequence[str]) -> int:
    inputs = list(argv[1:])
    if not inputs:
        raise app.UsageError("give at least one image, folder or video to predict on")
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    if FLAGS.face == "box" and not FLAGS.boxes:
        raise app.UsageError("--face=box needs --boxes=CSV")
    if FLAGS.align and (FLAGS.detector != "mtcnn" or FLAGS.face not in ("auto", "detect")):
        raise app.UsageError(
            f"--align needs eye landmarks: --face=auto or detect with --detector=mtcnn (got "
            f"--face={FLAGS.face} --detector={FLAGS.detector})"
        )
    if FLAGS.smooth is not None and not 0.0 < FLAGS.smooth <= 1.0:
        raise app.UsageError(f"--smooth={FLAGS.smooth}: expected a weight 0 < ALPHA <= 1")
    if FLAGS.resume and not FLAGS.output:
        raise app.UsageError("--resume continues into a file: give --output")
    # The detector's construction (its weights read) overlaps the model's loading.
    loading = _in_background(_build_detector)
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
            workdir,
            FLAGS.which,
            batch_size_for(
                inputs, FLAGS.batch_size, FLAGS["batch_size"].present, jax.device_count()
            ),
            step=step,
            flip_tta=FLAGS.flip_tta,
            detector=FLAGS.detector,
            min_face_confidence=FLAGS.min_face_confidence,
            detect_size=FLAGS.detect_size,
            workers=FLAGS.workers,
        )
        detector = loading.result()  # a missing package is one line here, not a traceback
        if detector is not None:
            predictor.detectors.add(detector)  # for the worker that detects first
        boxes = read_boxes(FLAGS.boxes) if FLAGS.face == "box" else None
        progress = resume.NOTHING_DONE
        if FLAGS.resume:
            progress = resume.read_progress(FLAGS.output, FLAGS.format, predictor.columns)
            inputs = _resumed_inputs(inputs, progress)
            out = resume.open_for_resume(FLAGS.output, progress)
        else:
            out = open(FLAGS.output, "w", newline="") if FLAGS.output else sys.stdout
    except (OSError, ValueError, RuntimeError) as e:  # FileNotFoundError: a missing run or file
        logging.error("%s", e)
        return 1
    rows = predictor.iter_predictions(
        inputs,
        FLAGS.face,
        boxes,
        FLAGS.every_n_frames,
        FLAGS.log_every,
        faces=FLAGS.faces,
        align=FLAGS.align,
        detect_every=FLAGS.detect_every,
        smooth=FLAGS.smooth,
    )
    try:
        ok = progress.ok + _write_rows(
            rows, predictor.columns, FLAGS.format, out, header=progress.keep_bytes == 0
        )
    finally:
        if out is not sys.stdout:
            out.close()
    if ok == 0:
        logging.error("Nothing could be predicted.")
        return 1
    return 0


# Predicting only reads: the process ends once its rows are written, without TensorFlow's
# teardown.
run = command_line.console_script(  # affect-jax-predict
    define_flags, main, output_flag="output", skip_teardown=True
)
