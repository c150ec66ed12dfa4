"""Faces of prediction: the face detector, box tables from a CSV, and the crops to score."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from affect_jax.data.images import crop_box

FACE_MODES = ("none", "detect", "box")
STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
DETECT_MAX_SIDE = 640  # Detection searches a copy downscaled to this side.
DETECT_MIN_FACE = 24  # Smallest face searched, in pixels of that copy.
BOX_COLUMNS = ("path", "face_x", "face_y", "face_width", "face_height")
FACE_COLUMNS = ("face_x", "face_y", "face_width", "face_height")

Box = tuple[float, float, float, float]  # x, y, width, height
Crop = tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive)
BoxTable = Mapping[tuple[str, int | None], Sequence[Box]]


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


class LbpDetector:
    """The largest frontal face of an image by an LBP cascade.

    OpenCV 5 dropped its Haar cascades (``cv2.CascadeClassifier`` and the XML files are gone),
    so this uses the LBP frontal-face cascade from OpenCV that scikit-image ships
    (``skimage.data.lbp_frontal_face_cascade_filename``): nothing is downloaded.
    """

    def __init__(self):
        try:
            from skimage import data as skdata
            from skimage import feature
        except ImportError:
            raise RuntimeError(
                "--face=detect needs scikit-image: pip install scikit-image"
            ) from None
        self._cascade = feature.Cascade(skdata.lbp_frontal_face_cascade_filename())

    def largest_face(self, image: np.ndarray) -> Box | None:
        """The largest frontal face (x, y, w, h) in a uint8 RGB image, or None."""
        height, width = image.shape[:2]
        # Detection on a copy at most DETECT_MAX_SIDE px wide: the cascade's cost grows with
        # the pixel count, and faces small enough to vanish there are too small to score.
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(
                gray,
                (max(1, round(width * scale)), max(1, round(height * scale))),
                interpolation=cv2.INTER_AREA,
            )
        side = min(gray.shape)
        if side < DETECT_MIN_FACE:
            return None
        faces = self._cascade.detect_multi_scale(
            img=gray,
            scale_factor=1.2,
            step_ratio=1.2,
            min_size=(DETECT_MIN_FACE,) * 2,
            max_size=(side, side),
            min_neighbor_number=4,
        )
        if not faces:
            return None
        face = max(faces, key=lambda f: f["width"] * f["height"])
        return tuple(float(face[k]) / scale for k in ("c", "r", "width", "height"))


def face_crops(
    image: np.ndarray,
    path: str,
    frame: int | None,
    face: str,
    margin: float,
    detector: LbpDetector | None = None,
    boxes: BoxTable | None = None,
) -> list[tuple[Crop | None, str]]:
    """(crop, status) per face to score in ``image``: the face box grown by ``margin`` (the
    run's ``data.face_margin``) and clipped, exactly as the official layout was cropped."""
    height, width = image.shape[:2]
    if face == "none":
        return [((0, 0, width, height), STATUS_OK)]
    if face == "detect":
        found = detector.largest_face(image)
        if found is None:
            return [(None, STATUS_NO_FACE)]
        face_boxes = [found]
    else:
        key, table = path_key(path), boxes or {}
        # A box without a frame number holds for every frame of a video.
        face_boxes = table.get((key, frame)) or table.get((key, None)) or []
        if not face_boxes:
            what = "image" if frame is None else "frame"
            return [(None, f"no face box for this {what} in the box file")]
    result = []
    for box in face_boxes:
        crop = crop_box(box, margin, width, height)
        outside = f"face box {box} lies outside the {width}x{height} image"
        result.append((crop, STATUS_OK if crop else outside))
    return result
