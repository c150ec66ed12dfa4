"""Faces of a video linked into tracks by box overlap, and smoothing along a track."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from affect_jax.predict.faces import Box

TRACK_MIN_IOU = 0.3  # Least overlap of a face with a track's last box to continue the track.
TRACK_MAX_GAP = 5  # Scored frames a track may miss (a detector's miss) and still continue.


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    union = aw * ah + bw * bh - w * h
    return w * h / union if union > 0 else 0.0


class FaceTracker:
    """Track ids for the faces of consecutive frames: each face continues the track whose last
    box it overlaps most (one face per track, an optimal assignment by IoU), or starts one."""

    def __init__(self, min_iou: float = TRACK_MIN_IOU, max_gap: int = TRACK_MAX_GAP):
        self.min_iou = min_iou
        self.max_gap = max_gap
        self._tracks: dict[int, tuple[Box, int]] = {}  # id -> (last box, frames since seen)
        self._next_id = 0

    def update(self, boxes: Sequence[Box]) -> list[int]:
        """The track id of each box of the next frame (the frame's boxes, any order)."""
        ids = list(self._tracks)
        ids_of_boxes: list[int | None] = [None] * len(boxes)
        if ids and boxes:
            iou = np.array([[box_iou(b, self._tracks[t][0]) for t in ids] for b in boxes])
            from scipy import optimize  # videos only: images do not pay for its import

            rows, cols = optimize.linear_sum_assignment(iou, maximize=True)
            for r, c in zip(rows, cols, strict=True):
                if iou[r, c] >= self.min_iou:
                    ids_of_boxes[r] = ids[c]
        for t in ids:
            box, missed = self._tracks[t]
            if t not in ids_of_boxes:
                if missed + 1 > self.max_gap:
                    del self._tracks[t]
                else:
                    self._tracks[t] = (box, missed + 1)
        for i, box in enumerate(boxes):
            if ids_of_boxes[i] is None:
                ids_of_boxes[i] = self._next_id
                self._next_id += 1
            self._tracks[ids_of_boxes[i]] = (box, 0)
        return ids_of_boxes


class TrackSmoother:
    """Exponential moving averages along each track (any key, e.g. (video, track id)):
    ``alpha`` weighs the newest frame."""

    def __init__(self, alpha: float):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"smooth={alpha}; expected a weight in (0, 1]")
        self.alpha = alpha
        self._state: dict[Hashable, np.ndarray] = {}

    def __call__(self, track_id: Hashable, values: np.ndarray) -> np.ndarray:
        """The track's average after adding ``values`` (e.g. probabilities, valence, arousal)."""
        values = np.asarray(values, np.float64)
        previous = self._state.get(track_id)
        if previous is not None:
            values = self.alpha * values + (1.0 - self.alpha) * previous
        self._state[track_id] = values
        return values
