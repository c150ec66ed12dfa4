"""The ``Predictor``: a trained run scoring face crops, images, folders and videos.

The run's ``config.json`` fixes the architecture, classes, input size and preprocessing; every
face crop goes through the training pipeline's own resize and ``pipeline.preprocess`` and the
batches through ``steps.make_predict_step`` (the forward pass of validation's
``steps.make_eval_step``), so a crop is scored exactly as validation scores it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cv2
import jax
import numpy as np
import tensorflow as tf
from absl import logging

from affect_jax import distributed, metrics, run_dir, sharding, steps
from affect_jax.data import pipeline
from affect_jax.data.images import decode_error_text, read_image
from affect_jax.predict import faces, media
from affect_jax.predict.faces import FACE_COLUMNS, FACE_MODES, STATUS_NO_FACE, STATUS_OK

LOGGED_NO_FACE = 10  # Images/frames without a face logged one by one; the rest are counted.


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

    def __init__(
        self,
        workdir: str,
        which: str = "best",
        batch_size: int = 32,
        *,
        step: int | None = None,
        flip_tta: bool = False,
    ):
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
        self._detector = None  # built on first use: only --face=detect needs it
        self.prob_columns = [f"prob_{metrics.metric_key_name(c)}" for c in self.class_names]
        self.columns = [
            "path",
            "frame",
            "expression",
            *self.prob_columns,
            "valence",
            "arousal",
            *FACE_COLUMNS,
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

    def detect_face(self, image: np.ndarray) -> faces.Box | None:
        """The largest frontal face (x, y, w, h) in a uint8 RGB image, or None."""
        return self._face_detector().largest_face(image)

    def _face_detector(self) -> faces.LbpDetector:
        if self._detector is None:
            self._detector = faces.LbpDetector()
        return self._detector

    # -- files -----------------------------------------------------------------------------

    def _row(
        self, path: str, frame: int | None, status: str, crop: faces.Crop | None = None
    ) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(self.columns)
        row.update(path=path, frame=frame, status=status)
        if crop is not None:
            x0, y0, x1, y1 = crop
            row.update(face_x=x0, face_y=y0, face_width=x1 - x0, face_height=y1 - y0)
        return row

    def _samples(
        self, paths: Iterable[str], face: str, boxes: faces.BoxTable | None, every_n_frames: int
    ) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
        """(row, face crop or None) for every face, frame and input, in input order."""
        for path, kind, error in media.expand_inputs(paths):
            if error:
                yield self._row(path, None, error), None
                continue
            try:
                if kind == "image":
                    images = [(None, read_image(path))]
                else:
                    images = media.read_video(path, every_n_frames)
                for frame, image in images:
                    detector = self._face_detector() if face == "detect" else None
                    crops = faces.face_crops(
                        image, path, frame, face, self.face_margin, detector, boxes
                    )
                    for crop, status in crops:
                        if crop is None:
                            yield self._row(path, frame, status), None
                        else:
                            x0, y0, x1, y1 = crop
                            yield self._row(path, frame, status, crop), image[y0:y1, x0:x1]
            except OSError as e:
                yield self._row(path, None, f"cannot read file: {e.strerror or e}"), None
            except (tf.errors.OpError, ValueError, cv2.error) as e:
                what = "image" if kind == "image" else "video"
                message = decode_error_text(e) if isinstance(e, tf.errors.OpError) else str(e)
                yield self._row(path, None, f"cannot decode {what}: {message}"), None

    def iter_predictions(
        self,
        paths: Iterable[str],
        face: str = "none",
        boxes: str | faces.BoxTable | None = None,
        every_n_frames: int = 1,
        log_every: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """Rows (see ``columns``) for every image, sampled video frame and face, in input order.

        A file that cannot be used gives a row whose ``status`` says why (and a warning); no
        face gives status 'no_face'. Prediction fields of such rows are None.
        """
        if face not in FACE_MODES:
            raise ValueError(f"face={face!r}; expected one of {FACE_MODES}")
        if face == "box" and boxes is None:
            raise ValueError(
                "face='box' needs boxes (a CSV path, face_x, face_y, face_width, "
                "face_height[, frame])"
            )
        if every_n_frames < 1:
            raise ValueError(f"every_n_frames must be >= 1, got {every_n_frames}")
        if isinstance(boxes, (str, os.PathLike)):
            boxes = faces.read_boxes(os.fspath(boxes))
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
                logging.info(
                    "Predicted %d faces in %.1f s (%.1f faces/s); %d without a face, %d errors",
                    counts["ok"],
                    elapsed,
                    counts["ok"] / elapsed,
                    counts["no_face"],
                    counts["error"],
                )
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
                logging.warning("%s%s: %s", row["path"], _frame_text(row["frame"]), row["status"])
            if len(waiting) == self.batch_size:
                yield from flush()
        yield from flush()
        logging.info(
            "Done in %.1f s: %d faces predicted, %d images/frames without a face, %d errors",
            time.time() - start,
            counts["ok"],
            counts["no_face"],
            counts["error"],
        )

    def predict_files(
        self,
        paths: Iterable[str],
        face: str = "none",
        boxes: str | faces.BoxTable | None = None,
        every_n_frames: int = 1,
    ) -> list[dict[str, Any]]:
        """``iter_predictions`` as a list (images, folders and videos; see the CLI)."""
        return list(self.iter_predictions(paths, face, boxes, every_n_frames))


def _frame_text(frame: int | None) -> str:
    return "" if frame is None else f" frame {frame}"
