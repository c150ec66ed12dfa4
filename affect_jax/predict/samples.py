"""The faces of an image as samples: a row each and, for a face to score, its network input.

A face's crop is its box grown by the run's ``data.face_margin`` and clipped to the image,
eye-levelled on request where the face has landmarks, then prepared by ``Predictor.prepare``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from affect_jax.predict import align
from affect_jax.predict.faces import (
    STATUS_OK,
    Face,
    FaceOptions,
    crop_window,
    find_faces,
    table_boxes,
)

if TYPE_CHECKING:
    from affect_jax.predict.predictor import Predictor


@dataclasses.dataclass
class Sample:
    """One row to write and, for a face to score, its network input."""

    row: dict[str, Any]
    input: np.ndarray | None = None


def face_samples(
    predictor: Predictor,
    image: np.ndarray,
    path: str,
    frame: int | None,
    found: Sequence[Face],
    align_faces: bool,
) -> list[Sample]:
    """A sample per face of ``image``: its crop prepared for the network, or a row saying why
    it cannot be scored."""
    height, width = image.shape[:2]
    samples = []
    for index, face in enumerate(found):
        crop = crop_window(face, predictor.face_margin, width, height)
        status = (
            STATUS_OK if crop else f"face box {face.box} lies outside the {width}x{height} image"
        )
        row = predictor.layout.face_row(path, frame, index, face, crop, status)
        if crop is None:
            samples.append(Sample(row))
            continue
        x0, y0, x1, y1 = crop
        if align_faces and face.landmarks is not None:
            pixels = align.aligned_crop(image, face.landmarks, crop)
        else:
            pixels = image[y0:y1, x0:x1]
        with predictor.timings.timed("prepare"):
            samples.append(Sample(row, predictor.prepare(pixels)))
    return samples


def image_samples(
    predictor: Predictor,
    image: np.ndarray,
    path: str,
    frame: int | None,
    options: FaceOptions,
    found: Sequence[Face] | None = None,
) -> list[Sample]:
    """The samples of one image or frame; ``found``: detected faces to use instead of running
    the detector (a video frame that reuses an earlier frame's)."""
    detect = predictor.detect_faces if found is None else (lambda _: list(found))
    boxes = table_boxes(options.boxes, path, frame) if options.face == "box" else ()
    chosen, status = find_faces(image, options.face, options.faces, detect, boxes, frame)
    if status is not None:
        return [Sample(predictor.layout.row(path, frame, status))]
    return face_samples(predictor, image, path, frame, chosen, options.align)
