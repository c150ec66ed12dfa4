"""Face finding for prediction without a trained run: detectors, face choice, alignment, tracks
and the parallel map (affect_jax.predict.{detectors,faces,align,tracks,parallel})."""

import threading
import time

import numpy as np
import pytest

from affect_jax.predict import align, detectors, faces, parallel, tracks
from tests import face_images


@pytest.fixture(scope="module")
def mtcnn():
    return detectors.MtcnnDetector()


def _inside(point, box):
    x, y, w, h = box
    return x <= point[0] <= x + w and y <= point[1] <= y + h


def test_mtcnn_finds_both_faces_with_landmarks_inside(mtcnn):
    found = faces.select_faces(mtcnn.detect(face_images.two_astronauts()), "all")
    assert len(found) == 2
    for face, offset in zip(found, (0, 512), strict=True):
        x, y, w, h = face_images.ASTRONAUT_FACE
        assert tracks.box_iou(face.box, (x + offset, y, w, h)) > 0.7, face.box
        assert face.source == "detected" and face.confidence > 0.99
        assert len(face.landmarks) == len(faces.LANDMARK_NAMES)
        assert all(_inside(p, face.box) for p in face.landmarks)
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
        assert lx < nx < rx and mlx < mrx and max(ly, ry) < ny < min(mly, mry)
    largest = faces.select_faces(found, "largest")
    assert largest == [max(found, key=lambda f: f.box[2] * f.box[3])]


def test_mtcnn_confidence_threshold_and_tiny_images(mtcnn):
    image = face_images.astronaut()
    (face,) = mtcnn.detect(image)
    try:
        mtcnn.min_confidence = face.confidence - 1e-4
        assert mtcnn.detect(image) == [face]
        mtcnn.min_confidence = face.confidence + 1e-4  # below the threshold: dropped
        assert mtcnn.detect(image) == []
    finally:
        mtcnn.min_confidence = detectors.DEFAULT_MIN_CONFIDENCE
    # Searched at 96 pixels a side, the face is still found, in the image's own pixels.
    (small,) = detectors.MtcnnDetector(max_side=96).detect(image)
    assert tracks.box_iou(small.box, face.box) > 0.6
    assert mtcnn.detect(np.zeros((8, 8, 3), np.uint8)) == []
    assert mtcnn.detect(np.full((96, 96, 3), 128, np.uint8)) == []


def test_large_images_are_searched_downscaled(mtcnn):
    """A 1024x1024 photo is searched at 640 px; boxes come back in its own pixels."""
    import cv2

    big = cv2.resize(face_images.astronaut(), (1024, 1024), interpolation=cv2.INTER_CUBIC)
    (face,) = mtcnn.detect(big)
    x, y, w, h = face_images.ASTRONAUT_FACE
    assert tracks.box_iou(face.box, (2 * x, 2 * y, 2 * w, 2 * h)) > 0.7


def test_auto_scores_a_tight_crop_whole(mtcnn):
    crop = face_images.tight_crop()
    assert mtcnn.detect(crop) == []
    found, status = faces.find_faces(crop, "auto", "all", mtcnn.detect)
    assert status is None and found == [faces.whole_image(crop)]
    assert found[0].source == "whole_image" and found[0].box == (0, 0, crop.shape[1], crop.shape[0])
    assert faces.find_faces(crop, "detect", "all", mtcnn.detect) == ([], "no_face")
    found, _ = faces.find_faces(face_images.astronaut(), "auto", "all", mtcnn.detect)
    assert [f.source for f in found] == ["detected"]


def test_face_modes_without_a_detector():
    image = np.zeros((30, 40, 3), np.uint8)
    assert faces.find_faces(image, "none") == ([faces.Face((0, 0, 40, 30), "whole_image")], None)
    found, status = faces.find_faces(image, "box", boxes=[(1, 2, 3, 4), (5, 6, 7, 8)])
    assert status is None and [(f.box, f.source) for f in found] == [
        ((1, 2, 3, 4), "box"),
        ((5, 6, 7, 8), "box"),
    ]
    no_box = "no face box for this frame in the box file"
    assert faces.find_faces(image, "box", frame=3) == ([], no_box)
    with pytest.raises(ValueError, match="face='faces'"):
        faces.find_faces(image, "faces")
    with pytest.raises(ValueError, match="faces='biggest'"):
        faces.FaceOptions(faces="biggest").check()


def test_lbp_detector_stays_available():
    found = detectors.make_detector("lbp").detect(face_images.astronaut())
    (face,) = faces.select_faces(found, "largest")
    assert tracks.box_iou(face.box, face_images.ASTRONAUT_FACE) > 0.3, face.box
    assert face.confidence is None and face.landmarks is None
    with pytest.raises(ValueError, match="detector='haar'"):
        detectors.make_detector("haar")


def test_eye_level_matrix_levels_the_eyes():
    landmarks = ((40.0, 60.0), (80.0, 45.0), (62.0, 70.0), (45.0, 90.0), (78.0, 85.0))
    matrix = align.eye_level_matrix(landmarks, (10, 20, 110, 140))
    (lx, ly), (rx, ry) = align.transform_points(matrix, landmarks)[:2]
    assert ly == pytest.approx(ry, abs=1e-9) and lx < rx
    assert rx - lx == pytest.approx(np.hypot(40, 15))  # a rotation: the distance stays
    assert align.eye_angle(landmarks) == pytest.approx(np.degrees(np.arctan2(-15, 40)))


@pytest.mark.parametrize("degrees", [25, -20])
def test_align_levels_a_rotated_face(mtcnn, degrees):
    image = face_images.rotated_astronaut(degrees)
    (face,) = mtcnn.detect(image)
    assert abs(align.eye_angle(face.landmarks) + degrees) < 5  # the head is tilted
    crop = faces.crop_window(face, 0.3, image.shape[1], image.shape[0])
    aligned = align.aligned_crop(image, face.landmarks, crop)
    assert aligned.shape == (crop[3] - crop[1], crop[2] - crop[0], 3)
    (again,) = mtcnn.detect(aligned)  # the detector, run on the aligned crop, sees level eyes
    assert abs(align.eye_angle(again.landmarks)) < 2
    expected = align.transform_points(align.eye_level_matrix(face.landmarks, crop), face.landmarks)
    np.testing.assert_allclose(np.array(again.landmarks)[:2], expected[:2], atol=3)


def test_tracker_keeps_ids_and_starts_new_ones():
    tracker = tracks.FaceTracker(max_gap=1)
    a, b = (100, 10, 40, 40), (10, 10, 40, 40)
    assert tracker.update([a]) == [0]
    assert tracker.update([(104, 12, 40, 40)]) == [0]
    assert tracker.update([b, (108, 12, 40, 40)]) == [1, 0]  # a new face, listed first
    assert tracker.update([(12, 10, 40, 40)]) == [1]  # face 0 missed one frame ...
    assert tracker.update([(110, 12, 40, 40), (14, 10, 40, 40)]) == [0, 1]  # ... and is back
    assert tracker.update([]) == []
    assert tracker.update([]) == []
    assert tracker.update([(110, 12, 40, 40)]) == [2]  # gone longer than max_gap: a new track
    assert tracks.box_iou(a, a) == 1.0 and tracks.box_iou(a, b) == 0.0


def test_smoother_is_an_exponential_moving_average_per_track():
    smooth = tracks.TrackSmoother(0.25)
    np.testing.assert_allclose(smooth(0, [1.0, 0.0]), [1.0, 0.0])
    np.testing.assert_allclose(smooth(1, [0.0, 1.0]), [0.0, 1.0])
    np.testing.assert_allclose(smooth(0, [0.0, 1.0]), [0.75, 0.25])
    np.testing.assert_allclose(smooth(0, [0.0, 1.0]), [0.5625, 0.4375])
    with pytest.raises(ValueError, match="smooth=0"):
        tracks.TrackSmoother(0)


def test_ordered_map_keeps_order_and_raises_in_place():
    def slow_square(x):
        time.sleep(0.01 * (x % 3))
        return x * x

    assert list(parallel.ordered_map(slow_square, range(20), workers=3, ahead=4)) == [
        x * x for x in range(20)
    ]

    def fail_at_five(x):
        if x == 5:
            raise KeyError(x)
        return x

    got = []
    with pytest.raises(KeyError):
        for x in parallel.ordered_map(fail_at_five, range(10), workers=2, ahead=2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_ordered_map_stops_early_without_running_everything():
    started = []
    lock = threading.Lock()

    def record(x):
        with lock:
            started.append(x)
        return x

    mapped = parallel.ordered_map(record, iter(range(10_000)), workers=2, ahead=3)
    assert [next(mapped) for _ in range(3)] == [0, 1, 2]
    mapped.close()
    assert len(started) < 20


def test_a_detector_handed_over_goes_to_one_thread_only():
    """``ThreadDetectors.add`` (the CLI builds one while the model loads): the first thread
    that needs a detector takes it and keeps it; the next thread builds its own."""
    pool = detectors.ThreadDetectors("lbp")
    handed = object()
    pool.add(handed)
    got = []
    for _ in range(2):
        thread = threading.Thread(target=lambda: got.append((pool.get(), pool.get())))
        thread.start()
        thread.join()
    (first, again), (second, _) = got
    assert first is handed and again is handed
    assert isinstance(second, detectors.LbpDetector)
