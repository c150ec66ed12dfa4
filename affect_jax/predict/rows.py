"""The rows prediction writes: their columns, and how a face and its scores fill one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from affect_jax import metrics
from affect_jax.predict.faces import FACE_COLUMNS, LANDMARK_COLUMNS, Crop, Face


def f32(value: Any) -> float:
    """The shortest decimal that round-trips the float32 value (short, exact CSV/JSON)."""
    return float(str(np.float32(value)))


class RowLayout:
    """The columns of a run's rows (one probability column per class) and their filling."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = class_names
        self.prob_columns = [f"prob_{metrics.metric_key_name(c)}" for c in class_names]
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

    def row(self, path: str, frame: int | None, status: str) -> dict[str, Any]:
        """A row of ``path`` (and video ``frame``) with ``status`` and every other field None."""
        row: dict[str, Any] = dict.fromkeys(self.columns)
        row.update(path=path, frame=frame, status=status)
        return row

    def face_row(
        self, path: str, frame: int | None, index: int, face: Face, crop: Crop | None, status: str
    ) -> dict[str, Any]:
        """The row of face ``index``: how it was found, its landmarks and its ``crop``."""
        row = self.row(path, frame, status)
        row.update(face_index=index, face_source=face.source)
        if face.confidence is not None:
            row["face_confidence"] = f32(face.confidence)
        if face.landmarks is not None:
            values = [round(v, 2) for point in face.landmarks for v in point]
            row.update(zip(LANDMARK_COLUMNS, values, strict=True))
        if crop is not None:
            x0, y0, x1, y1 = crop
            row.update(face_x=x0, face_y=y0, face_width=x1 - x0, face_height=y1 - y0)
        return row

    def fill(self, row: dict[str, Any], probs: np.ndarray, va: np.ndarray) -> None:
        """Writes a prediction (class probabilities, valence and arousal) into its row."""
        row["expression"] = self.class_names[int(np.argmax(probs))]
        for column, value in zip(self.prob_columns, probs, strict=True):
            row[column] = f32(value)
        row["valence"], row["arousal"] = f32(va[0]), f32(va[1])
