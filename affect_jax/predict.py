r"""Predictions of a trained run on your own images, folders of images and videos.

  python -m affect_jax.predict --workdir=runs/resnet50 --face=detect --output=preds.csv \
      photos/ selfie.jpg interview.mp4

The run's ``config.json`` fixes the architecture, classes, input size and preprocessing; every
face crop goes through the training pipeline's own resize and ``pipeline.preprocess`` and the
batches through ``steps.make_predict_step`` (the forward pass of validation's
``steps.make_eval_step``), so a crop is scored exactly as validation scores it.
``Predictor`` is the Python API; the command line is a thin layer over it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import cv2
import jax
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from affect_jax import distributed, metrics, run_dir, sharding, steps
from affect_jax.data import pipeline
from affect_jax.data.images import IMAGE_EXTENSIONS, crop_box, decode_error_text, read_image

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
FACE_MODES = ("none", "detect", "box")
STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
DETECT_MAX_SIDE = 640  # --face=detect searches a copy downscaled to this side.
DETECT_MIN_FACE = 24  # Smallest face searched, in pixels of that copy.
LOGGED_NO_FACE = 10  # Images/frames without a face logged one by one; the rest are counted.
BOX_COLUMNS = ("path", "face_x", "face_y", "face_width", "face_height")
FACE_COLUMNS = ("face_x", "face_y", "face_width", "face_height")

Box = tuple[float, float, float, float]  # x, y, width, height
Crop = tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive)
BoxTable = Mapping[tuple[str, int | None], Sequence[Box]]


# ---------------------------------------------------------------------------------------------
# Inputs: files, folders, videos, face boxes
# ---------------------------------------------------------------------------------------------


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def expand_inputs(paths: Iterable[str]) -> Iterator[tuple[str, str | None, str | None]]:
    """``(path, kind, error)`` for every input: kind 'image' or 'video', or an error message.

    Folders are searched recursively (sorted); files in them with other extensions are skipped
    and counted in a warning, while a named file with another extension is an error.
    """
    for path in paths:
        if os.path.isdir(path):
            found, skipped = [], []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    file = os.path.join(root, name)
                    (found if _kind(file) else skipped).append(file)
            if skipped:
                logging.warning("%s: skipped %d file(s) that are not images or videos (%s), "
                                "e.g. %s", path, len(skipped), _supported(), skipped[:3])
            if not found:
                yield path, None, f"no images or videos ({_supported()}) in this folder"
            for file in found:
                yield file, _kind(file), None
        elif not os.path.exists(path):
            yield path, None, "no such file or folder"
        elif _kind(path) is None:
            yield path, None, f"unsupported format {_extension(path)!r} (expected {_supported()})"
        else:
            yield path, _kind(path), None


def _kind(path: str) -> str | None:
    ext = _extension(path)
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def _supported() -> str:
    return ", ".join(e[1:] for e in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)


def read_video(path: str, every_n_frames: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """``(frame index, uint8 RGB frame)`` for every ``every_n_frames``-th frame from frame 0."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError("cannot open video")
    try:
        index = 0
        while True:
            if index % every_n_frames:
                if not capture.grab():  # skipped frames are not decoded
                    break
            else:
                ok, frame = capture.read()
                if not ok:
                    break
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
        if index == 0:
            raise ValueError("no frame could be read")
    finally:
        capture.release()


def _path_key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def read_boxes(csv_path: str) -> dict[tuple[str, int | None], list[Box]]:
    """Face boxes from a CSV ``path, face_x, face_y, face_width, face_height[, frame]``.

    Keys are ``(resolved path, frame or None)``; relative paths are tried against the current
    directory and the CSV's folder. An image or frame may have several boxes (one row each).
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"box file {csv_path!r} does not exist")
    table: dict[tuple[str, int | None], list[Box]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in BOX_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{csv_path}: missing columns {missing} (has {columns}); expected "
                             f"{', '.join(BOX_COLUMNS)}[, frame]")
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            try:
                box = tuple(float(row[c]) for c in FACE_COLUMNS)
                frame = int(row["frame"]) if row.get("frame") else None
            except ValueError as e:
                raise ValueError(f"{csv_path} line {line}: {e}") from None
            if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"{csv_path} line {line}: invalid box {box}")
            path = row["path"]
            candidates = {path}
            if not os.path.isabs(path):
                candidates.add(os.path.join(os.path.dirname(csv_path), path))
            for candidate in {_path_key(p) for p in candidates}:
                table.setdefault((candidate, frame), []).append(box)
    return table


# ---------------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------------


def _f32(value: Any) -> float:
    """The shortest decimal that round-trips the float32 value (short, exact CSV/JSON)."""
    return float(str(np.float32(value)))


class Predictor:
    """A trained run, ready to score face images.

    Args:
      workdir: the run directory (``config.json`` and ``checkpoints/``).
      which: 'best' (by the run's ``best_metric``) or 'latest' checkpoint.
      batch_size: images per jitted step (the last batch is padded).
      step: a specific checkpoint (epoch) instead of ``which``.
      flip_tta: average over a horizontally flipped copy (as ``main --mode=eval --flip_tta``).
    """

    def __init__(self, workdir: str, which: str = "best", batch_size: int = 32, *,
                 step: int | None = None, flip_tta: bool = False):
        self.workdir = workdir
        self.config = run_dir.load_config(workdir)
        self.class_names = run_dir.class_names(workdir, self.config)
        self.image_size = int(self.config.data.image_size)
        self.preprocessing = pipeline.preprocessing_mode(self.config)
        self.face_margin = float(self.config.data.get("face_margin", 0.0))
        self.batch_size = int(batch_size)
        self._mesh = sharding.make_mesh()
        devices = self._mesh.devices.size
        if self.batch_size < 1 or self.batch_size % devices:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                             f"{devices} devices")
        self.step, graphdef, state = run_dir.restore_checkpoint(
            workdir, self.config, self._mesh, which, step)
        self._variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        self._predict_step = jax.jit(steps.make_predict_step(graphdef, flip_tta=flip_tta))
        size, mode = self.image_size, self.preprocessing

        # The evaluation pipeline's own functions (what `pipeline.eval_batches` maps).
        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        def prepare(image: tf.Tensor) -> tf.Tensor:
            return pipeline.preprocess(pipeline.resize_image(image, size), mode)

        self._prepare = prepare
        self._detector = None  # built on first use: only --face=detect needs it
        self.prob_columns = [f"prob_{metrics.metric_key_name(c)}" for c in self.class_names]
        self.columns = ["path", "frame", "expression", *self.prob_columns, "valence", "arousal",
                        *FACE_COLUMNS, "status"]
        logging.info("Loaded %s (%s, %d classes, %d px, %s preprocessing), checkpoint %d",
                     workdir, self.config.model.name, len(self.class_names), size, mode,
                     self.step)

    # -- arrays ----------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Network input [S, S, 3] float32 of one uint8 RGB face crop (any size)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} "
                             f"{image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"empty image {image.shape}")
        with tf.device("/CPU:0"):  # where tf.data ran it during training
            return self._prepare(tf.constant(image)).numpy()

    def _run(self, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probs [n, C], clipped valence/arousal [n, 2]) of up to batch_size prepared images."""
        n = len(inputs)
        images = np.zeros((self.batch_size, *inputs[0].shape), np.float32)  # padded
        images[:n] = np.stack(inputs)
        images = sharding.shard_batch({"image": images}, self._mesh)["image"]
        out = distributed.to_host(self._predict_step(self._variables, images))
        return out["probs"][:n], np.clip(out["valence_arousal"][:n], -1.0, 1.0)

    def predict(self, images: Sequence[np.ndarray] | np.ndarray) -> dict[str, Any]:
        """Scores face crops (uint8 RGB [H, W, 3] each, any size; no face detection).

        Returns ``class_names``, ``probs`` [N, C], ``expression`` [N] (class names) and
        ``valence_arousal`` [N, 2] clipped to [-1, 1].
        """
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise ValueError(f"expected images [N, H, W, 3] or a list of [H, W, 3], got "
                             f"shape {images.shape}")
        prepared = [self.prepare(image) for image in images]
        probs = np.zeros((0, len(self.class_names)), np.float32)
        va = np.zeros((0, 2), np.float32)
        chunks = [self._run(prepared[i:i + self.batch_size])
                  for i in range(0, len(prepared), self.batch_size)]
        if chunks:
            probs = np.concatenate([c[0] for c in chunks])
            va = np.concatenate([c[1] for c in chunks])
        return {
            "class_names": self.class_names,
            "probs": probs,
            "expression": np.array(self.class_names)[probs.argmax(-1)],
            "valence_arousal": va,
        }

    # -- faces -----------------------------------------------------------------------------

    def detect_face(self, image: np.ndarray) -> Box | None:
        """The largest frontal face (x, y, w, h) in a uint8 RGB image, or None.

        OpenCV 5 dropped its Haar cascades (``cv2.CascadeClassifier`` and the XML files are
        gone), so this uses the LBP frontal-face cascade from OpenCV that scikit-image ships
        (``skimage.data.lbp_frontal_face_cascade_filename``): nothing is downloaded.
        """
        if self._detector is None:
            try:
                from skimage import data as skdata
                from skimage import feature
            except ImportError:
                raise RuntimeError("--face=detect needs scikit-image: pip install "
                                   "scikit-image") from None
            self._detector = feature.Cascade(skdata.lbp_frontal_face_cascade_filename())
        height, width = image.shape[:2]
        # Detection on a copy at most DETECT_MAX_SIDE px wide: the cascade's cost grows with
        # the pixel count, and faces small enough to vanish there are too small to score.
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (max(1, round(width * scale)), max(1, round(height * scale))),
                              interpolation=cv2.INTER_AREA)
        side = min(gray.shape)
        if side < DETECT_MIN_FACE:
            return None
        faces = self._detector.detect_multi_scale(
            img=gray, scale_factor=1.2, step_ratio=1.2, min_size=(DETECT_MIN_FACE,) * 2,
            max_size=(side, side), min_neighbor_number=4,
        )
        if not faces:
            return None
        face = max(faces, key=lambda f: f["width"] * f["height"])
        return tuple(float(face[k]) / scale for k in ("c", "r", "width", "height"))

    def _crops(self, image: np.ndarray, path: str, frame: int | None, face: str,
               boxes: BoxTable | None) -> list[tuple[Crop | None, str]]:
        """(crop, status) per face to score in ``image``: the face box grown by the run's
        ``data.face_margin`` and clipped, exactly as the official layout was cropped."""
        height, width = image.shape[:2]
        if face == "none":
            return [((0, 0, width, height), STATUS_OK)]
        if face == "detect":
            found = self.detect_face(image)
            if found is None:
                return [(None, STATUS_NO_FACE)]
            face_boxes = [found]
        else:
            key, table = _path_key(path), boxes or {}
            # A box without a frame number holds for every frame of a video.
            face_boxes = table.get((key, frame)) or table.get((key, None)) or []
            if not face_boxes:
                what = "image" if frame is None else "frame"
                return [(None, f"no face box for this {what} in the box file")]
        result = []
        for box in face_boxes:
            crop = crop_box(box, self.face_margin, width, height)
            outside = f"face box {box} lies outside the {width}x{height} image"
            result.append((crop, STATUS_OK if crop else outside))
        return result

    # -- files -----------------------------------------------------------------------------

    def _row(self, path: str, frame: int | None, status: str,
             crop: Crop | None = None) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(self.columns)
        row.update(path=path, frame=frame, status=status)
        if crop is not None:
            x0, y0, x1, y1 = crop
            row.update(face_x=x0, face_y=y0, face_width=x1 - x0, face_height=y1 - y0)
        return row

    def _samples(self, paths: Iterable[str], face: str, boxes: BoxTable | None,
                 every_n_frames: int) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
        """(row, face crop or None) for every face, frame and input, in input order."""
        for path, kind, error in expand_inputs(paths):
            if error:
                yield self._row(path, None, error), None
                continue
            try:
                if kind == "image":
                    images = [(None, read_image(path))]
                else:
                    images = read_video(path, every_n_frames)
                for frame, image in images:
                    for crop, status in self._crops(image, path, frame, face, boxes):
                        if crop is None:
                            yield self._row(path, frame, status), None
                        else:
                            x0, y0, x1, y1 = crop
                            yield self._row(path, frame, status, crop), image[y0:y1, x0:x1]
            except OSError as e:
                yield self._row(path, None, f"cannot read file: {e.strerror or e}"), None
            except (tf.errors.OpError, ValueError, cv2.error) as e:
                what = "image" if kind == "image" else "video"
                message = decode_error_text(e) if isinstance(e, tf.errors.OpError) \
                    else str(e)
                yield self._row(path, None, f"cannot decode {what}: {message}"), None

    def iter_predictions(self, paths: Iterable[str], face: str = "none",
                         boxes: str | BoxTable | None = None, every_n_frames: int = 1,
                         log_every: int = 100) -> Iterator[dict[str, Any]]:
        """Rows (see ``columns``) for every image, sampled video frame and face, in input order.

        A file that cannot be used gives a row whose ``status`` says why (and a warning); no
        face gives status 'no_face'. Prediction fields of such rows are None.
        """
        if face not in FACE_MODES:
            raise ValueError(f"face={face!r}; expected one of {FACE_MODES}")
        if face == "box" and boxes is None:
            raise ValueError("face='box' needs boxes (a CSV path, face_x, face_y, face_width, "
                             "face_height[, frame])")
        if every_n_frames < 1:
            raise ValueError(f"every_n_frames must be >= 1, got {every_n_frames}")
        if isinstance(boxes, (str, os.PathLike)):
            boxes = read_boxes(os.fspath(boxes))
        counts = {"ok": 0, "no_face": 0, "error": 0}
        start, next_log = time.time(), log_every
        pending: list[dict[str, Any]] = []  # rows in order; some wait for their prediction
        waiting: list[tuple[dict[str, Any], np.ndarray]] = []

        def flush() -> Iterator[dict[str, Any]]:
            nonlocal next_log
            if waiting:
                probs, va = self._run([x for _, x in waiting])
                for (row, _), p, v in zip(waiting, probs, va, strict=True):
                    row["expression"] = self.class_names[int(p.argmax())]
                    for column, value in zip(self.prob_columns, p, strict=True):
                        row[column] = _f32(value)
                    row["valence"], row["arousal"] = _f32(v[0]), _f32(v[1])
                waiting.clear()
            yield from pending
            pending.clear()
            if counts["ok"] >= next_log:
                elapsed = time.time() - start
                logging.info("Predicted %d faces in %.1f s (%.1f faces/s); %d without a face, "
                             "%d errors", counts["ok"], elapsed, counts["ok"] / elapsed,
                             counts["no_face"], counts["error"])
                next_log = (counts["ok"] // log_every + 1) * log_every

        for row, crop in self._samples(paths, face, boxes, every_n_frames):
            pending.append(row)
            if crop is not None:
                waiting.append((row, self.prepare(crop)))
                counts["ok"] += 1
            elif not waiting:  # nothing to wait for: out at once (a long faceless video)
                yield from pending
                pending.clear()
            if row["status"] == STATUS_NO_FACE:
                counts["no_face"] += 1
                if counts["no_face"] <= LOGGED_NO_FACE:  # a long video may have thousands
                    logging.info("%s%s: no face found%s", row["path"], _frame_text(row["frame"]),
                                 " (further ones are only counted)"
                                 if counts["no_face"] == LOGGED_NO_FACE else "")
            elif row["status"] != STATUS_OK:
                counts["error"] += 1
                logging.warning("%s%s: %s", row["path"], _frame_text(row["frame"]),
                                row["status"])
            if len(waiting) == self.batch_size:
                yield from flush()
        yield from flush()
        logging.info("Done in %.1f s: %d faces predicted, %d images/frames without a face, "
                     "%d errors", time.time() - start, counts["ok"], counts["no_face"],
                     counts["error"])

    def predict_files(self, paths: Iterable[str], face: str = "none",
                      boxes: str | BoxTable | None = None,
                      every_n_frames: int = 1) -> list[dict[str, Any]]:
        """``iter_predictions`` as a list (images, folders and videos; see the CLI)."""
        return list(self.iter_predictions(paths, face, boxes, every_n_frames))


def _frame_text(frame: int | None) -> str:
    return "" if frame is None else f" frame {frame}"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined only when run, so importing the module defines none)."""
    flags.DEFINE_string("workdir", None, "The run directory (config.json, checkpoints/).")
    flags.DEFINE_string("checkpoint", None, "One Orbax step directory, RUN/checkpoints/N, "
                        "instead of --workdir (the run's config.json is read from RUN).")
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of --workdir to use.")
    flags.DEFINE_enum("format", "csv", ["csv", "jsonl"], "Output format.")
    flags.DEFINE_string("output", None, "Output file (default: standard output).")
    flags.DEFINE_enum("face", "none", list(FACE_MODES), "'none': the whole image is the face; "
                      "'detect': the largest face found by a frontal-face cascade; 'box': "
                      "boxes from --boxes.")
    flags.DEFINE_string("boxes", None, "--face=box: CSV path, face_x, face_y, face_width, "
                        "face_height[, frame].")
    flags.DEFINE_integer("every_n_frames", 1, "Videos: score frames 0, N, 2N, ...",
                         lower_bound=1)
    flags.DEFINE_integer("batch_size", 32, "Images per step.", lower_bound=1)
    flags.DEFINE_bool("flip_tta", False, "Average over a horizontally flipped copy.")
    flags.DEFINE_integer("log_every", 100, "Progress line every N predicted faces.",
                         lower_bound=1)


def _workdir_and_step(checkpoint: str) -> tuple[str, int]:
    """RUN/checkpoints/N -> (RUN, N)."""
    path = os.path.normpath(os.path.abspath(checkpoint))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {checkpoint!r} does not exist")
    name = os.path.basename(path)
    if not name.isdigit():
        raise ValueError(f"--checkpoint={checkpoint!r} is not an Orbax step directory "
                         "(RUN/checkpoints/N)")
    return os.path.dirname(os.path.dirname(path)), int(name)


def _write_rows(rows: Iterable[dict[str, Any]], columns: Sequence[str], fmt: str,
                out) -> int:
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
            jax.config.update("jax_compilation_cache_dir",
                              os.path.expanduser(config.compilation_cache_dir))
        predictor = Predictor(workdir, FLAGS.which, FLAGS.batch_size, step=step,
                              flip_tta=FLAGS.flip_tta)
        boxes = read_boxes(FLAGS.boxes) if FLAGS.face == "box" else None
        out = open(FLAGS.output, "w", newline="") if FLAGS.output else sys.stdout
    except (OSError, ValueError) as e:  # FileNotFoundError included: a missing run or file
        logging.error("%s", e)
        return 1
    rows = predictor.iter_predictions(inputs, FLAGS.face, boxes, FLAGS.every_n_frames,
                                      FLAGS.log_every)
    try:
        ok = _write_rows(rows, predictor.columns, FLAGS.format, out)
    finally:
        if out is not sys.stdout:
            out.close()
    if ok == 0:
        logging.error("Nothing could be predicted.")
        return 1
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
