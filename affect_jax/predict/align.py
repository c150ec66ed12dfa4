"""Eye-level alignment: a face crop rotated about its centre so that the eyes lie level."""

from __future__ import annotations

import math

import cv2
import numpy as np

from affect_jax.predict.faces import LANDMARK_NAMES, Crop, Landmarks

LEFT_EYE = LANDMARK_NAMES.index("left_eye")
RIGHT_EYE = LANDMARK_NAMES.index("right_eye")


def eye_angle(landmarks: Landmarks) -> float:
    """Degrees the line from the left to the right eye turns from the horizontal (y down)."""
    (lx, ly), (rx, ry) = landmarks[LEFT_EYE], landmarks[RIGHT_EYE]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def eye_level_matrix(landmarks: Landmarks, crop: Crop) -> np.ndarray:
    """The 2x3 affine map from image pixels to the aligned crop's pixels: a rotation about the
    crop's centre that levels the eyes, then the crop's offset."""
    x0, y0, x1, y1 = crop
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    # OpenCV's positive angle turns the image counter-clockwise on screen, which lowers a
    # right eye that lies above the left one by exactly ``eye_angle``.
    matrix = cv2.getRotationMatrix2D(centre, eye_angle(landmarks), 1.0)
    matrix[:, 2] -= (x0, y0)
    return matrix


def transform_points(matrix: np.ndarray, points: Landmarks) -> np.ndarray:
    """Points [N, 2] mapped by a 2x3 affine matrix."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def aligned_crop(image: np.ndarray, landmarks: Landmarks, crop: Crop) -> np.ndarray:
    """The crop window of ``image`` rotated so the eyes are level (the same size; pixels the
    rotation brings in from outside the image repeat its border)."""
    x0, y0, x1, y1 = crop
    return cv2.warpAffine(
        image,
        eye_level_matrix(landmarks, crop),
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
