"""Prediction of a trained run on your own images, folders of images and videos.

``Predictor`` is the Python API (``predictor.py``); it streams files and videos in input
order with ``stream.py``, a face's crop prepared by ``samples.py`` into a row of ``rows.py``,
with the time per stage in ``timing.py``. Faces: which faces of an image to score and
box tables (``faces.py``), the MTCNN and LBP detectors (``detectors.py``), eye-level alignment
(``align.py``), video face tracks and smoothing (``tracks.py``). Inputs: files, folders and
video frames (``media.py``), read ahead of the model by a few threads (``parallel.py``). The
command line, ``python -m affect_jax.predict``, is ``cli.py``.
"""

from affect_jax.predict.detectors import DETECTORS, LbpDetector, MtcnnDetector, make_detector
from affect_jax.predict.faces import (
    BOX_COLUMNS,
    FACE_COLUMNS,
    FACE_MODES,
    FACE_SELECTIONS,
    LANDMARK_COLUMNS,
    LANDMARK_NAMES,
    STATUS_NO_FACE,
    STATUS_OK,
    Box,
    BoxTable,
    Crop,
    Face,
    FaceOptions,
    find_faces,
    read_boxes,
)
from affect_jax.predict.media import VIDEO_EXTENSIONS, expand_inputs, read_video
from affect_jax.predict.predictor import Predictor
from affect_jax.predict.tracks import FaceTracker, TrackSmoother

__all__ = [
    "BOX_COLUMNS",
    "DETECTORS",
    "FACE_COLUMNS",
    "FACE_MODES",
    "FACE_SELECTIONS",
    "LANDMARK_COLUMNS",
    "LANDMARK_NAMES",
    "STATUS_NO_FACE",
    "STATUS_OK",
    "VIDEO_EXTENSIONS",
    "Box",
    "BoxTable",
    "Crop",
    "Face",
    "FaceOptions",
    "FaceTracker",
    "LbpDetector",
    "MtcnnDetector",
    "Predictor",
    "TrackSmoother",
    "expand_inputs",
    "find_faces",
    "make_detector",
    "read_boxes",
    "read_video",
]
