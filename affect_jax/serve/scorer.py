"""The served run: ``predict``'s Predictor and face handling behind the three calls the server
makes (find the faces of an image, score a batch of face crops, describe the model).

This is the server's only use of ``affect_jax.predict``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from affect_jax import predict
from affect_jax.data.images import crop_box

FACE_MODES = ("auto", "detect", "none")
SOURCE_DETECTED = "detected"
SOURCE_WHOLE_IMAGE = "whole_image"


@dataclasses.dataclass(frozen=True)
class Face:
    """One face of an image: the region the network sees (x, y, width, height, pixels of the
    image), how it was found, and its uint8 RGB crop."""

    box: tuple[int, int, int, int]
    source: str
    crop: np.ndarray


def step_sizes(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes a model call uses: powers of two below ``max_batch``, then it.

    A call pads its faces to the smallest of these that holds them, so one face does not pay
    for a whole ``max_batch`` step, and each size compiles once.
    """
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return (*sizes, max_batch) if sizes[-1] != max_batch else tuple(sizes)


def _f32(value: Any) -> float:
    """The shortest decimal that round-trips the float32 value (as the CLI writes it)."""
    return float(str(np.float32(value)))


class FaceScorer:
    """A trained run loaded once: face finding and batched scoring for the server.

    Args:
      workdir: the run directory (``config.json`` and ``checkpoints/``).
      which: 'best' or 'latest' checkpoint; ``step`` picks one by number instead.
      max_batch: most faces in one model call.
      flip_tta: average over a horizontally flipped copy.
    """

    def __init__(self, workdir: str, which: str = "best", *, step: int | None = None,
                 max_batch: int = 8, flip_tta: bool = False):
        self.max_batch = int(max_batch)
        self.step_sizes = step_sizes(self.max_batch)
        self._predictor = predict.Predictor(workdir, which, self.max_batch, step=step,
                                            flip_tta=flip_tta)
        self._detect_lock = threading.Lock()  # one cascade, used by one thread at a time
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
        """The faces to score in a uint8 RGB image.

        'none': the whole image; 'detect': the largest frontal face, or none; 'auto': that
        face, else the whole image. Boxes are grown by the run's ``data.face_margin`` and
        clipped, as the prediction command line crops them.
        """
        if face not in FACE_MODES:
            raise ValueError(f"face={face!r}; expected one of {', '.join(FACE_MODES)}")
        height, width = image.shape[:2]
        if face != "none":
            with self._detect_lock:
                found = self._predictor.detect_face(image)
            if found is not None:
                crop = crop_box(found, self._predictor.face_margin, width, height)
                if crop is not None:
                    return [_face(image, crop, SOURCE_DETECTED)]
            if face == "detect":
                return []
        return [_face(image, (0, 0, width, height), SOURCE_WHOLE_IMAGE)]

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
                "probs": {c: _f32(v) for c, v in zip(self.class_names, probs, strict=True)},
                "valence": _f32(va[0]),
                "arousal": _f32(va[1]),
            }
            for expression, probs, va in zip(out["expression"], out["probs"],
                                             out["valence_arousal"], strict=True)
        ]

    def warm_up(self) -> None:
        """Compiles every step size now rather than on a first request."""
        size = self._predictor.image_size
        for n in self.step_sizes:
            self.score([np.zeros((size, size, 3), np.uint8)] * n)


def _face(image: np.ndarray, crop: tuple[int, int, int, int], source: str) -> Face:
    x0, y0, x1, y1 = crop
    return Face((x0, y0, x1 - x0, y1 - y0), source, image[y0:y1, x0:x1])
