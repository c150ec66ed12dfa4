"""The served run: ``predict``'s Predictor and face handling behind the three calls the server
makes (find the faces of an image, score a batch of face crops, describe the model).

This is the server's only use of ``affect_jax.predict``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from affect_jax import predict
from affect_jax.predict import align as face_align
from affect_jax.predict import detectors
from affect_jax.predict.faces import crop_window
from affect_jax.predict.rows import f32

FACE_MODES = tuple(m for m in predict.FACE_MODES if m != "box")  # boxes come from a file
FACE_SELECTIONS = predict.FACE_SELECTIONS
DETECTORS = predict.DETECTORS
DEFAULT_MIN_CONFIDENCE = detectors.DEFAULT_MIN_CONFIDENCE
DETECT_MAX_SIDE = detectors.DETECT_MAX_SIDE


@dataclasses.dataclass(frozen=True)
class Face:
    """One face of an image to score: its uint8 RGB crop and what the answer tells about it.

    ``box`` is the region the network sees (x, y, width, height in the image's pixels: the
    found face grown by the run's ``data.face_margin`` and clipped, as the prediction command
    line reports it); ``source`` 'detected' or 'whole_image'; ``confidence`` and ``landmarks``
    (x, y of ``predict.LANDMARK_NAMES``) where the detector gives them.
    """

    crop: np.ndarray
    box: tuple[int, int, int, int]
    source: str
    confidence: float | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None

    def description(self) -> dict[str, Any]:
        """The face's fields of the JSON answer (all but the crop)."""
        out: dict[str, Any] = {"box": list(self.box), "source": self.source}
        if self.confidence is not None:
            out["confidence"] = f32(self.confidence)
        if self.landmarks is not None:
            out["landmarks"] = {
                name: [round(float(x), 2), round(float(y), 2)]
                for name, (x, y) in zip(predict.LANDMARK_NAMES, self.landmarks, strict=True)
            }
        return out


def step_sizes(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes a model call uses: powers of two below ``max_batch``, then it.

    A call pads its faces to the smallest of these that holds them, so one face does not pay
    for a whole ``max_batch`` step, and each size compiles once.
    """
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return (*sizes, max_batch) if sizes[-1] != max_batch else tuple(sizes)


class FaceScorer:
    """A trained run loaded once: face finding and batched scoring for the server.

    Args:
      workdir: the run directory (``config.json`` and ``checkpoints/``).
      which: 'best' or 'latest' checkpoint; ``step`` picks one by number instead.
      max_batch: most faces in one model call.
      flip_tta: average over a horizontally flipped copy.
      detector, min_face_confidence, detect_size: face detection, as the prediction command
        line's flags of the same names.
    """

    def __init__(
        self,
        workdir: str,
        which: str = "best",
        *,
        step: int | None = None,
        max_batch: int = 8,
        flip_tta: bool = False,
        detector: str = "mtcnn",
        min_face_confidence: float = DEFAULT_MIN_CONFIDENCE,
        detect_size: int = DETECT_MAX_SIDE,
    ):
        self.max_batch = int(max_batch)
        self.step_sizes = step_sizes(self.max_batch)
        self._predictor = predict.Predictor(
            workdir,
            which,
            self.max_batch,
            step=step,
            flip_tta=flip_tta,
            detector=detector,
            min_face_confidence=min_face_confidence,
            detect_size=detect_size,
        )
        p = self._predictor
        self.class_names = [str(c) for c in p.class_names]
        self.info = {
            "run": os.path.basename(os.path.normpath(workdir)),
            "backbone": str(p.config.model.name),
            "width": float(p.config.model.width),
            "classes": self.class_names,
            "image_size": p.image_size,
            "preprocessing": p.preprocessing,
            "checkpoint_step": int(p.step),
            "flip_tta": bool(flip_tta),
            "detector": detector,
            "face_modes": list(FACE_MODES),
        }

    def load_detector(self) -> None:
        """Builds this thread's detector now (RuntimeError if its package is missing)."""
        self._predictor.load_detector()

    def find_faces(
        self, image: np.ndarray, face: str = "auto", faces: str = "all", align: bool = False
    ) -> list[Face]:
        """The faces to score in a uint8 RGB image, left to right.

        ``face``: 'auto' every detected face, else the whole image; 'detect' only detected
        faces (possibly none); 'none' the whole image. ``faces``: 'all' or the 'largest'.
        ``align``: rotate faces with landmarks so their eyes are level. Call from any thread
        (each thread has its own detector).
        """
        if face not in FACE_MODES:
            raise ValueError(f"face={face!r}; expected one of {', '.join(FACE_MODES)}")
        found, _ = predict.find_faces(image, face, faces, self._predictor.detect_faces)
        height, width = image.shape[:2]
        result = []
        for f in found:
            crop = crop_window(f, self._predictor.face_margin, width, height)
            if crop is None:  # a detection wholly outside the image: nothing to score
                continue
            x0, y0, x1, y1 = crop
            if align and f.landmarks is not None:
                pixels = face_align.aligned_crop(image, f.landmarks, crop)
            else:
                pixels = image[y0:y1, x0:x1]
            result.append(
                Face(pixels, (x0, y0, x1 - x0, y1 - y0), f.source, f.confidence, f.landmarks)
            )
        return result

    def score(self, crops: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """``expression``, ``probs`` (class -> p), ``valence``, ``arousal`` of each crop, in one
        model call padded to the smallest step size that holds them (call from one thread)."""
        if not crops:
            return []
        p = self._predictor
        # The Predictor pads every step to its batch_size: set it to this call's step size.
        p.batch_size = next((s for s in self.step_sizes if s >= len(crops)), self.max_batch)
        out = p.predict(list(crops))
        return [
            {
                "expression": str(expression),
                "probs": {c: f32(v) for c, v in zip(self.class_names, probs, strict=True)},
                "valence": f32(va[0]),
                "arousal": f32(va[1]),
            }
            for expression, probs, va in zip(
                out["expression"], out["probs"], out["valence_arousal"], strict=True
            )
        ]

    def warm_up(self) -> None:
        """Compiles every step size now rather than on a first request."""
        size = self._predictor.image_size
        for n in self.step_sizes:
            self.score([np.zeros((size, size, 3), np.uint8)] * n)
