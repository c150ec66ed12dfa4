"""AffectNet layouts: what is kept, what is dropped and why, crops, caching, errors.

Each test writes a few dozen tiny files in the real formats into a temp dir and prepares them
into a temp TFDS data dir.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from affect_jax.data import affectnet, pipeline
from affect_jax.data.affectnet import DataError, faces
from tests.affectnet_files import (
    BLUE,
    OFFICIAL_HEADER,
    RED,
    data_config,
    decoded_example,
    landmark_text,
    npy_example,
    npy_release,
    official_image,
    official_row,
    write_bytes,
    write_csv,
    write_jpeg,
    write_truncated_jpeg,
)


def _by_name(pool):
    """Row index per image file stem."""
    return {os.path.splitext(os.path.basename(p))[0]: i for i, p in enumerate(pool.columns["path"])}


# --- npy (the redistributed release) ---------------------------------------------------------


def test_npy_release_keeps_and_drops_exactly(tmp_path):
    split = tmp_path / "data" / "val_set"
    npy_release(str(split))
    npy_example(str(split), "nonemo8", exp="8")
    npy_example(str(split), "nonemo9", exp="9")
    npy_example(str(split), "noface10", exp="10")
    npy_example(str(split), "unknown11", exp="11")
    npy_example(str(split), "valmissing", val="-2")
    npy_example(str(split), "aroout", aro="1.5")
    npy_example(str(split), "nanval", val="nan")
    npy_example(str(split), "badexp", exp="happy?")
    npy_example(str(split), "badlnd", lnd=np.arange(10, dtype=np.float64))
    npy_example(str(split), "noimage", image=False)
    npy_example(str(split), "noexp", exp=None)
    npy_example(str(split), "nolnd", lnd=None)  # Landmarks are optional: kept, NaN.
    npy_example(str(split), "strlnd", lnd=np.array([str(v) for v in range(136)]))
    write_jpeg(str(split / "images" / "noannotation.jpg"), (1, 2, 3))
    write_bytes(str(split / "images" / "corrupt.jpg"))
    npy_example(str(split), "corrupt", image=False)
    write_truncated_jpeg(str(split / "images" / "truncated.jpg"))
    npy_example(str(split), "truncated", image=False)
    write_bytes(str(split / "annotations" / "garbage_exp.npy"), b"not npy")
    npy_example(str(split), "garbage", exp=None)
    (split / "images" / "notes.txt").write_text("ignored: not an image")

    workdir = tmp_path / "work"
    source = affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), str(workdir))

    assert source.name == "affectnet" and source.num_classes == 8 and source.has_valence_arousal
    assert set(source.pools) == {"train"}
    pool = source.pools["train"]
    assert dict(source.counts) == {
        "kept": 24 + 2,
        "dropped_malformed_row": 3,  # badexp, badlnd, garbage_exp.npy
        "dropped_missing_annotation": 2,  # noannotation.jpg, noexp
        "dropped_unknown_label": 1,
        "dropped_no_majority": 0,
        "dropped_non_emotion": 3,
        "dropped_contempt": 0,
        "dropped_bad_valence_arousal": 3,
        "dropped_missing_image": 1,
        "dropped_undecodable_image": 2,
    }
    rows = _by_name(pool)
    assert set(rows) == {str(c * 100 + k) for c in range(8) for k in range(3)} | {
        "nolnd",
        "strlnd",
    }
    i = rows["502"]
    assert pool.columns["expression"][i] == 5
    assert pool.columns["valence"][i] == pytest.approx(-0.4)
    assert pool.columns["arousal"][i] == pytest.approx(0.1)
    np.testing.assert_array_equal(pool.columns["landmarks"][i].reshape(-1), np.arange(136))
    np.testing.assert_array_equal(pool.columns["box"][i], [0, 0, 32, 32])
    assert np.isnan(pool.columns["landmarks"][rows["nolnd"]]).all()
    np.testing.assert_array_equal(
        pool.columns["landmarks"][rows["strlnd"]].reshape(-1), np.arange(136)
    )
    image = decoded_example(pool, i)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image.mean(axis=(0, 1)), (50, 40, 50), atol=3)
    np.testing.assert_array_equal(np.bincount(pool.labels), [5, 3, 3, 3, 3, 3, 3, 3])

    report = json.loads((workdir / "data_report.json").read_text())
    assert report["counts"] == dict(source.counts)
    assert report["layout"] == "npy" and report["splits"]["train"]["source"] == "val_set"
    examples = report["splits"]["train"]["examples"]
    assert any("garbage_exp.npy" in e for e in examples["dropped_malformed_row"])
    assert any("badlnd_lnd.npy" in e for e in examples["dropped_malformed_row"])
    assert any("noannotation.jpg" in e for e in examples["dropped_missing_annotation"])
    assert any("noimage_exp.npy" in e for e in examples["dropped_missing_image"])
    assert sorted(e.split(":")[0] for e in examples["dropped_undecodable_image"]) == [
        "val_set/images/corrupt.jpg",
        "val_set/images/truncated.jpg",
    ]
    assert report["splits"]["train"]["class_counts"]["Neutral"] == 5


@pytest.mark.parametrize("num_classes, kept", [(8, 24), (7, 21)])
def test_npy_seven_versus_eight_classes(tmp_path, num_classes, kept):
    npy_release(str(tmp_path / "data" / "val_set"))
    source = affectnet.load_source(
        data_config(tmp_path / "data", tmp_path / "tfds", num_classes=num_classes), None
    )
    assert source.counts["kept"] == kept
    assert source.counts["dropped_contempt"] == 24 - kept
    assert source.class_names[-1] == ("Contempt" if num_classes == 8 else "Anger")
    assert source.pools["train"].labels.max() == num_classes - 1


def test_npy_train_and_val_splits_map_to_train_and_test_pools(tmp_path):
    npy_release(str(tmp_path / "data" / "train_set"), per_class=2)
    npy_release(str(tmp_path / "data" / "val_set"), per_class=1)
    source = affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), None)
    assert len(source.pools["train"]) == 16 and len(source.pools["test"]) == 8
    assert all("/train_set/" in p for p in source.pools["train"].columns["path"])
    assert all("/val_set/" in p for p in source.pools["test"].columns["path"])
    assert source.counts["kept"] == 24


def test_npy_split_dir_itself_and_ambiguous_splits(tmp_path):
    npy_release(str(tmp_path / "data" / "val_set"), per_class=1)
    source = affectnet.load_source(
        data_config(tmp_path / "data" / "val_set", tmp_path / "tfds"), None
    )
    assert len(source.pools["train"]) == 8
    for name in ("test_set", "extra_set"):
        npy_release(str(tmp_path / "data" / name), per_class=1)
    with pytest.raises(DataError, match="3 npy split directories"):
        affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), None)


def test_large_split_is_read_by_random_access(tmp_path):
    npy_release(str(tmp_path / "data" / "val_set"), per_class=1)
    config = data_config(tmp_path / "data", tmp_path / "tfds")
    memory = affectnet.load_source(config, None).pools["train"]
    lazy = affectnet.load_source(config, None, in_memory_max_bytes=0).pools["train"]
    assert "image_bytes" in memory.columns and "image_bytes" not in lazy.columns
    np.testing.assert_array_equal(lazy.columns["path"], memory.columns["path"])
    ds = tf.data.Dataset.from_tensor_slices(dict(lazy.columns)).map(
        lazy.decode, num_parallel_calls=4, deterministic=True
    )
    for i, image in enumerate(ds.as_numpy_iterator()):
        np.testing.assert_array_equal(image, decoded_example(memory, i))


# --- official release --------------------------------------------------------------------------


def _official_release(root):
    images = os.path.join(root, "Manually_Annotated", "Manually_Annotated_Images")
    good = []
    for i in range(8):  # One face per class, boxes at various places of a 64x48 image.
        rel = f"{i + 1}/face{i}.jpg"
        box = (4 + 2 * i, 6, 24, 20)
        official_image(images, rel, (64, 48), box)
        good.append(official_row(rel, box, expression=i, valence=0.1 * i - 0.4, arousal=0.05 * i))
    official_image(images, "9/edge.jpg", (64, 48), (50, 30, 14, 18))
    edge = official_row("9/edge.jpg", (50, 30, 30, 30), expression=2)  # Box past the corner.
    bad = [
        official_row("1/face0.jpg", (4, 6, 24, 20), expression=8),
        official_row("1/face0.jpg", (4, 6, 24, 20), expression=9),
        official_row("1/face0.jpg", (4, 6, 24, 20), expression=10),
        official_row("1/face0.jpg", (4, 6, 24, 20), valence=-2, arousal=-2),
        official_row("1/face0.jpg", (4, 6, 24, 20), arousal=1.01),
        official_row("7/missing.jpg", (4, 6, 24, 20)),
        official_row("1/face0.jpg", (4, 6, 24, 20), landmarks="1;2;3"),
        official_row("1/face0.jpg", (4, 6, 24, 20), landmarks="1;x" * 68),
        ["1/face0.jpg", "four", 6, 24, 20, landmark_text(0, 0), 1, 0.5, 0.5],
        ["1/face0.jpg", 4, 6, 24],  # Too few fields.
        official_row("1/face0.jpg", (100, 100, 10, 10)),  # Box outside the 64x48 image.
        official_row("8/corrupt.jpg", (4, 6, 24, 20)),
    ]
    write_bytes(os.path.join(images, "8/corrupt.jpg"))
    official_image(images, "9/unlisted.jpg", (64, 48), (0, 0, 8, 8))
    lists = os.path.join(root, "Manually_Annotated_file_lists")
    write_csv(os.path.join(lists, "training.csv"), good[:6] + [edge] + bad, OFFICIAL_HEADER)
    write_csv(os.path.join(lists, "validation.csv"), good[6:])  # No header, as some copies.
    return images


def test_official_release_crops_and_filters(tmp_path):
    _official_release(str(tmp_path / "data"))
    source = affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), None)
    train, test = source.pools["train"], source.pools["test"]
    assert dict(source.counts) == {
        "kept": 9,
        "dropped_malformed_row": 5,  # 2 landmark strings, 'four', too few fields, box outside.
        "dropped_missing_annotation": 1,  # 9/unlisted.jpg
        "dropped_unknown_label": 0,
        "dropped_no_majority": 0,
        "dropped_non_emotion": 3,
        "dropped_contempt": 0,
        "dropped_bad_valence_arousal": 2,
        "dropped_missing_image": 1,
        "dropped_undecodable_image": 1,
    }
    assert len(train) == 7 and len(test) == 2
    np.testing.assert_array_equal(np.sort(test.labels), [6, 7])

    rows = _by_name(train)
    i = rows["face3"]
    assert train.columns["expression"][i] == 3
    assert train.columns["valence"][i] == pytest.approx(-0.1)
    assert train.columns["arousal"][i] == pytest.approx(0.15)
    np.testing.assert_array_equal(train.columns["box"][i], [10, 6, 34, 26])
    crop = decoded_example(train, i)
    assert crop.shape == (20, 24, 3)  # The box, at its own size.
    np.testing.assert_allclose(crop.reshape(-1, 3).mean(0), RED, atol=4)
    # Landmarks follow the crop: the first point was at the box corner.
    np.testing.assert_allclose(train.columns["landmarks"][i][0], [0, 0])
    np.testing.assert_allclose(train.columns["landmarks"][i][10], [10, 5])

    j = rows["edge"]  # The box runs past the image: clipped to it.
    np.testing.assert_array_equal(train.columns["box"][j], [50, 30, 64, 48])
    assert decoded_example(train, j).shape == (18, 14, 3)


def test_official_face_margin_grows_the_crop(tmp_path):
    _official_release(str(tmp_path / "data"))
    source = affectnet.load_source(
        data_config(tmp_path / "data", tmp_path / "tfds", face_margin=0.25), None
    )
    pool = source.pools["train"]
    i = _by_name(pool)["face3"]
    # Box x 10..34, y 6..26 grown by 6 px and 5 px a side.
    np.testing.assert_array_equal(pool.columns["box"][i], [4, 1, 40, 31])
    crop = decoded_example(pool, i)
    assert crop.shape == (30, 36, 3)
    np.testing.assert_allclose(crop[8:22, 10:26].reshape(-1, 3).mean(0), RED, atol=4)
    np.testing.assert_allclose(crop[:, :3].reshape(-1, 3).mean(0), BLUE, atol=6)
    np.testing.assert_allclose(pool.columns["landmarks"][i][0], [6, 5])


def test_official_lists_without_images_dir_is_a_clear_error(tmp_path):
    write_csv(str(tmp_path / "data" / "training.csv"), [], OFFICIAL_HEADER)
    with pytest.raises(DataError, match="no Manually_Annotated_Images"):
        affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), None)


# --- class folders -----------------------------------------------------------------------------


def test_class_folders(tmp_path):
    root = tmp_path / "data"
    names = ["Neutral", "happiness", "SAD", "3", "fear", "Disgust", "angry", "contempt"]
    for c, name in enumerate(names):
        for k in range(2):
            write_jpeg(str(root / name / f"{c}_{k}.jpg"), (20 * c, 10 * k, 0))
    write_jpeg(str(root / "Uncertain" / "u.jpg"), (1, 1, 1))
    write_jpeg(str(root / "other" / "o.png"), (1, 1, 1))
    write_jpeg(str(root / "loose.jpg"), (1, 1, 1))
    write_bytes(str(root / "happy" / "broken.jpg"))
    (root / "happy" / "Thumbs.db").write_bytes(b"\0")

    source = affectnet.load_source(data_config(root, tmp_path / "tfds", num_classes=7), None)
    pool = source.pools["train"]
    assert not source.has_valence_arousal
    assert np.isnan(pool.columns["valence"]).all() and np.isnan(pool.columns["arousal"]).all()
    assert dict(source.counts) == {
        "kept": 14,
        "dropped_malformed_row": 0,
        "dropped_missing_annotation": 1,
        "dropped_unknown_label": 1,
        "dropped_no_majority": 0,
        "dropped_non_emotion": 1,
        "dropped_contempt": 2,
        "dropped_bad_valence_arousal": 0,
        "dropped_missing_image": 0,
        "dropped_undecodable_image": 1,
    }
    rows = _by_name(pool)
    for c in range(7):
        assert pool.columns["expression"][rows[f"{c}_1"]] == c


# --- manifest ----------------------------------------------------------------------------------


def test_manifest_with_valence_arousal(tmp_path):
    root = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    write_jpeg(str(root / "img" / "a.jpg"), RED)
    write_jpeg(str(root / "img" / "b.png"), BLUE)
    write_jpeg(str(elsewhere / "c.jpg"), (0, 200, 0))
    write_bytes(str(root / "img" / "bad.jpg"))
    rows = [
        ["img/a.jpg", "1", "0.5", "0.25"],
        ["img/b.png", "Sad", "-0.5", "0.75"],
        [str(elsewhere / "c.jpg"), "anger", "-1", "1"],
        ["img/a.jpg", "8", "0.1", "0.1"],
        ["img/a.jpg", "7", "0.1", "0.1"],
        ["img/a.jpg", "joy", "0.1", "0.1"],
        ["img/a.jpg", "2", "high", "0.1"],
        ["img/a.jpg", "2", "-2", "0.1"],
        ["img/a.jpg", "2", "0.1"],
        ["img/none.jpg", "2", "0.1", "0.1"],
        ["img/bad.jpg", "2", "0.1", "0.1"],
    ]
    write_csv(str(root / "labels.csv"), rows, ["path", "expression", "valence", "arousal"])
    source = affectnet.load_source(data_config(root, tmp_path / "tfds", num_classes=7), None)
    pool = source.pools["train"]
    assert source.has_valence_arousal
    assert dict(source.counts) == {
        "kept": 3,
        "dropped_malformed_row": 2,
        "dropped_missing_annotation": 0,
        "dropped_unknown_label": 1,
        "dropped_no_majority": 0,
        "dropped_non_emotion": 1,
        "dropped_contempt": 1,
        "dropped_bad_valence_arousal": 1,
        "dropped_missing_image": 1,
        "dropped_undecodable_image": 1,
    }
    rows_by_name = _by_name(pool)
    assert pool.columns["expression"][rows_by_name["b"]] == 2
    assert pool.columns["valence"][rows_by_name["b"]] == pytest.approx(-0.5)
    assert pool.columns["arousal"][rows_by_name["c"]] == pytest.approx(1.0)
    np.testing.assert_allclose(
        decoded_example(pool, rows_by_name["c"]).mean((0, 1)), (0, 200, 0), atol=3
    )


def test_manifest_without_valence_arousal(tmp_path):
    root = tmp_path / "data"
    write_jpeg(str(root / "a.jpg"), RED)
    write_csv(str(root / "m.csv"), [["a.jpg", "0"], ["a.jpg", "6"]], ["path", "expression"])
    source = affectnet.load_source(data_config(root, tmp_path / "tfds", layout="manifest"), None)
    assert not source.has_valence_arousal and source.counts["kept"] == 2
    assert np.isnan(source.pools["train"].columns["valence"]).all()


# --- cache -------------------------------------------------------------------------------------


def test_prepared_copy_is_reused_and_keyed_by_settings(tmp_path, monkeypatch):
    _official_release(str(tmp_path / "data"))
    calls = []
    load_face = faces.load_face
    monkeypatch.setattr(faces, "load_face", lambda *a: calls.append(1) or load_face(*a))
    config = data_config(tmp_path / "data", tmp_path / "tfds")
    first = affectnet.load_source(config, None)
    prepared = len(calls)
    assert prepared > 0
    again = affectnet.load_source(config, str(tmp_path / "work"))
    assert len(calls) == prepared  # Nothing decoded again: the cache was read.
    assert dict(again.counts) == dict(first.counts)
    assert json.loads((tmp_path / "work" / "data_report.json").read_text())["counts"]["kept"] == 9

    names = {affectnet.prepare(config).builder_config.name}
    variants = [
        {"num_classes": 7},
        {"face_margin": 0.1},
        {"layout": "official"},
    ]
    for change in variants:
        changed = data_config(tmp_path / "data", tmp_path / "tfds", **change)
        names.add(
            affectnet.make_builder_config(
                changed.data.dir,
                changed.data.layout,
                changed.data.num_classes,
                changed.data.face_margin,
            )[0].name
        )
    # layout='official' resolves to the same detected layout: the same copy.
    assert len(names) == 3
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    moved = affectnet.make_builder_config(str(tmp_path / "copy"))[0].name
    assert moved not in names
    # Editing a list changes its stamp: a new copy, not the stale one.
    with open(tmp_path / "copy" / "Manually_Annotated_file_lists" / "validation.csv", "a") as f:
        f.write("\n")
    os.utime(tmp_path / "copy" / "Manually_Annotated_file_lists" / "validation.csv", (1, 1))
    assert affectnet.make_builder_config(str(tmp_path / "copy"))[0].name != moved

    seven = affectnet.load_source(
        data_config(tmp_path / "data", tmp_path / "tfds", num_classes=7), None
    )
    assert seven.counts["dropped_contempt"] == 1 and seven.num_classes == 7
    assert len(calls) > prepared


def test_npy_listing_change_makes_a_new_copy(tmp_path):
    split = tmp_path / "data" / "val_set"
    npy_release(str(split), per_class=1)
    config = data_config(tmp_path / "data", tmp_path / "tfds")
    assert affectnet.load_source(config, None).counts["kept"] == 8
    npy_example(str(split), "extra", exp="3")
    source = affectnet.load_source(config, None)
    assert source.counts["kept"] == 9


# --- bad input ---------------------------------------------------------------------------------


def test_missing_or_empty_or_unrecognised_dir_is_a_clear_error(tmp_path):
    tfds_dir = tmp_path / "tfds"
    with pytest.raises(DataError, match="does not exist.*official.*npy.*manifest.*folders"):
        affectnet.load_source(data_config(tmp_path / "nowhere", tfds_dir), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        affectnet.load_source(data_config(tmp_path / "empty", tfds_dir), None)
    (tmp_path / "other" / "misc").mkdir(parents=True)
    (tmp_path / "other" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no AffectNet layout.*Found: misc/, readme.txt"):
        affectnet.load_source(data_config(tmp_path / "other", tfds_dir), None)
    assert issubclass(DataError, ValueError)


def test_requested_layout_that_does_not_match_is_a_clear_error(tmp_path):
    npy_release(str(tmp_path / "data" / "val_set"), per_class=1)
    with pytest.raises(DataError, match="layout='official' but .* found: val_set/"):
        affectnet.load_source(
            data_config(tmp_path / "data", tmp_path / "tfds", layout="official"), None
        )
    with pytest.raises(DataError, match="expected 'auto' or one of"):
        affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds", layout="csv"), None)


def test_nothing_usable_is_a_clear_error_and_caches_nothing(tmp_path):
    split = tmp_path / "data" / "val_set"
    npy_example(str(split), "a", exp="9")
    npy_example(str(split), "b", exp="10")
    config = data_config(tmp_path / "data", tmp_path / "tfds")
    with pytest.raises(DataError, match="no usable example.*dropped_non_emotion 2"):
        affectnet.load_source(config, None)
    builder = affectnet.Affectnet(
        config=affectnet.make_builder_config(str(tmp_path / "data"))[0],
        data_dir=str(tmp_path / "tfds"),
    )
    assert not builder.is_prepared()


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))


def test_data_report_is_written_when_the_data_error_stops_the_run(tmp_path):
    split = tmp_path / "data" / "val_set"
    npy_example(str(split), "a", exp="9")
    work = tmp_path / "work"
    with pytest.raises(DataError, match="no usable example") as raised:
        affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), str(work))
    report = _strict(work / "data_report.json")
    assert report["error"] == str(raised.value)
    assert report["splits"]["train"]["counts"]["dropped_non_emotion"] == 1
    assert report["splits"]["train"]["examples"]["dropped_non_emotion"] == [
        "val_set/images/a.jpg: expression 9"
    ]
    # No layout found at all: the report says so.
    with pytest.raises(DataError, match="does not exist"):
        affectnet.load_source(data_config(tmp_path / "nowhere", tmp_path / "tfds"), str(work))
    report = _strict(work / "data_report.json")
    assert "does not exist" in report["error"] and report["data_dir"].endswith("nowhere")


def test_an_interrupted_preparation_is_cleaned_up_by_the_next(tmp_path):
    npy_release(str(tmp_path / "data" / "val_set"), per_class=1)
    name = affectnet.make_builder_config(str(tmp_path / "data"))[0].name
    leftover = tmp_path / "tfds" / "affectnet" / name / "incomplete.K1LLED_1.0.0"
    (leftover / "affectnet-train.array_record-00000-of-00001").parent.mkdir(parents=True)
    (leftover / "affectnet-train.array_record-00000-of-00001").write_bytes(b"half")
    source = affectnet.load_source(data_config(tmp_path / "data", tmp_path / "tfds"), None)
    assert source.counts["kept"] == 8
    assert not leftover.exists()
    assert sorted(os.listdir(leftover.parent)) == [".prepare.lock", "1.0.0"]


def test_source_feeds_the_input_pipeline(tmp_path):
    npy_release(str(tmp_path / "data" / "val_set"), per_class=5)
    config = data_config(tmp_path / "data", tmp_path / "tfds", image_size=32)
    config.augment.enabled = True
    splits = pipeline.make_splits(config, None)
    batch = next(iter(pipeline.train_batches(splits.train, config, epoch=0, batch_size=4)))
    assert batch["image"].shape == (4, 32, 32, 3)
    assert math.isfinite(float(tf.reduce_sum(batch["valence_arousal"])))
