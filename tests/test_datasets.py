"""FER2013, FER+, RAF-DB and manifests as they come: detection, pools, labels mapped by name,
drops counted, and the prepared data through the input pipeline.

Each test writes a few dozen tiny files in the real formats (``tests/face_dataset_files.py``)
into a temp dir and prepares them into a temp TFDS data dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from affect_jax.data import affectnet, pipeline
from affect_jax.data.affectnet import DataError, ferplus
from tests.affectnet_files import BLUE, RED, data_config, decoded_example, write_csv, write_jpeg
from tests.conftest import REPO, TINY_FLAGS
from tests.face_dataset_files import (
    FER_BAD_ROWS,
    FER_HEADER,
    FER_TO_PROJECT,
    FERPLUS_HEADER,
    RAF_TO_PROJECT,
    face_pixels,
    fer2013_rows,
    ferplus_votes,
    rafdb_release,
    write_rows,
)


def _counts(**drops):
    counts = {k: 0 for k in affectnet.COUNT_KEYS}
    counts.update(drops)
    return counts


# --- FER2013 -----------------------------------------------------------------------------------


def test_fer2013_usage_gives_the_standard_pools(tmp_path):
    good = fer2013_rows(per_class=2)  # 14 Training, 7 PublicTest, 7 PrivateTest.
    write_rows(str(tmp_path / "data" / "fer2013" / "fer2013.csv"), FER_HEADER, good + FER_BAD_ROWS)
    (tmp_path / "data" / "fer2013" / "README").write_text("as extracted from fer2013.tar.gz")
    workdir = tmp_path / "work"
    source = affectnet.load_source(
        data_config(tmp_path / "data", tmp_path / "tfds", num_classes=7), str(workdir)
    )
    assert source.name == "fer2013" and source.num_classes == 7
    assert not source.has_valence_arousal
    assert {k: len(p) for k, p in source.pools.items()} == {
        "train": 14,
        "validation": 7,
        "test": 7,
    }
    assert dict(source.counts) == _counts(kept=28, dropped_malformed_row=5, dropped_unknown_label=1)
    train = source.pools["train"]
    assert np.isnan(train.columns["valence"]).all()
    for i, path in enumerate(train.columns["path"]):  # 'fer2013.csv:<line> ()'
        line = int(path.split(":")[1].split()[0])
        fer_class = int(good[line - 2][0])
        assert train.columns["expression"][i] == FER_TO_PROJECT[fer_class]
        image = decoded_example(train, i)
        assert image.shape == (48, 48, 3)
        expected = np.array(good[line - 2][1].split(), np.uint8).reshape(48, 48)
        np.testing.assert_array_equal(image[..., 0], expected)
        np.testing.assert_array_equal(image[..., 2], expected)
    np.testing.assert_array_equal(np.bincount(train.labels), [2] * 7)

    report = json.loads((workdir / "data_report.json").read_text())
    assert report["layout"] == "fer2013"
    assert report["splits"]["validation"]["source"] == "PublicTest"
    assert report["splits"]["validation"]["counts"]["dropped_malformed_row"] == 1  # pixel 700
    examples = report["splits"]["train"]["examples"]
    assert any("'Extra'" in e for e in examples["dropped_malformed_row"])
    assert any("emotion 7" in e for e in examples["dropped_unknown_label"])

    splits = pipeline.make_splits(
        data_config(
            tmp_path / "data" / "fer2013" / "fer2013.csv",
            tmp_path / "tfds",
            num_classes=7,
            image_size=32,
        ),
        None,
    )
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (14, 7, 7)


def test_fer2013_needs_seven_classes(tmp_path):
    write_rows(str(tmp_path / "data" / "fer2013.csv"), FER_HEADER, fer2013_rows(1))
    with pytest.raises(DataError, match="num_classes=8 but the fer2013 layout .* carries 7"):
        affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), None)


def test_fer2013_two_file_variant(tmp_path):
    rows = [[str(c), face_pixels(10 * c + k)] for c in range(7) for k in range(2)]
    write_rows(str(tmp_path / "data" / "train.csv"), ["emotion", "pixels"], rows)
    write_rows(str(tmp_path / "data" / "test.csv"), ["pixels"], [[face_pixels(1)]])
    workdir = tmp_path / "work"
    source = affectnet.load_source(
        data_config(tmp_path / "data", tmp_path / "tfds", num_classes=7), str(workdir)
    )
    assert set(source.pools) == {"train"} and len(source.pools["train"]) == 14
    notes = json.loads((workdir / "data_report.json").read_text())["notes"]
    assert len(notes) == 1 and notes[0].startswith("test.csv has no 'emotion' column")

    # A test.csv with labels is the held-out test pool.
    write_rows(str(tmp_path / "data" / "test.csv"), ["emotion", "pixels"], rows[:7])
    source = affectnet.load_source(
        data_config(tmp_path / "data", tmp_path / "tfds", num_classes=7), None
    )
    assert {k: len(p) for k, p in source.pools.items()} == {"train": 14, "test": 7}


# --- FER+ --------------------------------------------------------------------------------------


def test_ferplus_majority_rule():
    assert ferplus.majority(ferplus_votes(3)) == 3
    assert ferplus.majority(ferplus_votes(2, "tie")) is None
    assert ferplus.majority(ferplus_votes(6, "outliers")) == 6  # 5 of 5 after outliers.
    assert ferplus.majority([4, 0, 0, 1, 3, 2, 0, 0, 0, 0]) is None  # 4 of 9: no majority.
    assert ferplus.majority([0] * 9 + [10]) == 9  # NF
    assert ferplus.majority([1] * 10) is None


def test_ferplus_votes_beside_fer2013_pixels(tmp_path):
    root = tmp_path / "data"
    fer_rows, vote_rows = [], []

    def add(usage, votes, name=True, fer_usage=None):
        index = len(fer_rows)
        fer_rows.append(["0", face_pixels(index), fer_usage or usage])
        vote_rows.append([usage, f"fer{index:07d}.png" if name else "", *votes])

    for c in range(8):  # FER+ column order: neutral, happiness, surprise, ... contempt.
        add("Training", ferplus_votes(c))
        add("Training", ferplus_votes(c, "outliers"))
        add("PublicTest", ferplus_votes(c))
        add("PrivateTest", ferplus_votes(c))
    add("Training", ferplus_votes(1, "tie"))  # no majority
    add("Training", [4, 0, 0, 1, 3, 2, 0, 0, 0, 0])  # no majority (4 of 9)
    add("PublicTest", [0, 0, 1, 0, 0, 0, 0, 0, 9, 0])  # unknown
    add("Training", [0] * 9 + [10], name=False)  # NF, as the release writes it
    add("Training", ["x"] + [0] * 9)  # malformed votes
    add("Training", ferplus_votes(0), fer_usage="PublicTest")  # files out of order
    write_rows(
        str(root / "fer2013.csv"), FER_HEADER, fer_rows + [["1", face_pixels(99), "Training"]]
    )
    write_rows(str(root / "FERPlus" / "fer2013new.csv"), FERPLUS_HEADER, vote_rows)

    source = affectnet.load_source(data_config(root, tmp_path / "tfds"), None)
    assert source.name == "ferplus" and source.num_classes == 8
    assert {k: len(p) for k, p in source.pools.items()} == {
        "train": 16,
        "validation": 8,
        "test": 8,
    }
    assert dict(source.counts) == _counts(
        kept=32,
        dropped_no_majority=2,
        dropped_non_emotion=2,
        dropped_malformed_row=2,
        dropped_missing_annotation=1,  # the extra fer2013.csv row
    )
    column_codes = [0, 1, 3, 2, 6, 5, 4, 7]  # neutral, happiness, surprise, sadness, ...
    for name, pool in source.pools.items():
        np.testing.assert_array_equal(
            np.sort(pool.labels), np.sort(np.repeat(column_codes, 2 if name == "train" else 1))
        )

    seven = affectnet.load_source(data_config(root, tmp_path / "tfds", num_classes=7), None)
    assert seven.counts["dropped_contempt"] == 4 and seven.counts["kept"] == 28

    (root / "fer2013.csv").unlink()
    with pytest.raises(DataError, match="FER\\+ votes .* but not FER2013's fer2013.csv"):
        affectnet.load_source(data_config(root, tmp_path / "tfds"), None)


# --- RAF-DB ------------------------------------------------------------------------------------


def test_rafdb_pools_from_file_names(tmp_path):
    rafdb_release(str(tmp_path / "data"))
    source = affectnet.load_source(
        data_config(tmp_path / "data", tmp_path / "tfds", num_classes=7), None
    )
    assert source.name == "rafdb" and not source.has_valence_arousal
    train, test = source.pools["train"], source.pools["test"]
    assert (len(train), len(test)) == (14, 7)
    assert dict(source.counts) == _counts(
        kept=21,
        dropped_malformed_row=3,
        dropped_unknown_label=1,
        dropped_missing_image=1,
        dropped_undecodable_image=1,
        dropped_missing_annotation=1,
    )
    for pool, split in ((train, "train"), (test, "test")):
        for i, path in enumerate(pool.columns["path"]):
            name = os.path.basename(path)
            assert name.startswith(split) and name.endswith("_aligned.jpg")
            assert pool.columns["expression"][i] == RAF_TO_PROJECT[int(name[len(split) + 1 :][:3])]
    with pytest.raises(DataError, match="carries 7 classes"):
        affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), None)


def test_rafdb_original_images_when_no_aligned_ones(tmp_path):
    rafdb_release(str(tmp_path / "data"), aligned=False)
    workdir = tmp_path / "work"
    source = affectnet.load_source(
        data_config(tmp_path / "data" / "basic", tmp_path / "tfds", num_classes=7), str(workdir)
    )
    assert source.counts["kept"] == 21
    assert all("/Image/original/" in p for p in source.pools["train"].columns["path"])
    notes = json.loads((workdir / "data_report.json").read_text())["notes"]
    assert "Image/original" in notes[0]


# --- manifests as they come --------------------------------------------------------------------


def test_manifest_column_names_label_case_and_image_root(tmp_path):
    # As a public collection ships: data/legend.csv ('user.id, image, emotion', labels in mixed
    # case) and the images in ../images/.
    root = tmp_path / "facial_expressions"
    labels = [
        "HAPPINESS",
        "happiness",
        "Neutral",
        "NEUTRAL",
        "surprise",
        "CONTEMPT",
        "sadness",
        "anger",
        "fear",
        "disgust",
        "3",
    ]
    rows = []
    for k, label in enumerate(labels):
        write_jpeg(str(root / "images" / f"face{k}.jpg"), (20 * k, 0, 0))
        rows.append([f"user{k}", f"face{k}.jpg", label])
    rows += [["u", "face0.jpg", "boredom"], ["u", "missing.jpg", "fear"], ["u", "face1.jpg"]]
    write_csv(str(root / "data" / "legend.csv"), rows, ["user.id", "image", "emotion"])
    write_csv(str(root / "data" / "500_picts.csv"), rows[:3], ["user.id", "image", "emotion"])

    with pytest.raises(DataError, match="2 manifest CSV files"):
        affectnet.load_source(data_config(root / "data", tmp_path / "tfds"), None)
    config = data_config(
        root / "data" / "legend.csv", tmp_path / "tfds", image_root=str(root / "images")
    )
    source = affectnet.load_source(config, None)
    pool = source.pools["train"]
    assert source.name == "affectnet" and not source.has_valence_arousal
    assert dict(source.counts) == _counts(
        kept=11, dropped_unknown_label=1, dropped_missing_image=1, dropped_malformed_row=1
    )
    codes = {os.path.basename(p): c for p, c in zip(pool.columns["path"], pool.labels, strict=True)}
    assert [codes[f"face{k}.jpg"] for k in range(len(labels))] == [1, 1, 0, 0, 3, 7, 2, 6, 4, 5, 3]
    # Without image_root, paths start at the CSV's directory: every image is missing.
    with pytest.raises(DataError, match="no usable example.*dropped_missing_image 12"):
        affectnet.load_source(data_config(root / "data" / "legend.csv", tmp_path / "tfds"), None)
    with pytest.raises(DataError, match="image_root='/nowhere' does not exist"):
        affectnet.load_source(
            data_config(root / "data" / "legend.csv", tmp_path / "tfds", image_root="/nowhere"),
            None,
        )


@pytest.mark.parametrize(
    "header",
    [["File Name", "Label"], ["filepath", "class"], ["file", "Expression"], ["path", "emotion"]],
)
def test_manifest_accepts_the_usual_column_names(tmp_path, header):
    root = tmp_path / "data"
    write_jpeg(str(root / "a.jpg"), RED)
    write_jpeg(str(root / "b.jpg"), BLUE)
    write_csv(str(root / "labels.csv"), [["a.jpg", "sad"], ["b.jpg", "Happy"]], header)
    plan = affectnet.detect_layout(str(root))
    assert plan.layout == "manifest"
    source = affectnet.load_source(data_config(root, tmp_path / "tfds"), None)
    assert sorted(source.pools["train"].labels) == [1, 2]


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_manifest_from_a_spreadsheet_with_decimal_commas(tmp_path, delimiter):
    """As a spreadsheet in a comma-decimal locale saves 'CSV' (German, French, ... Excel): ';'
    between fields, '0,5' for a half, a byte-order mark and CRLF line ends; or as tab-separated
    text."""
    root = tmp_path / "data"
    write_jpeg(str(root / "a.jpg"), RED)
    write_jpeg(str(root / "b.jpg"), BLUE)
    lines = [
        ["path", "expression", "valence", "arousal"],
        ["a.jpg", "Happy", "0,5", "-0,25"],
        ["b.jpg", "Sad", "-0.75", "1"],
    ]
    text = "".join(delimiter.join(line) + "\r\n" for line in lines)
    (root / "labels.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    source = affectnet.load_source(data_config(root, tmp_path / "tfds"), None)
    assert source.has_valence_arousal and dict(source.counts) == _counts(kept=2)
    columns = source.pools["train"].columns
    by_name = {os.path.basename(p): k for k, p in enumerate(columns["path"])}
    a, b = by_name["a.jpg"], by_name["b.jpg"]
    assert (columns["expression"][a], columns["expression"][b]) == (1, 2)
    np.testing.assert_array_equal(columns["valence"][[a, b]], [0.5, -0.75])
    np.testing.assert_array_equal(columns["arousal"][[a, b]], [-0.25, 1.0])


# --- a whole run -------------------------------------------------------------------------------


def test_main_trains_on_fer2013_without_valence_arousal(tmp_path):
    write_rows(
        str(tmp_path / "data" / "fer2013.csv"), FER_HEADER, fer2013_rows(per_class=2) + FER_BAD_ROWS
    )
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "affect_jax.main",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        "--config.data.source=affectnet",
        f"--config.data.dir={tmp_path / 'data'}",
        "--config.data.num_classes=7",
        f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
        "--config.batch_size=4",
        "--config.num_epochs=1",
        "--config.steps_per_epoch=2",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["data_source"] == "fer2013" and final["num_classes"] == 7
    assert final["num_examples"] == 7  # PublicTest, not a random hold-out
    assert not any("ccc" in k or "rmse" in k for k in final["metrics"])
    assert "no valence/arousal" in result.stderr and "ranked by accuracy" in result.stderr
    assert "n/a" in (workdir / "report.md").read_text()
