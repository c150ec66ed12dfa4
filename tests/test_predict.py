"""affect_jax.predict: a tiny trained run scoring images, folders, a video and detected faces."""

import csv
import json
import os
import subprocess
import sys
import warnings

import cv2
import jax
import numpy as np
import pytest

from affect_jax import evaluation, metrics, predict, run_dir, sharding, steps
from affect_jax.data import pipeline, synthetic
from affect_jax.data.source import ExamplePool, decode_raw_image
from tests.conftest import REPO, TINY_FLAGS

# skimage.data.astronaut(): the face lies roughly in x 150-260, y 40-160 (x, y, w, h).
ASTRONAUT_FACE = (150, 40, 110, 120)


def _cli(*args):
    cmd = [sys.executable, "-m", "affect_jax.predict", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _write_rgb(path, image):
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _probs(rows, predictor):
    return np.array([[float(r[c]) for c in predictor.prob_columns] for r in rows])


def _iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run: 2 epochs of 2 steps (later flags override TINY_FLAGS)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    cmd = [sys.executable, "-m", "affect_jax.main", "--config=configs/default.py",
           f"--workdir={workdir}", *TINY_FLAGS, "--config.num_epochs=2",
           "--config.steps_per_epoch=2"]
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
    video = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                            (48, 40))
    assert video.isOpened()
    for i in range(10):  # 48x40 frames
        frame = np.pad(faces[i % 8], ((0, 0), (4, 4), (0, 0)))
        video.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    video.release()
    from skimage import data

    _write_rgb(root / "astronaut.png", data.astronaut())
    _write_rgb(root / "blank.png", np.full((96, 96, 3), 128, np.uint8))
    return {"root": root, "faces": faces[:3], "pngs": [str(p) for p in pngs]}


@pytest.fixture(scope="module")
def cli_csv(trained_run, inputs):
    """One CLI call over a folder, a mixed folder, a video and a missing file."""
    root = inputs["root"]
    out = root / "out.csv"
    result = _cli(f"--workdir={trained_run}", "--every_n_frames=3", f"--output={out}",
                  "--batch_size=4", str(root / "faces"), str(root / "mixed"),
                  str(root / "clip.avi"), str(root / "missing.jpg"))
    assert result.returncode == 0, result.stderr[-3000:]
    return (*_read_csv(out), result.stderr)


def test_csv_columns_rows_and_ranges(cli_csv, predictor, inputs):
    columns, rows, stderr = cli_csv
    names = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
    assert columns == (["path", "frame", "expression"] + [f"prob_{n}" for n in names]
                       + ["valence", "arousal", "face_x", "face_y", "face_width", "face_height",
                          "status"])
    root = str(inputs["root"])
    got = [(os.path.relpath(r["path"], root), r["frame"], r["status"][:14]) for r in rows]
    assert got == [
        ("faces/a.png", "", "ok"), ("faces/b.png", "", "ok"), ("faces/d.JPG", "", "ok"),
        ("faces/more/c.png", "", "ok"),
        ("mixed/corrupt.jpg", "", "cannot decode "), ("mixed/good.png", "", "ok"),
        ("clip.avi", "0", "ok"), ("clip.avi", "3", "ok"), ("clip.avi", "6", "ok"),
        ("clip.avi", "9", "ok"), ("missing.jpg", "", "no such file o"),
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
    pool = ExamplePool({
        "image": faces, "expression": np.zeros(len(faces), np.int32),
        "valence": np.full(len(faces), np.nan, np.float32),
        "arousal": np.full(len(faces), np.nan, np.float32),
    }, decode_raw_image)
    mesh = sharding.make_mesh()
    _, graphdef, state = run_dir.restore_checkpoint(predictor.workdir, predictor.config, mesh)
    reference = evaluation.predict_split(
        jax.jit(steps.make_eval_steps(steps.make_eval_step(graphdef))), state,
        pipeline.eval_batches(pool, predictor.config, 16), mesh)
    np.testing.assert_allclose(cli_probs, reference["probs"], atol=1e-5)
    api = predictor.predict(list(faces))
    np.testing.assert_allclose(api["probs"], reference["probs"], atol=1e-5)
    np.testing.assert_allclose(api["valence_arousal"],
                               np.clip(reference["valence_arousal"], -1, 1), atol=1e-5)
    va = np.array([[float(by_path[p]["valence"]), float(by_path[p]["arousal"])]
                   for p in inputs["pngs"]])
    np.testing.assert_allclose(va, api["valence_arousal"], atol=1e-5)


def test_reproduces_the_runs_validation_metrics(predictor, trained_run):
    """The best checkpoint, classes and preprocessing are the ones training scored."""
    final = json.load(open(os.path.join(trained_run, "final_metrics.json")))
    assert predictor.step == final["best_epoch"]
    assert list(predictor.class_names) == final["class_names"]
    validation = pipeline.make_splits(predictor.config).validation
    out = predictor.predict(validation.columns["image"])
    va_true = np.stack([validation.columns["valence"], validation.columns["arousal"]], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)
        got = metrics.compute_metrics(validation.labels, out["probs"], va_true,
                                      out["valence_arousal"], predictor.class_names)
    for key in ("accuracy", "f1_macro", "auc", "kappa", "valence_rmse", "arousal_rmse",
                "mean_ccc"):
        np.testing.assert_allclose(got[key], final["metrics"][key], atol=1e-5, err_msg=key)


def test_detect_finds_the_astronaut_and_reports_no_face(trained_run, inputs):
    root = inputs["root"]
    steps = sorted(int(s) for s in os.listdir(os.path.join(trained_run, "checkpoints"))
                   if s.isdigit())
    checkpoint = os.path.join(trained_run, "checkpoints", str(steps[0]))
    result = _cli(f"--checkpoint={checkpoint}", "--face=detect", "--format=jsonl",
                  str(root / "astronaut.png"), str(root / "blank.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {steps[0]}" in result.stderr
    astronaut, blank = [json.loads(line) for line in result.stdout.splitlines()]
    assert astronaut["status"] == "ok" and astronaut["frame"] is None
    box = [astronaut[c] for c in predict.FACE_COLUMNS]
    assert _iou(box, ASTRONAUT_FACE) > 0.3, box
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
        face="box", boxes=str(boxes), every_n_frames=5)
    got = [(r["frame"], r["status"][:16], [r[c] for c in predict.FACE_COLUMNS]) for r in rows]
    assert got == [
        (None, "ok", [150, 40, 110, 120]),
        (None, "face box (600.0,", [None] * 4),
        (0, "ok", [4, 0, 40, 40]),
        (5, "ok", [0, 0, 20, 20]),
        (None, "no face box for ", [None] * 4),
    ]
    from skimage import data

    crop = data.astronaut()[40:160, 150:260]
    np.testing.assert_allclose([rows[0][c] for c in predictor.prob_columns],
                               predictor.predict([crop])["probs"][0], atol=1e-5)


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
    np.testing.assert_allclose(predictor.predict(faces)["probs"],
                               predictor.predict(list(faces))["probs"], atol=1e-6)
    assert predictor.predict([])["probs"].shape == (0, 8)
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict([faces[0].astype(np.float32)])
    rows = predictor.predict_files(inputs["pngs"])
    assert [r["status"] for r in rows] == ["ok"] * 3
    np.testing.assert_allclose(_probs(rows, predictor), predictor.predict(faces)["probs"],
                               atol=1e-5)


def test_nothing_predicted_exits_non_zero(trained_run, inputs):
    root = inputs["root"]
    result = _cli(f"--workdir={trained_run}", str(root / "mixed" / "corrupt.jpg"),
                  str(root / "mixed" / "notes.txt"), str(root / "empty"))
    assert result.returncode == 1
    statuses = [r["status"] for r in csv.DictReader(result.stdout.splitlines())]
    assert [s[:20] for s in statuses] == ["cannot decode image:", "unsupported format '",
                                          "no images or videos "]
    assert "Nothing could be predicted" in result.stderr


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
