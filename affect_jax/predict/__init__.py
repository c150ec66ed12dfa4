"""Prediction of a trained run on your own images, folders of images and videos.

``Predictor`` is the Python API (``predictor.py``); face finding and box tables are in
``faces.py``, expanding inputs and reading video frames in ``media.py``, and the command line
(``python -m affect_jax.predict``) in ``cli.py``.
"""

from affect_jax.predict.faces import (
    BOX_COLUMNS,
    FACE_COLUMNS,
    FACE_MODES,
    STATUS_NO_FACE,
    STATUS_OK,
    Box,
    BoxTable,
    Crop,
    LbpDetector,
    face_crops,
    read_boxes,
)
from affect_jax.predict.media import VIDEO_EXTENSIONS, expand_inputs, read_video
from affect_jax.predict.predictor import Predictor

__all__ = [
    "BOX_COLUMNS",
    "FACE_COLUMNS",
    "FACE_MODES",
    "STATUS_NO_FACE",
    "STATUS_OK",
    "VIDEO_EXTENSIONS",
    "Box",
    "BoxTable",
    "Crop",
    "LbpDetector",
    "Predictor",
    "expand_inputs",
    "face_crops",
    "read_boxes",
    "read_video",
]
