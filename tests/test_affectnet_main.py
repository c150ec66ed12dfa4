"""One end-to-end ``main`` run on each AffectNet layout (tiny files in the real formats)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.affectnet_files import (
    OFFICIAL_HEADER,
    npy_example,
    npy_release,
    official_image,
    official_row,
    write_bytes,
    write_csv,
    write_jpeg,
)
from tests.conftest import REPO, TINY_FLAGS

PER_CLASS = 5  # 8 classes x 5: a stratified 80/20 split has every class on both sides


def _official(root):
    images = os.path.join(root, "Manually_Annotated_Images")
    train_rows, val_rows = [], []
    for c in range(8):
        for k in range(PER_CLASS + 1):  # the last face of each class goes to validation.csv
            rel = f"{c}/{k}.jpg"
            official_image(images, rel, (48, 40), (4 + k, 5, 30, 30))
            row = official_row(
                rel, (4 + k, 5, 30, 30), expression=c, valence=0.2 * k - 0.4, arousal=0.1 * c - 0.3
            )
            (val_rows if k == PER_CLASS else train_rows).append(row)
    train_rows.append(official_row("0/0.jpg", (4, 5, 30, 30), expression=9))  # Uncertain
    write_csv(os.path.join(root, "training.csv"), train_rows, OFFICIAL_HEADER)
    write_csv(os.path.join(root, "validation.csv"), val_rows, OFFICIAL_HEADER)


def _folders(root):
    names = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
    rng = np.random.default_rng(0)
    for name in names:
        for k in range(PER_CLASS):
            write_jpeg(
                os.path.join(root, name, f"{k}.jpg"),
                rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
            )
    write_bytes(os.path.join(root, "happy", "broken.jpg"))


def _manifest(root):
    rows = []
    for c in range(8):
        for k in range(PER_CLASS):
            write_jpeg(os.path.join(root, "faces", f"{c}_{k}.jpg"), (30 * c, 40 * k, 90))
            rows.append([f"faces/{c}_{k}.jpg", c, f"{0.1 * k:.2f}", f"{-0.1 * c:.2f}"])
    rows.append(["faces/missing.jpg", 1, "0.1", "0.1"])
    write_csv(os.path.join(root, "labels.csv"), rows, ["path", "expression", "valence", "arousal"])


def _npy(root):
    npy_release(os.path.join(root, "val_set"), per_class=PER_CLASS)
    npy_example(os.path.join(root, "val_set"), "999", exp="1", val="3.5")  # outside [-1, 1]


# The one bad row each layout writes: (its drop reason, the file/row the report names).
BAD_ROW = {
    "npy": ("dropped_bad_valence_arousal", "999"),
    "official": ("dropped_non_emotion", "training.csv:42 (0/0.jpg)"),
    "folders": ("dropped_undecodable_image", "happy/broken.jpg"),
    "manifest": ("dropped_missing_image", "faces/missing.jpg"),
}
LAYOUTS = {
    "npy": _npy,
    "official": _official,
    "folders": _folders,
    "manifest": _manifest,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_main_trains_and_evaluates_on_each_layout(tmp_path, layout):
    data, workdir = tmp_path / "data", tmp_path / "run"
    LAYOUTS[layout](str(data))
    cmd = [
        sys.executable,
        "-m",
        "affect_jax.main",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        "--config.data.source=affectnet",
        f"--config.data.dir={data}",
        f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
        "--config.batch_size=4",
        "--config.num_epochs=1",
        "--config.steps_per_epoch=2",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.load(open(workdir / "data_report.json"))
    final = json.load(open(workdir / "final_metrics.json"))
    assert final["data_source"] == "affectnet" and final["num_classes"] == 8
    assert final["num_examples"] == 8  # 20% of the 40 kept (training.csv for official)
    assert sum(map(sum, final["metrics"]["confusion_matrix"])) == 8
    # Each layout wrote exactly one bad row: its reason counts 1, every other reason 0, and
    # the run's log names the count, the reason and the offending file.
    reason, offender = BAD_ROW[layout]
    for key, n in report["counts"].items():
        if key.startswith("dropped_"):
            assert n == (key == reason), (key, n)
    examples = [e for split in report["splits"].values() for e in split["examples"][reason]]
    assert len(examples) == 1 and offender in examples[0], examples
    log = (workdir / "run.log").read_text()
    assert re.search(rf": 1 {reason}, e\.g\. [^\n]*{re.escape(offender)}", log), log[-3000:]
    if layout == "folders":
        assert "mean_ccc" not in final["metrics"]
        assert "no valence/arousal" in result.stderr
        assert "ranked by accuracy" in result.stderr
    else:
        assert np.isfinite(final["metrics"]["valence_rmse"])
    if layout == "official":  # validation.csv is the held-out test split
        result = subprocess.run(
            cmd + ["--mode=eval", "--split=test"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        scored = json.load(open(workdir / "eval_test_best.json"))
        assert scored["num_examples"] == 8
