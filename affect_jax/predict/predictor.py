"""The ``Predictor``: a trained run scoring face crops, images, folders and videos.

The run's ``config.json`` fixes the architecture, classes, input size and preprocessing; every
face crop goes through the training pipeline's own resize and ``pipeline.preprocess`` and the
batches through ``steps.make_predict_step`` (the forward pass of validation's
``steps.make_eval_step``), so a crop is scored exactly as validation scores it.

Files are read, faces detected and crops prepared by a few threads ahead of the model
(``parallel.ordered_map``); rows still come out in input order.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any

import cv2
import jax
import numpy as np
import tensorflow as tf
from absl import logging

from affect_jax import distributed, metrics, run_dir, sharding, steps
from affect_jax.data import pipeline
from affect_jax.data.images import decode_error_text, read_image
from affect_jax.predict import align, detectors, media, parallel, tracks
from affect_jax.predict.faces import (
    FACE_COLUMNS,
    LANDMARK_COLUMNS,
    STATUS_NO_FACE,
    STATUS_OK,
    BoxTable,
    Face,
    FaceOptions,
    crop_window,
    find_faces,
    read_boxes,
    table_boxes,
)

LOGGED_NO_FACE = 10  # Images/frames without a face logged one by one; the rest are counted.
# Detection and the model share the CPU: on 2 cores one worker already keeps it busy.
DEFAULT_WORKERS = min(4, max(1, (os.cpu_count() or 2) // 2))
TIMED_STAGES = ("decode", "detect", "prepare", "model")


def _f32(value: Any) -> float:
    """The shortest decimal that round-trips the float32 value (short, exact CSV/JSON)."""
    return float(str(np.float32(value)))


def _frame_text(frame: int | None) -> str:
    return "" if frame is None else f" frame {frame}"


@dataclasses.dataclass
class _Job:
    """One image file or one decoded video frame (or an input that cannot be used)."""

    path: str
    kind: str | None
    error: str | None = None
    frame: int | None = None
    image: np.ndarray | None = None
    # Video frames: the faces of the frame that runs detection, shared with the frames after it
    # that reuse them (--detect_every); ``detect`` says whether this frame sets them.
    faces: futures.Future | None = None
    detect: bool = True


@dataclasses.dataclass
class _Sample:
    """One row to write and, for a face to score, its network input."""

    row: dict[str, Any]
    input: np.ndarray | None = None


class Predictor:
    """A trained run, ready to score face images.

    Args:
      workdir: the run directory (``config.json`` and ``checkpoints/``).
      which: 'best' (by the run's ``best_metric``) or 'latest' checkpoint.
      batch_size: images per jitted step (the last batch is padded).
      step: a specific checkpoint (epoch) instead of ``which``.
      flip_tta: average over a horizontally flipped copy (as ``main --mode=eval --flip_tta``).
      detector: 'mtcnn' or 'lbp' (``detectors.DETECTORS``), built on first use.
      min_face_confidence: MTCNN faces below this confidence are dropped.
      detect_size: images are searched for faces downscaled to at most this many pixels a
        side (smaller is faster and misses more small faces).
      workers: threads that read files, detect faces and prepare crops ahead of the model.
    """

    def __init__(
        self,
        workdir: str,
        which: str = "best",
        batch_size: int = 32,
        *,
        step: int | None = None,
        flip_tta: bool = False,
        detector: str = "mtcnn",
        min_face_confidence: float = detectors.DEFAULT_MIN_CONFIDENCE,
        detect_size: int = detectors.DETECT_MAX_SIDE,
        workers: int = DEFAULT_WORKERS,
    ):
        if detector not in detectors.DETECTORS:
            raise ValueError(f"detector={detector!r}; expected one of {detectors.DETECTORS}")
        if not 0.0 <= min_face_confidence <= 1.0:
            raise ValueError(f"min_face_confidence={min_face_confidence}; expected 0 to 1")
        if detect_size < detectors.LBP_MIN_FACE:
            raise ValueError(
                f"detect_size={detect_size}; expected at least {detectors.LBP_MIN_FACE} pixels"
            )
        if workers < 1:
            raise ValueError(f"workers={workers}; expected at least 1")
        self.workdir = workdir
        self.config = run_dir.load_config(workdir)
        self.class_names = run_dir.class_names(workdir, self.config)
        self.image_size = int(self.config.data.image_size)
        self.preprocessing = pipeline.preprocessing_mode(self.config)
        self.face_margin = float(self.config.data.get("face_margin", 0.0))
        self.batch_size = int(batch_size)
        self.detector = detector
        self.min_face_confidence = float(min_face_confidence)
        self.detect_size = int(detect_size)
        self.workers = int(workers)
        self._mesh = sharding.make_mesh()
        devices = self._mesh.devices.size
        if self.batch_size < 1 or self.batch_size % devices:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of the {devices} devices"
            )
        self.step, graphdef, state = run_dir.restore_checkpoint(
            workdir, self.config, self._mesh, which, step
        )
        self._variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        self._predict_step = jax.jit(steps.make_predict_step(graphdef, flip_tta=flip_tta))
        size, mode = self.image_size, self.preprocessing

        # The evaluation pipeline's own functions (what `pipeline.eval_batches` maps).
        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        def prepare(image: tf.Tensor) -> tf.Tensor:
            return pipeline.preprocess(pipeline.resize_image(image, size), mode)

        self._prepare = prepare
        self._local = threading.local()  # one detector per thread, built on first use
        self._timing_lock = threading.Lock()
        self.timings = dict.fromkeys(TIMED_STAGES, 0.0)
        self.prob_columns = [f"prob_{metrics.metric_key_name(c)}" for c in self.class_names]
        self.columns = [
            "path",
            "frame",
            "face_index",
            "track_id",
            "expression",
            *self.prob_columns,
            "valence",
            "arousal",
            *FACE_COLUMNS,
            "face_source",
            "face_confidence",
            *LANDMARK_COLUMNS,
            "status",
        ]
        logging.info(
            "Loaded %s (%s, %d classes, %d px, %s preprocessing), checkpoint %d",
            workdir,
            self.config.model.name,
            len(self.class_names),
            size,
            mode,
            self.step,
        )

    # -- arrays ----------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Network input [S, S, 3] float32 of one uint8 RGB face crop (any size)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}"
            )
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
            raise ValueError(
                f"expected images [N, H, W, 3] or a list of [H, W, 3], got shape {images.shape}"
            )
        prepared = [self.prepare(image) for image in images]
        probs = np.zeros((0, len(self.class_names)), np.float32)
        va = np.zeros((0, 2), np.float32)
        chunks = [
            self._run(prepared[i : i + self.batch_size])
            for i in range(0, len(prepared), self.batch_size)
        ]
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

    def load_detector(self):
        """This thread's face detector, built on first use (the detectors are not known to be
        thread-safe: one per thread). Raises RuntimeError if its package is missing."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = detectors.make_detector(
                self.detector, self.min_face_confidence, self.detect_size
            )
            self._local.detector = detector
        return detector

    def detect_faces(self, image: np.ndarray) -> list[Face]:
        """Every face the detector finds in a uint8 RGB image (boxes and, for MTCNN, confidence
        and landmarks in the image's pixels), in the detector's order."""
        detector = self.load_detector()
        start = time.perf_counter()
        found = detector.detect(image)
        self._add_time("detect", start)
        return found

    def _add_time(self, stage: str, start: float) -> None:
        with self._timing_lock:
            self.timings[stage] += time.perf_counter() - start

    def _row(self, path: str, frame: int | None, status: str) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(self.columns)
        row.update(path=path, frame=frame, status=status)
        return row

    def _face_samples(
        self, image: np.ndarray, path: str, frame: int | None, found: Sequence[Face], align_: bool
    ) -> list[_Sample]:
        """A sample per face of ``image``: its crop (the box grown by the run's
        ``data.face_margin`` and clipped; eye-levelled with ``align_`` where the face has
        landmarks) prepared for the network, or a row saying why it cannot be scored."""
        height, width = image.shape[:2]
        samples = []
        for index, face in enumerate(found):
            crop = crop_window(face, self.face_margin, width, height)
            status = (
                STATUS_OK
                if crop
                else (f"face box {face.box} lies outside the {width}x{height} image")
            )
            row = self._row(path, frame, status)
            row.update(face_index=index, face_source=face.source)
            if face.confidence is not None:
                row["face_confidence"] = _f32(face.confidence)
            if face.landmarks is not None:
                values = [round(v, 2) for point in face.landmarks for v in point]
                row.update(zip(LANDMARK_COLUMNS, values, strict=True))
            if crop is None:
                samples.append(_Sample(row))
                continue
            x0, y0, x1, y1 = crop
            row.update(face_x=x0, face_y=y0, face_width=x1 - x0, face_height=y1 - y0)
            if align_ and face.landmarks is not None:
                pixels = align.aligned_crop(image, face.landmarks, crop)
            else:
                pixels = image[y0:y1, x0:x1]
            start = time.perf_counter()
            samples.append(_Sample(row, self.prepare(pixels)))
            self._add_time("prepare", start)
        return samples

    def _image_samples(
        self,
        image: np.ndarray,
        path: str,
        frame: int | None,
        options: FaceOptions,
        found: Sequence[Face] | None = None,
    ) -> list[_Sample]:
        """The samples of one image or frame; ``found``: detected faces to use instead of
        running the detector (a video frame that reuses an earlier frame's)."""
        detect = self.detect_faces if found is None else (lambda _: list(found))
        boxes = table_boxes(options.boxes, path, frame) if options.face == "box" else ()
        chosen, status = find_faces(image, options.face, options.faces, detect, boxes, frame)
        if status is not None:
            return [_Sample(self._row(path, frame, status))]
        return self._face_samples(image, path, frame, chosen, options.align)

    def predict_image(
        self,
        image: np.ndarray,
        path: str = "",
        *,
        face: str = "auto",
        faces: str = "all",
        align: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows (see ``columns``) for every face of one uint8 RGB image held in memory;
        ``path`` only fills the rows' path."""
        if face == "box":
            raise ValueError("face='box' takes boxes from a file: use predict_files")
        options = FaceOptions(face, faces, align)
        options.check()
        samples = self._image_samples(np.asarray(image), path, None, options)
        return list(self._scored(samples, smooth=None))

    # -- files -----------------------------------------------------------------------------

    def _jobs(
        self, paths: Iterable[str], options: FaceOptions, every_n_frames: int, detect_every: int
    ) -> Iterator[_Job]:
        """The inputs as jobs: image files (read by the workers) and decoded video frames."""
        for path, kind, error in media.expand_inputs(paths):
            if error or kind == "image":
                yield _Job(path, kind, error)
                continue
            found: futures.Future | None = None
            try:
                frames = media.read_video(path, every_n_frames)
                while True:
                    start = time.perf_counter()
                    item = next(frames, None)
                    self._add_time("decode", start)
                    if item is None:
                        break
                    frame, image = item
                    detect = found is None or (frame // every_n_frames) % detect_every == 0
                    if detect:
                        found = futures.Future()
                    yield _Job(path, kind, None, frame, image, found, detect)
            except (ValueError, cv2.error) as e:
                yield _Job(path, kind, f"cannot decode video: {e}")

    def _process(self, job: _Job, options: FaceOptions) -> list[_Sample]:
        """The samples of one job (run by the worker threads)."""
        if job.error:
            return [_Sample(self._row(job.path, job.frame, job.error))]
        try:
            if job.kind == "image":
                start = time.perf_counter()
                image = read_image(job.path)
                self._add_time("decode", start)
                return self._image_samples(image, job.path, None, options)
            uses_detector = options.face in ("auto", "detect")
            if not uses_detector:
                return self._image_samples(job.image, job.path, job.frame, options)
            if job.detect:
                try:
                    job.faces.set_result(self.detect_faces(job.image))
                except BaseException as e:  # the frames that reuse these faces fail alike
                    job.faces.set_exception(e)
            # Set by this job or an earlier frame's (submitted first, so running or done).
            found = job.faces.result()
            return self._image_samples(job.image, job.path, job.frame, options, found)
        except OSError as e:
            return [_Sample(self._row(job.path, None, f"cannot read file: {e.strerror or e}"))]
        except (tf.errors.OpError, ValueError, cv2.error) as e:
            what = "image" if job.kind == "image" else "video"
            message = decode_error_text(e) if isinstance(e, tf.errors.OpError) else str(e)
            return [_Sample(self._row(job.path, job.frame, f"cannot decode {what}: {message}"))]

    def _scored(
        self, samples: Iterable[_Sample], smooth: float | None, log_every: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Rows in order: samples batched through the model (smoothed along video tracks with
        ``smooth``), others as they are; progress logged every ``log_every`` faces."""
        counts = {"ok": 0, "no_face": 0, "error": 0}
        start, next_log = time.time(), log_every
        pending: list[dict[str, Any]] = []  # rows in order; some wait for their prediction
        waiting: list[_Sample] = []
        smoother = tracks.TrackSmoother(smooth) if smooth is not None else None

        def flush() -> Iterator[dict[str, Any]]:
            nonlocal next_log
            if waiting:
                model_start = time.perf_counter()
                probs, va = self._run([s.input for s in waiting])
                self._add_time("model", model_start)
                for sample, p, v in zip(waiting, probs, va, strict=True):
                    track = sample.row["track_id"]
                    if smoother is not None and track is not None:  # rows come in frame order
                        p, v = np.split(smoother((sample.row["path"], track), [*p, *v]), [len(p)])
                    self._fill(sample.row, p, v)
                waiting.clear()
            yield from pending
            pending.clear()
            if log_every and counts["ok"] >= next_log:
                elapsed = time.time() - start
                logging.info(
                    "Predicted %d faces in %.1f s (%.1f faces/s); %d without a face, %d errors",
                    counts["ok"],
                    elapsed,
                    counts["ok"] / elapsed,
                    counts["no_face"],
                    counts["error"],
                )
                next_log = (counts["ok"] // log_every + 1) * log_every

        for sample in samples:
            row = sample.row
            pending.append(row)
            if sample.input is not None:
                waiting.append(sample)
                counts["ok"] += 1
            elif not waiting:  # nothing to wait for: out at once (a long faceless video)
                yield from flush()
            if row["status"] == STATUS_NO_FACE:
                counts["no_face"] += 1
                if log_every and counts["no_face"] <= LOGGED_NO_FACE:
                    logging.info(
                        "%s%s: no face found%s",
                        row["path"],
                        _frame_text(row["frame"]),
                        " (further ones are only counted)"
                        if counts["no_face"] == LOGGED_NO_FACE
                        else "",
                    )
            elif row["status"] != STATUS_OK:
                counts["error"] += 1
                if log_every:
                    logging.warning(
                        "%s%s: %s", row["path"], _frame_text(row["frame"]), row["status"]
                    )
            if len(waiting) == self.batch_size:
                yield from flush()
        yield from flush()
        if log_every:
            logging.info(
                "Done in %.1f s: %d faces predicted, %d images/frames without a face, %d errors "
                "(time spent, summed over threads: %s)",
                time.time() - start,
                counts["ok"],
                counts["no_face"],
                counts["error"],
                ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()),
            )

    def _fill(self, row: dict[str, Any], probs: np.ndarray, va: np.ndarray) -> None:
        """Writes a prediction into its row."""
        row["expression"] = self.class_names[int(np.argmax(probs))]
        for column, value in zip(self.prob_columns, probs, strict=True):
            row[column] = _f32(value)
        row["valence"], row["arousal"] = _f32(va[0]), _f32(va[1])

    def iter_predictions(
        self,
        paths: Iterable[str],
        face: str = "auto",
        boxes: str | BoxTable | None = None,
        every_n_frames: int = 1,
        log_every: int = 100,
        *,
        faces: str = "all",
        align: bool = False,
        detect_every: int = 1,
        smooth: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows (see ``columns``) for every image, sampled video frame and face, in input order.

        A file that cannot be used gives a row whose ``status`` says why (and a warning); no
        face (face='detect') gives status 'no_face'. Prediction fields of such rows are None.
        Video faces are linked into tracks (``track_id``); ``detect_every``: detection runs on
        every so many scored frames and the frames between reuse its faces; ``smooth``: the
        weight of the newest frame in an exponential moving average of the probabilities,
        valence and arousal along each track (None: no smoothing).
        """
        if every_n_frames < 1:
            raise ValueError(f"every_n_frames must be >= 1, got {every_n_frames}")
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        if smooth is not None:
            tracks.TrackSmoother(smooth)  # checks the weight
        if isinstance(boxes, (str, os.PathLike)):
            boxes = read_boxes(os.fspath(boxes))
        options = FaceOptions(face, faces, align, boxes)
        options.check()
        self.timings = dict.fromkeys(TIMED_STAGES, 0.0)
        jobs = self._jobs(paths, options, every_n_frames, detect_every)
        processed = parallel.ordered_map(
            lambda job: (job, self._process(job, options)),
            jobs,
            self.workers,
            ahead=2 * self.batch_size,
        )
        yield from self._scored(_tracked(processed), smooth, log_every)

    def predict_files(
        self,
        paths: Iterable[str],
        face: str = "auto",
        boxes: str | BoxTable | None = None,
        every_n_frames: int = 1,
        **options: Any,
    ) -> list[dict[str, Any]]:
        """``iter_predictions`` as a list (images, folders and videos; see the CLI)."""
        return list(self.iter_predictions(paths, face, boxes, every_n_frames, **options))


def _tracked(processed: Iterable[tuple[_Job, list[_Sample]]]) -> Iterator[_Sample]:
    """The samples with the track ids of the faces of each video (tracks by box overlap)."""
    tracker, video = None, None
    for job, samples in processed:
        if job.kind == "video" and job.frame is not None:
            if job.path != video:
                tracker, video = tracks.FaceTracker(), job.path
            scored = [s for s in samples if s.row["face_x"] is not None]
            boxes = [tuple(s.row[c] for c in FACE_COLUMNS) for s in scored]
            for sample, track_id in zip(scored, tracker.update(boxes), strict=True):
                sample.row["track_id"] = track_id
        yield from samples
