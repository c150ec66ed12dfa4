"""Keras weight files -> Flax backbones: forward parity with Keras, file layouts, errors.

Keras builds VGG16/ResNet50 with random weights (random biases and BatchNorm statistics too, so
every tensor's mapping matters), writes them in the official legacy HDF5 layout (also with the
old VGG16 names `block1_conv1_W_1:0` and with chunked `layer_names0..`), through Keras's own
legacy writer, and as Keras 3 `.weights.h5`; the ported Flax models must reproduce Keras's
outputs. The measured errors are printed in the terminal summary and stored in the pytest
cache (`affect_jax/weights_parity`).
"""

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import h5py
import jax
import keras  # a test dependency: writes genuine Keras weight files
import numpy as np
import pytest
from flax import nnx

from affect_jax import steps, weights
from affect_jax.models import create_backbone, create_model
from tests.conftest import REPO, randomize_keras_weights, report_measurements, tiny_config

SIZES = (32, 64)
# Twice the worst measured (max|jax - keras| / max|keras|, default conv path): VGG16 features
# at 64 px 2.8e-6; ResNet50 features 1.5e-6; logits 7.5e-7 (ResNet50), 2.6e-6 (VGG16).
RTOL = 6e-6
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_errors(request):
    """Reports the measured parity errors whether or not output capture is on."""
    yield
    report_measurements(request, "affect_jax/weights_parity", RESULTS, _summary)


def _summary(results: dict[str, float]) -> list[str]:
    return ["max|flax - keras| / max|keras| (inference mode):"] + [
        f"  {case:<58s} {err:.3e}" for case, err in sorted(results.items())
    ]


# --------------------------------------------------------------------------------------------
# Writing Keras files.


def _copy_weights(src, dst):
    for layer in dst.layers:
        if layer.weights and layer.name in {x.name for x in src.layers}:
            src_layer = src.get_layer(layer.name)
            if [w.shape for w in src_layer.weights] == [w.shape for w in layer.weights]:
                layer.set_weights(src_layer.get_weights())


def write_legacy_h5(path, model, *, old_vgg_names=False, chunks=1, skip=()):
    """The official keras-applications layout: layer_names + per-layer weight_names."""
    layers = [layer for layer in model.layers if layer.name not in skip]
    with h5py.File(path, "w") as f:
        names = np.array([layer.name.encode() for layer in layers])
        if chunks == 1:
            f.attrs["layer_names"] = names
        else:  # Keras splits attributes over 64 KB into layer_names0, layer_names1, ...
            for i, part in enumerate(np.array_split(names, chunks)):
                f.attrs[f"layer_names{i}"] = part
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in layers:
            group = f.create_group(layer.name)
            wnames = []
            for var, value in zip(layer.weights, layer.get_weights(), strict=True):
                if old_vgg_names:  # As in vgg16_weights_tf_dim_ordering_tf_kernels*.h5.
                    wname = f"{layer.name}_{ {'kernel': 'W', 'bias': 'b'}[var.name] }_1:0"
                else:
                    wname = f"{layer.name}/{var.name}:0"
                group.create_dataset(wname, data=value)
                wnames.append(wname.encode())
            group.attrs["weight_names"] = np.array(wnames, dtype="S64")
    return str(path)


def write_keras_legacy(path, model):
    """Keras's own legacy writer (what model.save_weights('x.h5') did before Keras 3)."""
    from keras.src.legacy.saving import legacy_h5_format as legacy

    with h5py.File(path, "w") as f:
        legacy.save_weights_to_hdf5_group(f, model)
    return str(path)


def strip_keras3_names(src, dst):
    """A Keras 3 file without the layer-name metadata (mapped by Keras's layer order)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for key in f["layers"]:
            if "vars" in f["layers"][key]:
                f["layers"][key]["vars"].attrs.pop("name", None)
    return str(dst)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # Roughly the range of caffe-preprocessed pixels.
    return {s: rng.normal(0, 60, (2, s, s, 3)).astype(np.float32) for s in SIZES}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("resnet")
    keras.utils.set_random_seed(1)  # Reproducible kernels (and so reproducible errors).
    rng = np.random.default_rng(1)
    top = keras.applications.ResNet50(
        weights=None, include_top=True, input_shape=(32, 32, 3), classifier_activation=None
    )
    randomize_keras_weights(keras, top, rng)
    flex = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(None, None, 3))
    _copy_weights(top, flex)
    features = {s: np.asarray(flex(images[s], training=False)) for s in SIZES}
    predictions = top.get_layer("predictions")
    logits = {s: np.asarray(predictions(features[s].mean(axis=(1, 2)))) for s in SIZES}
    np.testing.assert_allclose(
        logits[32], np.asarray(top(images[32], training=False)), rtol=1e-4, atol=1e-4
    )
    top.save_weights(d / "resnet50_top.weights.h5")
    files = {
        "legacy_top": write_legacy_h5(d / "resnet50_top.h5", top),
        "legacy_notop": write_legacy_h5(
            d / "resnet50_notop.h5", top, skip=("avg_pool", "predictions")
        ),
        "legacy_chunked": write_legacy_h5(d / "resnet50_chunked.h5", top, chunks=3),
        "keras_writer_top": write_keras_legacy(d / "resnet50_keras_writer.h5", top),
        "keras3_top": str(d / "resnet50_top.weights.h5"),
        "keras3_nameless": strip_keras3_names(
            d / "resnet50_top.weights.h5", d / "resnet50_nameless.weights.h5"
        ),
    }
    yield {"files": files, "features": features, "logits": logits, "dir": d}
    shutil.rmtree(d, ignore_errors=True)  # ~0.6 GB; pytest would keep it for 3 sessions.


@pytest.fixture(scope="module")
def vgg(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("vgg")
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    out = {"features": {}, "logits": {}, "files": {}}
    first = None
    for s in SIZES:  # fc1's input size depends on the image size: one top model per size.
        model = keras.applications.VGG16(
            weights=None, include_top=True, input_shape=(s, s, 3), classifier_activation=None
        )
        randomize_keras_weights(keras, model, rng)
        if first is None:
            first = model
        else:
            _copy_weights(first, model)  # Same convs, so one no-top model serves both sizes.
        feat = keras.Model(model.input, model.get_layer("block5_pool").output)
        out["features"][s] = np.asarray(feat(images[s], training=False))
        out["logits"][s] = np.asarray(model(images[s], training=False))
        out["files"][f"legacy_oldnames_top{s}"] = write_legacy_h5(
            d / f"vgg16_top{s}.h5", model, old_vgg_names=True
        )
        if s == 32:
            model.save_weights(d / "vgg16_top32.weights.h5")
            out["files"]["keras3_top32"] = str(d / "vgg16_top32.weights.h5")
            out["files"]["legacy_notop"] = write_legacy_h5(
                d / "vgg16_notop.h5", model, skip=("flatten", "fc1", "fc2", "predictions")
            )
    yield out
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Flax side.


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x, train=False)


def _run(model, x):
    graphdef, state = nnx.split(model)
    return np.asarray(_apply(graphdef, state, x))


def _abstract(arch, include_top=False, **kwargs):
    """A backbone without random init (loading replaces every value)."""
    return nnx.eval_shape(lambda: create_backbone(arch, include_top, **kwargs))


def _loaded(arch, path, include_top=False, **kwargs):
    return weights.load_keras_h5(_abstract(arch, include_top, **kwargs), path)


def _snapshot(model):
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))


def _assert_same(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y)


def _check(case, got, ref):
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    RESULTS[case] = err
    assert got.shape == ref.shape
    assert err <= RTOL, f"{case}: relative error {err:.2e}"


# --------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("fmt", ["legacy_top", "legacy_notop", "legacy_chunked", "keras3_top"])
def test_resnet50_features_match_keras(resnet, images, fmt):
    model = _loaded("resnet50", resnet["files"][fmt])
    for s in SIZES:
        _check(f"resnet50 features {s}px <- {fmt}", _run(model, images[s]), resnet["features"][s])


@pytest.mark.parametrize("fmt", ["legacy_top", "keras_writer_top", "keras3_top", "keras3_nameless"])
def test_resnet50_logits_match_keras(resnet, images, fmt):
    model = _loaded("resnet50", resnet["files"][fmt], include_top=True)
    for s in SIZES:
        _check(f"resnet50 logits {s}px <- {fmt}", _run(model, images[s]), resnet["logits"][s])


@pytest.mark.parametrize("fmt", ["legacy_oldnames_top32", "legacy_notop", "keras3_top32"])
def test_vgg16_features_match_keras(vgg, images, fmt):
    model = _loaded("vgg16", vgg["files"][fmt])
    for s in SIZES:
        _check(f"vgg16 features {s}px <- {fmt}", _run(model, images[s]), vgg["features"][s])


@pytest.mark.parametrize(
    "size, fmt",
    [(32, "legacy_oldnames_top32"), (32, "keras3_top32"), (64, "legacy_oldnames_top64")],
)
def test_vgg16_logits_match_keras(vgg, images, size, fmt):
    model = _loaded("vgg16", vgg["files"][fmt], include_top=True, input_size=size)
    _check(f"vgg16 logits {size}px <- {fmt}", _run(model, images[size]), vgg["logits"][size])


def test_top_layers_skipped_and_logged(resnet, vgg, caplog):
    with caplog.at_level(logging.INFO, logger="absl"):
        _loaded("resnet50", resnet["files"]["legacy_top"])
        _loaded("vgg16", vgg["files"]["legacy_oldnames_top32"])
    assert "skipped top layers ['predictions']" in caplog.text
    assert "skipped top layers ['fc1', 'fc2', 'predictions']" in caplog.text


# --------------------------------------------------------------------------------------------
# Errors: a clear message, and the model unchanged.


@pytest.fixture(scope="module")
def resnet_model(resnet):
    return _loaded("resnet50", resnet["files"]["legacy_notop"])


def _edited_copy(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return str(dst)


def _drop_layer(name):
    def edit(f):
        f.attrs["layer_names"] = np.array([n for n in f.attrs["layer_names"] if n != name.encode()])
        del f[name]

    return edit


def _add_layer(f):
    f.attrs["layer_names"] = np.array(list(f.attrs["layer_names"]) + [b"mystery_dense"])
    g = f.create_group("mystery_dense")
    g.create_dataset("mystery_dense/kernel:0", data=np.ones((2, 2), np.float32))
    g.attrs["weight_names"] = np.array([b"mystery_dense/kernel:0"])


def _drop_weight(f):
    f["conv1_bn"].attrs["weight_names"] = f["conv1_bn"].attrs["weight_names"][:3]


def _nan(f):
    f["conv4_block3_2_conv"]["conv4_block3_2_conv/bias:0"][0] = np.nan


def _write_old_resnet(path):
    """A tiny stand-in for the pre-2019 ResNet50 file (its layer names)."""
    with h5py.File(path, "w") as f:
        names = [b"input_1", b"conv1", b"bn_conv1", b"res2a_branch2a", b"bn2a_branch2a"]
        f.attrs["layer_names"] = np.array(names)
        for n in names:
            g = f.create_group(n.decode())
            wnames = [] if n == b"input_1" else [n + b"_W:0"]
            for w in wnames:
                g.create_dataset(w.decode(), data=np.zeros((1, 1), np.float32))
            g.attrs["weight_names"] = np.array(wnames, dtype="S32")
    return str(path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("truncated", "truncated or corrupt"),
        ("not_hdf5", "truncated or corrupt"),
        ("vgg_file", "holds vgg16 weights but the model is resnet50"),
        ("old_resnet", "old keras ResNet50 weight file.*res2a_branch2a"),
        ("missing_layer", r"missing layers \['conv3_block2_2_bn'\]"),
        ("extra_layer", r"does not have \['mystery_dense'\]"),
        ("missing_tensor", "layer 'conv1_bn' has 3 tensors"),
        ("nan", "layer 'conv4_block3_2_conv' bias: contains NaN"),
        ("missing_file", "not found"),
        ("keras3_vgg", "holds vgg16 weights"),
    ],
)
def test_bad_files_are_refused_and_leave_model_unchanged(
    resnet, vgg, resnet_model, tmp_path, case, match
):
    notop = resnet["files"]["legacy_notop"]
    if case == "truncated":
        path = tmp_path / "resnet50_truncated.h5"
        with open(notop, "rb") as src:
            path.write_bytes(src.read(os.path.getsize(notop) // 2))
    elif case == "not_hdf5":
        path = tmp_path / "garbage.h5"
        path.write_bytes(b"<html>404 Not Found</html>" * 100)
    elif case == "vgg_file":
        path = vgg["files"]["legacy_notop"]
    elif case == "keras3_vgg":
        path = vgg["files"]["keras3_top32"]
    elif case == "old_resnet":
        path = _write_old_resnet(tmp_path / "old.h5")
    elif case == "missing_layer":
        path = _edited_copy(notop, tmp_path / "m.h5", _drop_layer("conv3_block2_2_bn"))
    elif case == "extra_layer":
        path = _edited_copy(notop, tmp_path / "e.h5", _add_layer)
    elif case == "missing_tensor":
        path = _edited_copy(notop, tmp_path / "t.h5", _drop_weight)
    elif case == "nan":
        path = _edited_copy(notop, tmp_path / "n.h5", _nan)
    else:
        path = tmp_path / "nowhere.h5"
    before = _snapshot(resnet_model)
    with pytest.raises(weights.WeightFileError, match=match):
        weights.load_keras_h5(resnet_model, str(path))
    _assert_same(before, _snapshot(resnet_model))
    shutil.rmtree(tmp_path, ignore_errors=True)  # Edited ~100 MB copies.


def test_old_resnet50_md5_is_refused(resnet, resnet_model, monkeypatch):
    path = resnet["files"]["legacy_notop"]
    monkeypatch.setattr(weights, "OLD_RESNET50_MD5S", frozenset({weights.file_md5(path)}))
    with pytest.raises(weights.WeightFileError, match="a268eb855778b3df3c7506639542a6af"):
        weights.load_keras_h5(resnet_model, path)


def test_wrong_shapes_and_missing_top(resnet, vgg):
    with pytest.raises(weights.WeightFileError, match=r"conv1_conv.*\(7, 7, 3, 64\).*width=0.5"):
        _loaded("resnet50", resnet["files"]["legacy_notop"], width=0.5)
    with pytest.raises(weights.WeightFileError, match="predictions.*no-top file"):
        _loaded("resnet50", resnet["files"]["legacy_notop"], include_top=True)
    with pytest.raises(weights.WeightFileError, match="layer 'fc1' kernel"):
        _loaded("vgg16", vgg["files"]["legacy_oldnames_top64"], include_top=True, input_size=32)
    with pytest.raises(weights.WeightFileError, match="holds resnet50 weights"):
        _loaded("vgg16", resnet["files"]["keras3_nameless"])


def test_official_name_with_other_md5_warns(resnet, tmp_path):
    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    shutil.copy(resnet["files"]["legacy_notop"], path)
    with pytest.warns(UserWarning, match="not the official 4d473c1dd8becc155b73f8504c6f6626"):
        _loaded("resnet50", str(path))
    os.remove(path)


# --------------------------------------------------------------------------------------------
# Ported directories and the training entry point.


def test_save_and_load_ported(resnet, resnet_model, vgg, tmp_path):
    out = weights.save_ported(resnet_model, tmp_path / "ported")
    meta = json.loads((tmp_path / "ported" / "ported.json").read_text())
    assert meta["arch"] == "resnet50" and meta["include_top"] is False
    restored = weights.load_ported(_abstract("resnet50"), out)
    _assert_same(_snapshot(resnet_model), _snapshot(restored))
    with pytest.raises(FileExistsError):
        weights.save_ported(resnet_model, out)
    # A ported VGG16 refuses a ResNet50 model.
    vgg_dir = weights.save_ported(_loaded("vgg16", vgg["files"]["legacy_notop"]), tmp_path / "vgg")
    with pytest.raises(weights.WeightFileError, match="ported vgg16 weights"):
        weights.load_ported(_abstract("resnet50"), vgg_dir)


def test_load_backbone_weights_entry_point(resnet, tmp_path):
    for bad, match in [
        ("", "config.model.weights is empty"),
        (str(tmp_path / "nope"), "no such file"),
        (str(tmp_path), "without ported.json"),
    ]:
        with pytest.raises(weights.WeightFileError, match=match):
            weights.load_backbone_weights(_abstract("resnet50"), bad)
    config = tiny_config(**{"model.name": "resnet50", "model.width": 1.0})
    model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(0)))
    weights.load_backbone_weights(model, resnet["files"]["legacy_top"])
    expected = _snapshot(_loaded("resnet50", resnet["files"]["legacy_notop"]))
    _assert_same(expected, _snapshot(model.backbone))


def test_imagenet_init_skips_only_random_values_the_file_replaces(resnet):
    """``create_initial_model`` never computes the backbone's random values: the same model as
    initialising every variable, then loading the file."""
    config = tiny_config(
        **{
            "model.name": "resnet50",
            "model.width": 1.0,
            "model.init": "imagenet",
            "model.weights": resnet["files"]["legacy_notop"],
            "seed": 5,
        }
    )
    want = weights.load_backbone_weights(steps.init_model(config), config.model.weights)
    _assert_same(_snapshot(steps.create_initial_model(config)), _snapshot(want))


def test_port_weights_command_end_to_end(resnet, tmp_path):
    out = tmp_path / "resnet50_imagenet"
    # The affect-jax-port-weights console script runs `run` of this module.
    cmd = [
        sys.executable,
        "-m",
        "affect_jax.tools.port_weights",
        "--arch=resnet50",
        f"--keras_h5={resnet['files']['keras_writer_top']}",
        f"--output={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "ported.json").read_text())
    assert meta["source_file"] == "resnet50_keras_writer.h5"
    assert meta["source_md5"] == weights.file_md5(resnet["files"]["keras_writer_top"])
    model = weights.load_backbone_weights(_abstract("resnet50"), str(out))
    _assert_same(_snapshot(_loaded("resnet50", resnet["files"]["legacy_notop"])), _snapshot(model))


def test_third_party_table_matches_loader_and_spec():
    with open(os.path.join(REPO, "third_party", "keras_weights.json")) as f:
        table = {e["file"]: e for e in json.load(f)["files"]}
    spec = {  # The four official md5s (docs/study.md, the md5 table).
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5": "6d6bbae143d832006294945121d1f1fc",
        "vgg16_weights_tf_dim_ordering_tf_kernels.h5": "64373286793e3c8b2b4e3219cbf3544b",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": "4d473c1dd8becc155b73f8504c6f6626",
        "resnet50_weights_tf_dim_ordering_tf_kernels.h5": "2cb95161c43110f7111970584f804107",
    }
    assert {k: v["md5"] for k, v in table.items()} == spec
    assert {k: v["md5"] for k, v in weights.OFFICIAL_FILES.items()} == spec
    for name, entry in table.items():
        assert entry["url"].endswith("/" + name)
        assert entry["url"].startswith(
            "https://storage.googleapis.com/tensorflow/keras-applications/"
        )
        assert entry["license"] == ("CC BY 4.0" if name.startswith("vgg16") else "MIT")
    assert hashlib.md5(b"").hexdigest() == weights.file_md5(os.devnull)
