"""affect_jax.predict: a tiny trained run scoring images, folders, a video and detected faces."""

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings

import cv2
import jax
import numpy as np
import pytest
import threadpoolctl
from PIL import Image

from affect_jax import evaluation, metrics, predict, run_dir, sharding, steps
from affect_jax.data import pipeline, synthetic
from affect_jax.data.images import ORIENTATION_TAG
from affect_jax.data.source import ExamplePool, decode_raw_image
from affect_jax.predict import align, faces, resume
from affect_jax.predict.tracks import box_iou
from tests import face_images
from tests.conftest import REPO, TINY_FLAGS

# skimage.data.astronaut(): the face lies roughly in x 150-260, y 40-160 (x, y, w, h).
ASTRONAUT_FACE = (150, 40, 110, 120)


def _cli(*args, python_options=()):
    cmd = [sys.executable, *python_options, "-m", "affect_jax.predict", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _imported(importtime_stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reports imported."""
    lines = importtime_stderr.splitlines()
    return {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}


def _write_rgb(path, image):
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _probs(rows, predictor):
    return np.array([[float(r[c]) for c in predictor.prob_columns] for r in rows])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run: 2 epochs of 2 steps (later flags override TINY_FLAGS)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    cmd = [
        sys.executable,
        "-m",
        "affect_jax.main",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        "--config.num_epochs=2",
        "--config.steps_per_epoch=2",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def predictor(trained_run):
    return predict.Predictor(trained_run, batch_size=4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Drawn faces (PNG, 40 px so the run's 32-px resize applies; one JPEG), a folder with a
    corrupt image and a text file, a 10-frame MJPG video, the astronaut and a blank image."""
    root = tmp_path_factory.mktemp("inputs")
    faces = synthetic.draw_faces(8, 40, 8, seed=7)["image"]
    (root / "faces" / "more").mkdir(parents=True)
    pngs = [root / "faces" / "a.png", root / "faces" / "b.png", root / "faces" / "more" / "c.png"]
    for path, image in zip(pngs, faces, strict=False):
        _write_rgb(path, image)
    _write_rgb(root / "faces" / "d.JPG", faces[3])
    (root / "mixed").mkdir()
    _write_rgb(root / "mixed" / "good.png", faces[4])
    (root / "mixed" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "mixed" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    video = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    assert video.isOpened()
    for i in range(10):  # 48x40 frames
        frame = np.pad(faces[i % 8], ((0, 0), (4, 4), (0, 0)))
        video.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    video.release()
    from skimage import data

    _write_rgb(root / "astronaut.png", data.astronaut())
    _write_rgb(root / "astronaut.jpg", data.astronaut())
    _write_rgb(root / "blank.png", np.full((96, 96, 3), 128, np.uint8))
    return {"root": root, "faces": faces[:3], "pngs": [str(p) for p in pngs]}


@pytest.fixture(scope="module")
def cli_csv(trained_run, inputs):
    """One CLI call over a folder, a mixed folder, a video and a missing file."""
    root = inputs["root"]
    out = root / "out.csv"
    result = _cli(
        f"--workdir={trained_run}",
        "--face=none",
        "--every_n_frames=3",
        f"--output={out}",
        "--batch_size=4",
        str(root / "faces"),
        str(root / "mixed"),
        str(root / "clip.avi"),
        str(root / "missing.jpg"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return (*_read_csv(out), result.stderr)


def test_csv_columns_rows_and_ranges(cli_csv, predictor, inputs):
    columns, rows, stderr = cli_csv
    names = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
    assert columns == (
        ["path", "frame", "face_index", "track_id", "expression"]
        + [f"prob_{n}" for n in names]
        + [
            "valence",
            "arousal",
            "face_x",
            "face_y",
            "face_width",
            "face_height",
            "face_source",
            "face_confidence",
        ]
        + [
            f"{p}_{a}"
            for p in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
            for a in "xy"
        ]
        + ["status"]
    )
    root = str(inputs["root"])
    got = [(os.path.relpath(r["path"], root), r["frame"], r["status"][:14]) for r in rows]
    assert got == [
        ("faces/a.png", "", "ok"),
        ("faces/b.png", "", "ok"),
        ("faces/d.JPG", "", "ok"),
        ("faces/more/c.png", "", "ok"),
        ("mixed/corrupt.jpg", "", "cannot decode "),
        ("mixed/good.png", "", "ok"),
        ("clip.avi", "0", "ok"),
        ("clip.avi", "3", "ok"),
        ("clip.avi", "6", "ok"),
        ("clip.avi", "9", "ok"),
        ("missing.jpg", "", "no such file o"),
    ]
    ok = [r for r in rows if r["status"] == "ok"]
    probs = _probs(ok, predictor)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert ((probs >= 0) & (probs <= 1)).all()
    for r, p in zip(ok, probs, strict=True):
        assert r["expression"] == predictor.class_names[int(p.argmax())]
        assert -1 <= float(r["valence"]) <= 1 and -1 <= float(r["arousal"]) <= 1
        size = (48, 40) if r["frame"] else (40, 40)  # face=none: the whole image
        assert [int(r[c]) for c in predict.FACE_COLUMNS] == [0, 0, *size]
        assert (r["face_index"], r["face_source"], r["face_confidence"]) == ("0", "whole_image", "")
        # A video's whole-frame faces form one track; images have none.
        assert r["track_id"] == ("0" if r["frame"] else "")
    bad = [r for r in rows if r["status"] != "ok"]
    assert all(r["expression"] == "" and r["valence"] == "" for r in bad)
    # The text file in a folder is skipped with a warning; the errors are logged too.
    assert "notes.txt" in stderr and "corrupt.jpg: cannot decode image" in stderr


def test_predictions_equal_the_eval_pipeline(cli_csv, predictor, inputs):
    """The CLI and Predictor.predict give what pipeline.eval_batches + predict_split give."""
    _, rows, _ = cli_csv
    faces = inputs["faces"]
    by_path = {r["path"]: r for r in rows}
    cli_probs = _probs([by_path[p] for p in inputs["pngs"]], predictor)
    pool = ExamplePool(
        {
            "image": faces,
            "expression": np.zeros(len(faces), np.int32),
            "valence": np.full(len(faces), np.nan, np.float32),
            "arousal": np.full(len(faces), np.nan, np.float32),
        },
        decode_raw_image,
    )
    mesh = sharding.make_mesh()
    _, graphdef, state = run_dir.restore_checkpoint(predictor.workdir, predictor.config, mesh)
    reference = evaluation.predict_split(
        jax.jit(steps.make_eval_steps(steps.make_eval_step(graphdef))),
        state,
        pipeline.eval_batches(pool, predictor.config, 16),
        mesh,
    )
    np.testing.assert_allclose(cli_probs, reference["probs"], atol=1e-5)
    api = predictor.predict(list(faces))
    np.testing.assert_allclose(api["probs"], reference["probs"], atol=1e-5)
    np.testing.assert_allclose(
        api["valence_arousal"], np.clip(reference["valence_arousal"], -1, 1), atol=1e-5
    )
    va = np.array(
        [[float(by_path[p]["valence"]), float(by_path[p]["arousal"])] for p in inputs["pngs"]]
    )
    np.testing.assert_allclose(va, api["valence_arousal"], atol=1e-5)


def test_reproduces_the_runs_validation_metrics(predictor, trained_run):
    """The best checkpoint, classes and preprocessing are the ones training scored."""
    final = json.load(open(os.path.join(trained_run, "final_metrics.json")))
    assert predictor.step == final["best_epoch"]
    assert list(predictor.class_names) == final["class_names"]
    validation = pipeline.make_splits(predictor.config).validation
    out = predictor.predict(synthetic.pool_images(validation))
    va_true = np.stack([validation.columns["valence"], validation.columns["arousal"]], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)
        got = metrics.compute_metrics(
            validation.labels, out["probs"], va_true, out["valence_arousal"], predictor.class_names
        )
    for key in ("accuracy", "f1_macro", "auc", "kappa", "valence_rmse", "arousal_rmse", "mean_ccc"):
        np.testing.assert_allclose(got[key], final["metrics"][key], atol=1e-5, err_msg=key)


def test_detect_finds_the_astronaut_and_reports_no_face(trained_run, inputs, tmp_path):
    """MTCNN on PNG and JPEG photos, without importing TensorFlow (its import would take most
    of a one-photo prediction's start-up); a phone photo stored on its side (EXIF orientation
    6) is read upright, its box in the upright image's pixels."""
    from skimage import data

    root = inputs["root"]
    sideways = tmp_path / "astronaut_sideways.jpg"
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6  # turn a quarter clockwise to show
    Image.fromarray(np.rot90(data.astronaut())).save(sideways, "JPEG", exif=exif.tobytes())
    steps = sorted(
        int(s) for s in os.listdir(os.path.join(trained_run, "checkpoints")) if s.isdigit()
    )
    checkpoint = os.path.join(trained_run, "checkpoints", str(steps[0]))
    result = _cli(
        f"--checkpoint={checkpoint}",
        "--face=detect",
        "--format=jsonl",
        str(root / "astronaut.png"),
        str(root / "blank.png"),
        str(root / "astronaut.jpg"),
        str(sideways),
        python_options=("-X", "importtime"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {steps[0]}" in result.stderr
    assert "warning:" not in result.stderr  # e.g. Orbax's notices about reading only
    imported = _imported(result.stderr)
    assert "jax" in imported and not imported & {"tensorflow", "keras", "mtcnn"}
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    astronaut, blank, astronaut_jpeg, turned = rows
    for row in (astronaut_jpeg, turned):
        assert row["status"] == "ok" and row["face_source"] == "detected", row["path"]
        assert box_iou([row[c] for c in predict.FACE_COLUMNS], ASTRONAUT_FACE) > 0.3, row["path"]
    assert astronaut["status"] == "ok" and astronaut["frame"] is None
    box = [astronaut[c] for c in predict.FACE_COLUMNS]
    assert box_iou(box, ASTRONAUT_FACE) > 0.3, box
    # MTCNN, the default detector: its confidence and five landmarks, inside the face.
    assert astronaut["face_source"] == "detected" and astronaut["face_confidence"] > 0.9
    assert astronaut["face_index"] == 0 and astronaut["track_id"] is None
    for name in predict.LANDMARK_NAMES:
        x, y = astronaut[f"{name}_x"], astronaut[f"{name}_y"]
        assert box[0] < x < box[0] + box[2] and box[1] < y < box[1] + box[3], name
    assert abs(sum(v for k, v in astronaut.items() if k.startswith("prob_")) - 1) < 1e-5
    assert blank["status"] == "no_face"
    assert blank["expression"] is None and blank["face_x"] is None
    assert "1 images/frames without a face" in result.stderr


def test_box_mode_scores_the_given_crops(predictor, inputs, tmp_path):
    root = inputs["root"]
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "path,face_x,face_y,face_width,face_height,frame\n"
        f"{root / 'astronaut.png'},150,40,110,120,\n"
        f"{root / 'astronaut.png'},600,600,10,10,\n"  # outside the image
        f"{os.path.relpath(root / 'clip.avi', tmp_path)},4,0,40,40,\n"  # relative: every frame
        f"{root / 'clip.avi'},0,0,20,20,5\n"  # frame 5 only
    )
    rows = predictor.predict_files(
        [str(root / "astronaut.png"), str(root / "clip.avi"), str(root / "blank.png")],
        face="box",
        boxes=str(boxes),
        every_n_frames=5,
    )
    got = [(r["frame"], r["status"][:16], [r[c] for c in predict.FACE_COLUMNS]) for r in rows]
    assert got == [
        (None, "ok", [150, 40, 110, 120]),
        (None, "face box (600.0,", [None] * 4),
        (0, "ok", [4, 0, 40, 40]),
        (5, "ok", [0, 0, 20, 20]),
        (None, "no face box for ", [None] * 4),
    ]
    assert [(r["face_index"], r["face_source"]) for r in rows] == [
        (0, "box"),
        (1, "box"),
        (0, "box"),
        (0, "box"),
        (None, None),
    ]
    from skimage import data

    crop = data.astronaut()[40:160, 150:260]
    np.testing.assert_allclose(
        [rows[0][c] for c in predictor.prob_columns],
        predictor.predict([crop])["probs"][0],
        atol=1e-5,
    )


def test_predictor_api(predictor, inputs):
    faces = inputs["faces"]
    mixed = [faces[0], np.zeros((17, 60, 3), np.uint8), faces[1][:, :30]]
    out = predictor.predict(mixed * 2)  # 6 images: two batches of 4, the last one padded
    assert out["class_names"] == predictor.class_names
    assert out["probs"].shape == (6, 8) and out["valence_arousal"].shape == (6, 2)
    np.testing.assert_allclose(out["probs"][:3], out["probs"][3:], atol=1e-6)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, atol=1e-5)
    assert np.abs(out["valence_arousal"]).max() <= 1.0
    assert list(out["expression"]) == [predictor.class_names[k] for k in out["probs"].argmax(1)]
    np.testing.assert_allclose(
        predictor.predict(faces)["probs"], predictor.predict(list(faces))["probs"], atol=1e-6
    )
    assert predictor.predict([])["probs"].shape == (0, 8)
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict([faces[0].astype(np.float32)])
    rows = predictor.predict_files(inputs["pngs"], face="none")
    assert [r["status"] for r in rows] == ["ok"] * 3
    np.testing.assert_allclose(
        _probs(rows, predictor), predictor.predict(faces)["probs"], atol=1e-5
    )


def test_nothing_predicted_exits_non_zero(trained_run, inputs):
    root = inputs["root"]
    result = _cli(
        f"--workdir={trained_run}",
        str(root / "mixed" / "corrupt.jpg"),
        str(root / "mixed" / "notes.txt"),
        str(root / "empty"),
    )
    assert result.returncode == 1
    statuses = [r["status"] for r in csv.DictReader(result.stdout.splitlines())]
    assert [s[:20] for s in statuses] == [
        "cannot decode image:",
        "unsupported format '",
        "no images or videos ",
    ]
    assert "Nothing could be predicted" in result.stderr


def test_face_flags_that_cannot_work_are_usage_errors(trained_run, inputs):
    result = _cli(f"--workdir={trained_run}", "--align", "--detector=lbp", inputs["pngs"][0])
    assert result.returncode == 2
    assert (
        "--align needs eye landmarks: --face=auto or detect with --detector=mtcnn (got "
        "--face=auto --detector=lbp)"
    ) in result.stderr
    with pytest.raises(ValueError, match="detector='haar'"):
        predict.Predictor(trained_run, detector="haar")


def test_missing_or_incomplete_run_is_a_clear_error(trained_run, tmp_path, inputs):
    missing = tmp_path / "no_such_run"
    result = _cli(f"--workdir={missing}", str(inputs["pngs"][0]))
    assert result.returncode == 1
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    with pytest.raises(FileNotFoundError, match="config.json"):
        predict.Predictor(str(tmp_path))
    (tmp_path / "config.json").write_text(open(os.path.join(trained_run, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        predict.Predictor(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Faces in the wild: detection (MTCNN), every face, whole-image fallback, alignment, video tracks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("face_files")
    images = {
        "two": face_images.two_astronauts(),
        "tight": face_images.tight_crop(),
        "tilted": face_images.rotated_astronaut(25),
    }
    paths = {}
    for name, image in images.items():
        paths[name] = str(root / f"{name}.png")
        _write_rgb(paths[name], image)
    paths["video"] = str(root / "moving.avi")
    face_images.write_moving_faces_video(paths["video"])
    return paths, images


def _crop(image, row):
    x, y, w, h = (row[c] for c in predict.FACE_COLUMNS)
    return image[y : y + h, x : x + w]


def test_every_face_gets_a_row_with_landmarks(predictor, face_files):
    paths, images = face_files
    rows = predictor.predict_files([paths["two"]])
    assert [(r["face_index"], r["face_source"], r["status"]) for r in rows] == [
        (0, "detected", "ok"),
        (1, "detected", "ok"),
    ]
    x, y, w, h = face_images.ASTRONAUT_FACE
    for row, offset in zip(rows, (0, 512), strict=True):
        box = [row[c] for c in predict.FACE_COLUMNS]
        assert box_iou(box, (x + offset, y, w, h)) > 0.5, box
        assert row["face_confidence"] > 0.99 and row["track_id"] is None
        for name in predict.LANDMARK_NAMES:  # original-image pixels, inside the face's box
            assert box[0] < row[f"{name}_x"] < box[0] + box[2], name
            assert box[1] < row[f"{name}_y"] < box[1] + box[3], name
    expected = predictor.predict([_crop(images["two"], r) for r in rows])["probs"]
    np.testing.assert_allclose(_probs(rows, predictor), expected, atol=1e-5)
    # The same rows for the image in memory; --faces=largest keeps one.
    in_memory = predictor.predict_image(images["two"], paths["two"])
    assert [r.keys() for r in in_memory] == [r.keys() for r in rows]
    np.testing.assert_allclose(_probs(in_memory, predictor), expected, atol=1e-5)
    (largest,) = predictor.predict_files([paths["two"]], faces="largest")
    assert largest["face_index"] == 0 and largest["face_source"] == "detected"


def test_a_tight_crop_is_scored_whole_under_auto(predictor, face_files):
    paths, images = face_files
    (row,) = predictor.predict_files([paths["tight"]])
    height, width = images["tight"].shape[:2]
    assert (row["face_source"], row["status"], row["face_confidence"]) == (
        "whole_image",
        "ok",
        None,
    )
    assert [row[c] for c in predict.FACE_COLUMNS] == [0, 0, width, height]
    np.testing.assert_allclose(
        _probs([row], predictor), predictor.predict([images["tight"]])["probs"], atol=1e-5
    )
    (row,) = predictor.predict_files([paths["tight"]], face="detect")
    assert row["status"] == "no_face" and row["expression"] is None


def test_align_scores_the_eye_level_crop(predictor, face_files):
    paths, images = face_files
    (row,) = predictor.predict_files([paths["tilted"]], align=True)
    (face,) = predictor.detect_faces(images["tilted"])
    crop = faces.crop_window(face, predictor.face_margin, 512, 512)
    assert [row[c] for c in predict.FACE_COLUMNS] == [
        crop[0],
        crop[1],
        crop[2] - crop[0],
        crop[3] - crop[1],
    ]
    levelled = align.aligned_crop(images["tilted"], face.landmarks, crop)
    np.testing.assert_allclose(
        _probs([row], predictor), predictor.predict([levelled])["probs"], atol=1e-5
    )
    (plain,) = predictor.predict_files([paths["tilted"]])  # off by default: the plain crop
    np.testing.assert_allclose(
        _probs([plain], predictor),
        predictor.predict([_crop(images["tilted"], plain)])["probs"],
        atol=1e-5,
    )


def test_video_faces_keep_their_track_ids(predictor, face_files):
    paths, _ = face_files
    rows = predictor.predict_files([paths["video"]])
    got = [(r["frame"], r["face_index"], r["track_id"]) for r in rows]
    # The right face is track 0 from frame 0; the left one appears at frame 3 as track 1 and
    # comes first in each frame (faces are numbered left to right).
    assert got == [(f, 0, 0) for f in range(3)] + [
        (f, i, t) for f in range(3, 8) for i, t in ((0, 1), (1, 0))
    ]
    # Detection every 3rd frame: the frames between reuse its boxes and tracks.
    sparse = predictor.predict_files([paths["video"]], detect_every=3)
    assert [(r["frame"], r["track_id"]) for r in sparse] == [(0, 0), (1, 0), (2, 0)] + [
        (f, t) for f in range(3, 8) for t in (1, 0)
    ]
    assert [r["face_x"] for r in sparse[:3]] == [rows[0]["face_x"]] * 3
    # Smoothing: an exponential moving average of each track's probabilities and valence.
    smooth = predictor.predict_files([paths["video"]], smooth=0.4)
    columns = [*predictor.prob_columns, "valence", "arousal"]
    for track in (0, 1):
        raw = np.array([[r[c] for c in columns] for r in rows if r["track_id"] == track])
        got = np.array([[r[c] for c in columns] for r in smooth if r["track_id"] == track])
        expected = [raw[0]]
        for values in raw[1:]:
            expected.append(0.4 * values + 0.6 * expected[-1])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    for r in smooth:
        assert (
            r["expression"]
            == predictor.class_names[int(np.argmax([r[c] for c in predictor.prob_columns]))]
        )


def test_threads_and_batches_do_not_change_the_rows(predictor, face_files, inputs):
    paths, _ = face_files
    files = [paths["two"], paths["tight"], str(inputs["root"] / "mixed"), paths["video"]]
    rows = predictor.predict_files(files, every_n_frames=2)
    threaded = predict.Predictor(predictor.workdir, batch_size=2, workers=3)
    again = threaded.predict_files(files, every_n_frames=2)
    assert [r["status"] for r in rows] == [r["status"] for r in again]
    for a, b in zip(rows, again, strict=True):
        assert {k: v for k, v in a.items() if k not in predictor.prob_columns} == pytest.approx(
            {k: v for k, v in b.items() if k not in predictor.prob_columns}, abs=1e-5
        )
    assert threaded.timings["detect"] > 0 and threaded.timings["model"] > 0


def _blas_threads() -> set[int]:
    return {
        pool["num_threads"]
        for pool in threadpoolctl.threadpool_info()
        if pool["user_api"] == "blas"
    }


def test_prediction_runs_blas_on_one_thread_and_restores_it(predictor, face_files):
    """While rows are produced (the workers detect side by side), not after."""
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        rows = predictor.iter_predictions([face_files[0]["two"]])
        next(rows)
        assert _blas_threads() == {1}
        list(rows)
        assert _blas_threads() == {2}


def test_a_few_images_run_in_a_batch_their_size(tmp_path):
    """Unset --batch_size: one photo runs as a batch of 1 (a call pads to its batch), a few as
    the next power of two; folders, videos or an explicit size keep the requested size."""
    from affect_jax.predict.cli import batch_size_for

    photos = []
    for i in range(5):
        photos.append(str(tmp_path / f"p{i}.jpg"))
        cv2.imwrite(photos[-1], np.zeros((8, 8, 3), np.uint8))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    assert batch_size_for(photos[:1], 32, False, 1) == 1
    assert batch_size_for(photos[:3], 32, False, 1) == 4
    assert batch_size_for(photos, 4, False, 1) == 4
    assert batch_size_for(photos[:1], 32, False, 2) == 2  # split over 2 devices
    assert batch_size_for(photos[:1], 32, True, 1) == 32
    assert batch_size_for([*photos[:1], str(video)], 32, False, 1) == 32
    assert batch_size_for([str(tmp_path)], 32, False, 1) == 32


# ---------------------------------------------------------------------------------------------
# --resume: an interrupted prediction continued into its output file
# ---------------------------------------------------------------------------------------------


def test_resume_completes_an_interrupted_output_without_redoing_whole_inputs(
    trained_run, inputs, tmp_path
):
    """Cut an output inside the video's rows, half a line at the end (as a kill leaves it),
    and break every image file it holds whole: --resume keeps their rows (a redone image would
    become a 'cannot decode' row), predicts the video again and what follows it, and ends
    with the uninterrupted run's file."""
    root = tmp_path / "in"
    shutil.copytree(inputs["root"] / "faces", root / "faces")
    shutil.copytree(inputs["root"] / "mixed", root / "mixed")
    shutil.copy(inputs["root"] / "clip.avi", root / "clip.avi")
    shutil.copy(inputs["root"] / "blank.png", root / "blank.png")
    args = [f"--workdir={trained_run}", "--face=none", "--every_n_frames=3", "--batch_size=4"]
    paths = [str(root / name) for name in ("faces", "mixed", "clip.avi", "blank.png")]
    full = tmp_path / "full.csv"
    result = _cli(*args, f"--output={full}", *paths)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = full.read_bytes().splitlines(keepends=True)
    first_video_row = next(i for i, line in enumerate(lines) if b"clip.avi" in line)
    assert lines[first_video_row + 3].count(b"clip.avi") == 1  # 4 sampled frames
    cut = tmp_path / "cut.csv"
    cut.write_bytes(b"".join(lines[: first_video_row + 2]) + lines[first_video_row + 2][:25])
    whole_images = [line.split(b",")[0].decode() for line in lines[1:first_video_row]]
    for path in whole_images:
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n broken after the interruption")

    result = _cli(*args, f"--output={cut}", "--resume", *paths)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming {cut}: 6 of 8 inputs done (6 rows kept, 5 ok)" in result.stderr
    header, resumed = _read_csv(cut)
    expected_header, expected = _read_csv(full)
    assert header == expected_header and len(resumed) == len(expected)
    for got, want in zip(resumed, expected, strict=True):
        for column in header:
            if column.startswith("prob_") or column in ("valence", "arousal"):
                if want[column]:
                    assert abs(float(got[column]) - float(want[column])) < 1e-5, column
            else:
                assert got[column] == want[column], column


def test_resume_refuses_another_runs_file_and_keeps_it(trained_run, inputs, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("path,score\nx.jpg,0.5\n")
    result = _cli(f"--workdir={trained_run}", f"--output={other}", "--resume", inputs["pngs"][0])
    assert result.returncode == 1
    assert f"--output={other}: its first line is not this run's CSV header" in result.stderr
    assert "Traceback" not in result.stderr
    assert other.read_text() == "path,score\nx.jpg,0.5\n"
    result = _cli(f"--workdir={trained_run}", "--resume", inputs["pngs"][0])
    assert result.returncode == 2 and "--resume continues into a file: give --output" in (
        result.stderr
    )


# An MP4 track header's display matrix (16.16 fixed point a, b, c, d) for each rotation: what a
# phone writes for a video recorded upright in portrait.
_DISPLAY_MATRIX = {90: (0, 1, -1, 0), 180: (-1, 0, 0, -1), 270: (0, -1, 1, 0)}


def _rotated_mp4(data: bytes, degrees: int) -> bytes:
    """The MP4 ``data`` with its (version 0) track header saying: show turned ``degrees``
    clockwise."""
    out = bytearray(data)
    box = out.find(b"tkhd")
    assert box > 0 and out[box + 4] == 0, "one version-0 track header expected"
    matrix = box + 4 + 4 + 20 + 16  # after version/flags, times/ids/duration, layer..volume
    a, b, c, d = (v << 16 for v in _DISPLAY_MATRIX[degrees])
    out[matrix : matrix + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    return bytes(out)


@pytest.mark.parametrize("degrees,quarter_turns", [(90, -1), (180, 2), (270, 1)])
def test_a_rotated_phone_video_is_read_upright(tmp_path, degrees, quarter_turns):
    """A video whose track says to show it turned (a phone's portrait video) gives its frames
    turned so, as players show it: each the stored frame turned ``degrees`` clockwise."""
    frames = [np.zeros((40, 56, 3), np.uint8) for _ in range(3)]
    for i, frame in enumerate(frames):
        frame[2:12, 3 + i : 20 + i] = (255, 40, 40)  # a corner block: any turn moves it
    stored = tmp_path / "stored.mp4"
    writer = cv2.VideoWriter(str(stored), cv2.VideoWriter_fourcc(*"mp4v"), 10, (56, 40))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    turned = tmp_path / "turned.mp4"
    turned.write_bytes(_rotated_mp4(stored.read_bytes(), degrees))
    as_stored = [frame for _, frame in predict.read_video(str(stored))]
    upright = [frame for _, frame in predict.read_video(str(turned))]
    assert len(upright) == len(as_stored) == 3
    for got, want in zip(upright, as_stored, strict=True):
        np.testing.assert_array_equal(got, np.rot90(want, quarter_turns))


def test_a_file_named_twice_is_predicted_once(tmp_path, caplog):
    """Folders and files that overlap (a folder and a file in it, two spellings of one path)
    give each path once, at its first place, and a warning counts the repeats; a link is a
    path of its own (a folder of links to one photo is as many inputs), and errors are kept
    as named."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"")
    os.symlink(folder / "a.jpg", tmp_path / "link.jpg")
    named = [
        str(tmp_path / "link.jpg"),
        str(folder),
        str(folder / "b.png"),
        f"{tmp_path}/./photos/a.jpg",
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "missing.jpg"),
    ]
    with caplog.at_level("WARNING"):
        got = list(predict.expand_inputs(named))
    assert [(os.path.basename(p), kind) for p, kind, _ in got] == [
        ("link.jpg", "image"),
        ("a.jpg", "image"),
        ("b.png", "image"),
        ("missing.jpg", None),
        ("missing.jpg", None),
    ]
    assert "2 input(s) named more than once" in caplog.text


def test_resume_reads_whole_inputs_and_cuts_before_the_last_one(tmp_path):
    """JSON lines: the last input's rows (it may have more to come) and a cut-off line are
    dropped; a line that is no row of this run in the middle refuses the file."""
    columns = ["path", "frame", "status"]
    rows = [("a.jpg", None, "ok"), ("v.mp4", 0, "ok"), ("v.mp4", 3, "no_face"), ("w.mp4", 0, "ok")]
    lines = [json.dumps(dict(zip(columns, row, strict=True))) + "\n" for row in rows]
    output = tmp_path / "out.jsonl"
    output.write_text("".join(lines) + '{"path": "w.mp4", "fr')
    progress = resume.read_progress(str(output), "jsonl", columns)
    assert progress.done == {"a.jpg", "v.mp4"} and (progress.rows, progress.ok) == (3, 2)
    assert progress.keep_bytes == len("".join(lines[:3]).encode())
    with resume.open_for_resume(str(output), progress) as out:
        out.write("next\n")
    assert output.read_text() == "".join(lines[:3]) + "next\n"

    assert resume.read_progress(str(tmp_path / "missing.jsonl"), "jsonl", columns).done == set()
    output.write_text(lines[0] + "a warning that is no row\n" + lines[1])
    with pytest.raises(ValueError, match=r"out.jsonl: line 2 is not a jsonl row of this run"):
        resume.read_progress(str(output), "jsonl", columns)
    csv_output = tmp_path / "out.csv"
    csv_output.write_text("path,frame,status\n")
    assert resume.read_progress(str(csv_output), "csv", columns).keep_bytes == 18


def test_ctrl_c_keeps_the_rows_and_names_the_command_that_continues(trained_run, inputs, tmp_path):
    """SIGINT while rows are written: exit 130 with one line (no traceback), every row in the
    file whole, and the line's command (with --resume) is what continues it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(60):  # MTCNN on a 512-px photo: long enough to be stopped midway
        os.symlink(inputs["root"] / "astronaut.png", folder / f"p{i:02d}.png")
    output = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "affect_jax.predict", f"--workdir={trained_run}"]
    process = subprocess.Popen(
        [*cmd, f"--output={output}", str(folder)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [text for text in stderr.splitlines() if text.startswith("Stopped by SIGINT")]
    assert line.endswith(
        f"continue with: python -m affect_jax.predict --resume --workdir={trained_run} "
        f"--output={output} {folder}"
    )
    data = output.read_bytes()
    assert data.endswith(b"\n") and 3 <= data.count(b"\n") < 61
    _, rows = _read_csv(output)
    assert all(row["status"] == "ok" for row in rows)
