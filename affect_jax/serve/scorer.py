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
from affect_jax.predict.faces import crop_window, find_faces
from affect_jax.predict.rows import f32

FACE_MODES = ("auto", "detect", "none")


@dataclasses.dataclass(frozen=True)
class Face:
    """One face of an image: the region the network sees (x, y, width, height, pixels of the
    image), how it was found, and its uint8 RGB crop."""

    box: tuple[int, int, int, int]
    source: str
    crop: np.ndarray
    confidence: float | None = None  # the detector's, for detected faces
    landmarks: tuple[tuple[float, float], ...] | None = None  # eyes, nose, mouth corners

    def description(self) -> dict[str, Any]:
        """The face's JSON fields besides its scores."""
        out: dict[str, Any] = {"box": list(self.box), "source": self.source}
        if self.confidence is not None:
            out["confidence"] = self.confidence
        if self.landmarks is not None:
            out["landmarks"] = [list(point) for point in self.landmarks]
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
    """

    def __init__(
        self,
        workdir: str,
        which: str = "best",
        *,
        step: int | None = None,
        max_batch: int = 8,
        flip_tta: bool = False,
    ):
        self.max_batch = int(max_batch)
        self.step_sizes = step_sizes(self.max_batch)
        self._predictor = predict.Predictor(
            workdir, which, self.max_batch, step=step, flip_tta=flip_tta
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
            "face_modes": list(FACE_MODES),
        }

    def find_faces(self, image: np.ndarray, face: str) -> list[Face]:
        """Every face to score in a uint8 RGB image, left to right, as the prediction command
        line finds them: 'none' the whole image; 'detect' every detected face (none if none is
        found); 'auto' those, else the whole image. Boxes are grown by the run's
        ``data.face_margin`` and clipped."""
        if face not in FACE_MODES:
            raise ValueError(f"face={face!r}; expected one of {', '.join(FACE_MODES)}")
        height, width = image.shape[:2]
        found, _ = find_faces(image, face, "all", self._predictor.detect_faces)
        faces = []
        for f in found:
            crop = crop_window(f, self._predictor.face_margin, width, height)
            if crop is not None:
                faces.append(_face(image, crop, f))
        return faces

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


def _face(image: np.ndarray, crop: tuple[int, int, int, int], found: predict.Face) -> Face:
    x0, y0, x1, y1 = crop
    landmarks = (
        None if found.landmarks is None else tuple((float(x), float(y)) for x, y in found.landmarks)
    )
    confidence = None if found.confidence is None else float(found.confidence)
    return Face(
        (x0, y0, x1 - x0, y1 - y0), found.source, image[y0:y1, x0:x1], confidence, landmarks
    )
