"""Face detectors: MTCNN (faces, confidences, five landmarks) and the LBP frontal-face cascade.

Both search a copy of the image downscaled to at most ``max_side`` pixels a side (their cost
grows steeply with the pixel count, and faces small enough to vanish there are too small to
score well) and return faces in the original image's pixels. Nothing is downloaded: MTCNN's
weights are inside the ``mtcnn`` wheel (run by ``mtcnn_numpy``, without TensorFlow), the cascade
inside scikit-image (see third_party/README.md).
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from affect_jax.predict import mtcnn_numpy
from affect_jax.predict.faces import SOURCE_DETECTED, Face

DETECTORS = ("mtcnn", "lbp")
DETECT_MAX_SIDE = 640  # Detection searches a copy downscaled to this side.
LBP_MIN_FACE = 24  # Smallest face the cascade searches, in pixels of that copy.
MTCNN_MIN_FACE = 20  # Smallest face MTCNN searches (its own default), pixels of that copy.
MTCNN_MIN_SIDE = 12  # MTCNN's smallest input (its proposal network's window).
DEFAULT_MIN_CONFIDENCE = 0.9


def _downscaled(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image at most ``max_side`` pixels on its longer side, and the scale applied."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image, scale


class MtcnnDetector:
    """Faces by MTCNN (the ``mtcnn`` package's nets and pipeline, ``mtcnn_numpy``): box,
    confidence and five landmarks each.

    Args:
      min_confidence: faces whose final-stage (ONet) confidence is below are dropped.
      max_side: the longest side of the searched copy.
    """

    def __init__(
        self, min_confidence: float = DEFAULT_MIN_CONFIDENCE, max_side: int = DETECT_MAX_SIDE
    ):
        self.min_confidence = float(min_confidence)
        self.max_side = int(max_side)
        self._mtcnn = mtcnn_numpy.Mtcnn()  # a RuntimeError of one line without the package

    def detect(self, image: np.ndarray) -> list[Face]:
        """Every face in a uint8 RGB image, in the image's pixels."""
        small, scale = _downscaled(image, self.max_side)
        if min(small.shape[:2]) < MTCNN_MIN_SIDE:
            return []
        found = self._mtcnn.detect_faces(
            small, min_face_size=MTCNN_MIN_FACE, threshold_onet=self.min_confidence
        )
        # Rows: image index, x, y, width, height, confidence, the landmarks' five x then five y.
        faces = []
        for row in np.asarray(found, np.float64).reshape(-1, 16):
            if row[5] < self.min_confidence:
                continue
            box = tuple(float(v) / scale for v in row[1:5])
            landmarks = tuple(
                (float(x) / scale, float(y) / scale)
                for x, y in zip(row[6:11], row[11:16], strict=True)
            )
            faces.append(Face(box, SOURCE_DETECTED, float(row[5]), landmarks))
        return faces


class LbpDetector:
    """Frontal faces by the LBP cascade from OpenCV that scikit-image ships (boxes only).

    OpenCV 5 dropped its Haar cascades (``cv2.CascadeClassifier`` and the XML files are gone);
    this one is ``skimage.data.lbp_frontal_face_cascade_filename()``.
    """

    def __init__(self, max_side: int = DETECT_MAX_SIDE):
        self.max_side = int(max_side)
        try:
            from skimage import data as skdata
            from skimage import feature
        except ImportError:
            raise RuntimeError(
                "--detector=lbp needs scikit-image: pip install scikit-image"
            ) from None
        self._cascade = feature.Cascade(skdata.lbp_frontal_face_cascade_filename())

    def detect(self, image: np.ndarray) -> list[Face]:
        """Every frontal face in a uint8 RGB image, in the image's pixels (no confidence)."""
        small, scale = _downscaled(image, self.max_side)
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        side = min(gray.shape)
        if side < LBP_MIN_FACE:
            return []
        found = self._cascade.detect_multi_scale(
            img=gray,
            scale_factor=1.2,
            step_ratio=1.2,
            min_size=(LBP_MIN_FACE,) * 2,
            max_size=(side, side),
            min_neighbor_number=4,
        )
        return [
            Face(tuple(float(f[k]) / scale for k in ("c", "r", "width", "height")), SOURCE_DETECTED)
            for f in found
        ]


def make_detector(
    name: str, min_confidence: float = DEFAULT_MIN_CONFIDENCE, max_side: int = DETECT_MAX_SIDE
):
    """The detector called ``name`` (one of DETECTORS); ``min_confidence`` is MTCNN's."""
    if name == "mtcnn":
        return MtcnnDetector(min_confidence, max_side)
    if name == "lbp":
        return LbpDetector(max_side)
    raise ValueError(f"detector={name!r}; expected one of {DETECTORS}")


class ThreadDetectors:
    """One detector per thread, built on first use (the detectors are not known to be
    thread-safe) or handed over by ``add``; the settings are checked at once.

    Args:
      name: one of DETECTORS.
      min_confidence: MTCNN faces below this confidence are dropped.
      max_side: the longest side of the searched copy.
    """

    def __init__(
        self,
        name: str,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        max_side: int = DETECT_MAX_SIDE,
    ):
        if name not in DETECTORS:
            raise ValueError(f"detector={name!r}; expected one of {DETECTORS}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_face_confidence={min_confidence}; expected 0 to 1")
        if max_side < LBP_MIN_FACE:
            raise ValueError(f"detect_size={max_side}; expected at least {LBP_MIN_FACE} pixels")
        self.name = name
        self.min_confidence = float(min_confidence)
        self.max_side = int(max_side)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._spare: list = []  # built elsewhere, for the next threads that need one

    def add(self, detector) -> None:
        """Hands ``detector`` (built with these settings, e.g. in the background while the
        model loads) to the first thread that needs one; no two threads share it."""
        with self._lock:
            self._spare.append(detector)

    def get(self):
        """This thread's detector. Raises RuntimeError if its package is missing."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            with self._lock:
                detector = self._spare.pop() if self._spare else None
            if detector is None:
                detector = make_detector(self.name, self.min_confidence, self.max_side)
            self._local.detector = detector
        return detector
