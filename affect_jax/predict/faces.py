"""Faces of prediction: which faces of an image to score, box tables from a CSV, crops.

``--face`` picks where faces come from: 'auto' (detect; where nothing is found, the whole image,
as a tight face crop needs), 'detect' (detect; nothing found is status 'no_face'), 'none' (the
whole image) or 'box' (boxes from a CSV). Every face says where it came from (``source``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from affect_jax.data.images import crop_box

FACE_MODES = ("auto", "detect", "none", "box")
FACE_SELECTIONS = ("all", "largest")
SOURCE_DETECTED = "detected"
SOURCE_WHOLE_IMAGE = "whole_image"
SOURCE_BOX = "box"
STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
BOX_COLUMNS = ("path", "face_x", "face_y", "face_width", "face_height")
FACE_COLUMNS = ("face_x", "face_y", "face_width", "face_height")
# MTCNN's five landmarks; left and right as seen in the image (the left eye has the smaller x).
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
LANDMARK_COLUMNS = tuple(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy")

Box = tuple[float, float, float, float]  # x, y, width, height
Crop = tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive)
Landmarks = tuple[tuple[float, float], ...]  # (x, y) per LANDMARK_NAMES
BoxTable = Mapping[tuple[str, int | None], Sequence[Box]]


@dataclasses.dataclass(frozen=True)
class Face:
    """One face of an image, in the image's pixels.

    Attributes:
      box: x, y, width, height.
      source: SOURCE_DETECTED, SOURCE_WHOLE_IMAGE or SOURCE_BOX.
      confidence: the detector's confidence (None where it gives none).
      landmarks: (x, y) of LANDMARK_NAMES (None where the detector gives none).
    """

    box: Box
    source: str
    confidence: float | None = None
    landmarks: Landmarks | None = None


@dataclasses.dataclass(frozen=True)
class FaceOptions:
    """How faces are found and cropped (the CLI's flags of the same names).

    Attributes:
      face: where faces come from, one of FACE_MODES.
      faces: 'all' detected faces of an image or frame, or the 'largest' one.
      align: rotate each face that has landmarks so its eyes are level before the run's
        preprocessing.
      boxes: the box table of face='box' (``read_boxes``).
    """

    face: str = "auto"
    faces: str = "all"
    align: bool = False
    boxes: BoxTable | None = None

    def check(self) -> None:
        """Raises ValueError naming the field that holds an unknown value."""
        if self.face not in FACE_MODES:
            raise ValueError(f"face={self.face!r}; expected one of {FACE_MODES}")
        if self.faces not in FACE_SELECTIONS:
            raise ValueError(f"faces={self.faces!r}; expected one of {FACE_SELECTIONS}")
        if self.face == "box" and self.boxes is None:
            raise ValueError(
                "face='box' needs boxes (a CSV path, face_x, face_y, face_width, "
                "face_height[, frame])"
            )


def whole_image(image: np.ndarray) -> Face:
    """The whole image as one face."""
    height, width = image.shape[:2]
    return Face((0.0, 0.0, float(width), float(height)), SOURCE_WHOLE_IMAGE)


def path_key(path: str) -> str:
    """How a box table names a file: its resolved, case-normalised path."""
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
            raise ValueError(
                f"{csv_path}: missing columns {missing} (has {columns}); expected "
                f"{', '.join(BOX_COLUMNS)}[, frame]"
            )
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
            for candidate in {path_key(p) for p in candidates}:
                table.setdefault((candidate, frame), []).append(box)
    return table


def table_boxes(table: BoxTable, path: str, frame: int | None) -> list[Box]:
    """The boxes of ``path`` (and ``frame``); a box without a frame holds for every frame."""
    key = path_key(path)
    return list(table.get((key, frame)) or table.get((key, None)) or [])


def select_faces(faces: Sequence[Face], which: str) -> list[Face]:
    """'all' faces left to right, or the 'largest' one."""
    if which not in FACE_SELECTIONS:
        raise ValueError(f"faces={which!r}; expected one of {FACE_SELECTIONS}")
    if which == "largest" and faces:
        return [max(faces, key=lambda f: f.box[2] * f.box[3])]
    return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


def find_faces(
    image: np.ndarray,
    mode: str,
    which: str = "all",
    detect: Callable[[np.ndarray], list[Face]] | None = None,
    boxes: Sequence[Box] = (),
    frame: int | None = None,
) -> tuple[list[Face], str | None]:
    """(faces to score, None) or ([], status saying why there is none) for one image or video
    frame (``frame``, None for an image).

    ``detect`` finds faces ('auto', 'detect'); ``boxes`` are the image's boxes ('box').
    """
    if mode == "none":
        return [whole_image(image)], None
    if mode == "box":
        if not boxes:
            what = "image" if frame is None else "frame"
            return [], f"no face box for this {what} in the box file"
        return [Face(tuple(map(float, b)), SOURCE_BOX) for b in boxes], None
    if mode not in FACE_MODES:
        raise ValueError(f"face={mode!r}; expected one of {FACE_MODES}")
    found = select_faces(detect(image), which)
    if found:
        return found, None
    if mode == "auto":
        return [whole_image(image)], None
    return [], STATUS_NO_FACE


def crop_window(face: Face, margin: float, width: int, height: int) -> Crop | None:
    """The face's box grown by ``margin`` (the run's ``data.face_margin``) of its size on each
    side and clipped to the image, as the official layout was cropped; None if outside."""
    return crop_box(face.box, margin, width, height)
