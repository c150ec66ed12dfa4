"""Face images for the face-finding and prediction tests, made from ``skimage.data.astronaut()``
(no network): two faces on one canvas, a crop too tight for a detector, a rotated face and a
video of moving faces."""

from __future__ import annotations

import cv2
import numpy as np
from skimage import data

# The astronaut's face, (x, y, width, height), as MTCNN boxes it (it leaves out the hair).
ASTRONAUT_FACE = (182, 64, 83, 107)
# A crop from the eyebrows to the chin: a face, but too tight for MTCNN to find one.
TIGHT_CROP = (185, 80, 77, 80)  # x, y, width, height


def astronaut() -> np.ndarray:
    return data.astronaut()


def two_astronauts() -> np.ndarray:
    """The astronaut twice, side by side: [512, 1024, 3], faces at x ~ 182 and 694."""
    image = astronaut()
    return np.concatenate([image, image], axis=1)


def tight_crop() -> np.ndarray:
    x, y, w, h = TIGHT_CROP
    return astronaut()[y : y + h, x : x + w]


def rotated_astronaut(degrees: float) -> np.ndarray:
    """The astronaut turned ``degrees`` counter-clockwise about its face (a tilted head)."""
    x, y, w, h = ASTRONAUT_FACE
    matrix = cv2.getRotationMatrix2D((x + w / 2, y + h / 2), degrees, 1.0)
    return cv2.warpAffine(astronaut(), matrix, (512, 512), borderMode=cv2.BORDER_REPLICATE)


def small_face() -> np.ndarray:
    """The astronaut's head at 80x85 pixels."""
    return cv2.resize(astronaut()[30:200, 140:300], (80, 85), interpolation=cv2.INTER_AREA)


def write_moving_faces_video(path: str, frames: int = 8, second_from: int = 3) -> None:
    """A 320x160 MJPG video: a face moving left from x=200, and from frame ``second_from`` a
    second face, mirrored, moving right from x=20 (so it is the left one, face_index 0)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 160))
    assert writer.isOpened()
    face = small_face()
    for i in range(frames):
        canvas = np.full((160, 320, 3), 90, np.uint8)
        right = 200 - 3 * i
        canvas[40:125, right : right + 80] = face
        if i >= second_from:
            left = 20 + 3 * i
            canvas[30:115, left : left + 80] = face[:, ::-1]
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    writer.release()
