"""Rows of files, folders and videos, in input order, streamed through a ``Predictor``.

Files are read, faces detected and crops prepared by a few threads ahead of the model
(``parallel.ordered_map``); the faces of each video are linked into tracks and, on request,
smoothed along them; rows come out in input order, progress and problems logged as they pass.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import threadpoolctl
from absl import logging

from affect_jax.data.images import read_image
from affect_jax.predict import media, parallel, tracks
from affect_jax.predict.faces import FACE_COLUMNS, STATUS_NO_FACE, STATUS_OK, FaceOptions
from affect_jax.predict.samples import Sample, image_samples
from affect_jax.predict.timing import StageTimes

if TYPE_CHECKING:
    from affect_jax.predict.predictor import Predictor

LOGGED_NO_FACE = 10  # Images/frames without a face logged one by one; the rest are counted.


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """How videos are sampled, tracked and smoothed, and how often progress is logged.

    Attributes:
      every_n_frames: score every so many frames of a video.
      detect_every: detection runs on every so many scored frames; the frames between reuse
        its faces.
      smooth: the weight of the newest frame in an exponential moving average of the
        probabilities, valence and arousal along each track (None: no smoothing).
      log_every: progress logged every so many faces (0: nothing logged).
    """

    every_n_frames: int = 1
    detect_every: int = 1
    smooth: float | None = None
    log_every: int = 0

    def check(self) -> None:
        """Raises ValueError naming the field that holds a value out of range."""
        if self.every_n_frames < 1:
            raise ValueError(f"every_n_frames must be >= 1, got {self.every_n_frames}")
        if self.detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {self.detect_every}")
        if self.smooth is not None:
            tracks.TrackSmoother(self.smooth)  # checks the weight


@dataclasses.dataclass
class Job:
    """One image file or one decoded video frame (or an input that cannot be used)."""

    path: str
    kind: str | None
    error: str | None = None
    frame: int | None = None
    image: np.ndarray | None = None
    # Video frames: the faces of the frame that runs detection, shared with the frames after it
    # that reuse them (detect_every); ``detect`` says whether this frame sets them.
    faces: futures.Future | None = None
    detect: bool = True


def frame_text(frame: int | None) -> str:
    return "" if frame is None else f" frame {frame}"


def predictions(
    predictor: Predictor, paths: Iterable[str], options: FaceOptions, settings: StreamSettings
) -> Iterator[dict[str, Any]]:
    """Rows for every image, sampled video frame and face of ``paths``, in input order (see
    ``Predictor.iter_predictions``); resets ``predictor.timings``.

    Until the last row, NumPy's matrix products (MTCNN's layers, the crops' resize) run on one
    thread each: the workers run side by side and the model uses the cores meanwhile, and BLAS
    threads on top of them contend for the same cores.
    """
    predictor.timings = StageTimes()
    every, detect_every = settings.every_n_frames, settings.detect_every
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        processed = parallel.ordered_map(
            lambda job: (job, process(predictor, job, options)),
            jobs(predictor, paths, every, detect_every),
            predictor.workers,
            ahead=2 * predictor.batch_size,
        )
        yield from scored(predictor, tracked(processed), settings.smooth, settings.log_every)


def jobs(
    predictor: Predictor, paths: Iterable[str], every_n_frames: int, detect_every: int
) -> Iterator[Job]:
    """The inputs as jobs: image files (read by the workers) and decoded video frames."""
    for path, kind, error in media.expand_inputs(paths):
        if error or kind == "image":
            yield Job(path, kind, error)
            continue
        found: futures.Future | None = None
        try:
            frames = media.read_video(path, every_n_frames)
            while True:
                with predictor.timings.timed("decode"):
                    item = next(frames, None)
                if item is None:
                    break
                frame, image = item
                detect = found is None or (frame // every_n_frames) % detect_every == 0
                if detect:
                    found = futures.Future()
                yield Job(path, kind, None, frame, image, found, detect)
        except (ValueError, cv2.error) as e:
            yield Job(path, kind, f"cannot decode video: {e}")


def process(predictor: Predictor, job: Job, options: FaceOptions) -> list[Sample]:
    """The samples of one job (run by the worker threads)."""
    row = predictor.layout.row
    if job.error:
        return [Sample(row(job.path, job.frame, job.error))]
    try:
        if job.kind == "image":
            with predictor.timings.timed("decode"):
                image = read_image(job.path, turn_upright=True)
            return image_samples(predictor, image, job.path, None, options)
        uses_detector = options.face in ("auto", "detect")
        if not uses_detector:
            return image_samples(predictor, job.image, job.path, job.frame, options)
        if job.detect:
            try:
                job.faces.set_result(predictor.detect_faces(job.image))
            except BaseException as e:  # the frames that reuse these faces fail alike
                job.faces.set_exception(e)
        # Set by this job or an earlier frame's (submitted first, so running or done).
        found = job.faces.result()
        return image_samples(predictor, job.image, job.path, job.frame, options, found)
    except OSError as e:
        return [Sample(row(job.path, None, f"cannot read file: {e.strerror or e}"))]
    except (ValueError, cv2.error) as e:
        what = "image" if job.kind == "image" else "video"
        return [Sample(row(job.path, job.frame, f"cannot decode {what}: {e}"))]


def tracked(processed: Iterable[tuple[Job, list[Sample]]]) -> Iterator[Sample]:
    """The samples with the track ids of the faces of each video (tracks by box overlap)."""
    tracker, video = None, None
    for job, samples in processed:
        if job.kind == "video" and job.frame is not None:
            if job.path != video:
                tracker, video = tracks.FaceTracker(), job.path
            faces = [s for s in samples if s.row["face_x"] is not None]
            boxes = [tuple(s.row[c] for c in FACE_COLUMNS) for s in faces]
            for sample, track_id in zip(faces, tracker.update(boxes), strict=True):
                sample.row["track_id"] = track_id
        yield from samples


def scored(
    predictor: Predictor, samples: Iterable[Sample], smooth: float | None, log_every: int = 0
) -> Iterator[dict[str, Any]]:
    """Rows in order: samples batched through the model (smoothed along video tracks with
    ``smooth``), others as they are; progress logged every ``log_every`` faces."""
    progress = Progress(log_every)
    pending: list[dict[str, Any]] = []  # rows in order; some wait for their prediction
    waiting: list[Sample] = []
    smoother = tracks.TrackSmoother(smooth) if smooth is not None else None

    def flush() -> Iterator[dict[str, Any]]:
        if waiting:
            with predictor.timings.timed("model"):
                probs, va = predictor.run_batch([s.input for s in waiting])
            for sample, p, v in zip(waiting, probs, va, strict=True):
                track = sample.row["track_id"]
                if smoother is not None and track is not None:  # rows come in frame order
                    p, v = np.split(smoother((sample.row["path"], track), [*p, *v]), [len(p)])
                predictor.layout.fill(sample.row, p, v)
            waiting.clear()
        yield from pending
        pending.clear()
        progress.log_progress()

    for sample in samples:
        pending.append(sample.row)
        if sample.input is not None:
            waiting.append(sample)
            progress.faces += 1
        elif not waiting:  # nothing to wait for: out at once (a long faceless video)
            yield from flush()
        progress.note_status(sample.row)
        if len(waiting) == predictor.batch_size:
            yield from flush()
    yield from flush()
    progress.log_done(predictor.timings)


class Progress:
    """Counts of faces predicted, images/frames without a face and errors; with ``log_every``
    (0: silent) the counts are logged every so many faces, problems as they come."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.faces = self.no_face = self.errors = 0
        self.start = time.time()
        self.next_log = log_every

    def note_status(self, row: dict[str, Any]) -> None:
        """Counts (and logs) a row without a face or with an error."""
        if row["status"] == STATUS_NO_FACE:
            self.no_face += 1
            if self.log_every and self.no_face <= LOGGED_NO_FACE:
                logging.info(
                    "%s%s: no face found%s",
                    row["path"],
                    frame_text(row["frame"]),
                    " (further ones are only counted)" if self.no_face == LOGGED_NO_FACE else "",
                )
        elif row["status"] != STATUS_OK:
            self.errors += 1
            if self.log_every:
                logging.warning("%s%s: %s", row["path"], frame_text(row["frame"]), row["status"])

    def log_progress(self) -> None:
        """Logs the counts once another ``log_every`` faces are predicted."""
        if not self.log_every or self.faces < self.next_log:
            return
        elapsed = time.time() - self.start
        logging.info(
            "Predicted %d faces in %.1f s (%.1f faces/s); %d without a face, %d errors",
            self.faces,
            elapsed,
            self.faces / elapsed,
            self.no_face,
            self.errors,
        )
        self.next_log = (self.faces // self.log_every + 1) * self.log_every

    def log_done(self, timings: dict[str, float]) -> None:
        """Logs the totals and the time per stage."""
        if self.log_every:
            logging.info(
                "Done in %.1f s: %d faces predicted, %d images/frames without a face, %d errors "
                "(time spent, summed over threads: %s)",
                time.time() - self.start,
                self.faces,
                self.no_face,
                self.errors,
                ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
            )
