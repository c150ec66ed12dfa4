"""ImageNet weights: read Keras application .h5 files into the Flax backbones, and store them.

Two Keras file layouts are read:

* legacy HDF5 (the official `keras-applications` downloads, `tf_keras` `save_weights('x.h5')`):
  root attribute `layer_names` (possibly chunked `layer_names0`, `layer_names1`, ...), one group
  per layer whose attribute `weight_names` lists its tensors in order. Names are read from the
  file (the VGG16 file uses old names such as `block1_conv1_W_1:0`).
* Keras 3 `.weights.h5`: `layers/<snake_case class>[_N]/vars/0..`, the Keras layer name in the
  `vars` group's `name` attribute (files without it are mapped by Keras's layer order).

Loading validates everything (architecture, layer set, tensor counts, shapes, finiteness) before
anything is assigned, so a failed load leaves the model unchanged. The ported format
(`save_ported` / `load_ported`) is an Orbax checkpoint of the backbone's nnx state plus
`ported.json` (arch, source file, md5).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import h5py
import jax
import numpy as np
from absl import logging
from flax import nnx

from affect_jax.errors import UserError
from affect_jax.models import resnet50 as resnet50_lib
from affect_jax.models import vgg16 as vgg16_lib

# Official keras-applications files (also recorded in third_party/keras_weights.json).
OFFICIAL_FILES: dict[str, dict[str, Any]] = {
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5": {
        "md5": "6d6bbae143d832006294945121d1f1fc",
        "arch": "vgg16",
        "include_top": False,
    },
    "vgg16_weights_tf_dim_ordering_tf_kernels.h5": {
        "md5": "64373286793e3c8b2b4e3219cbf3544b",
        "arch": "vgg16",
        "include_top": True,
    },
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": {
        "md5": "4d473c1dd8becc155b73f8504c6f6626",
        "arch": "resnet50",
        "include_top": False,
    },
    "resnet50_weights_tf_dim_ordering_tf_kernels.h5": {
        "md5": "2cb95161c43110f7111970584f804107",
        "arch": "resnet50",
        "include_top": True,
    },
}
# The pre-2019 ResNet50 file with the same name (layers res2a_branch2a, bn_conv1, ...; a
# different graph without pool1 padding): refused, its tensors do not fit this architecture.
OLD_RESNET50_MD5S = frozenset({"a268eb855778b3df3c7506639542a6af"})
_OLD_RESNET_NAME = re.compile(r"^(res|bn)\d[a-z]\w*_branch\d|^bn_conv1$|^fc1000$")

PORTED_METADATA = "ported.json"
PORTED_STATE_DIR = "backbone"
PORTED_FORMAT = "affect_jax.ported_backbone"

_ARCH_LIBS = {"vgg16": vgg16_lib, "resnet50": resnet50_lib}
# Keras layer signatures of each architecture, to name the architecture of a foreign file.
_ARCH_MARKERS = {"vgg16": "block1_conv1", "resnet50": "conv1_conv"}
# Flax variable names of each layer kind, in Keras weight order.
_CONV_KEYS = ("kernel", "bias")
_BN_KEYS = ("scale", "bias", "mean", "var")
_KEY_ORDER = ("kernel", "scale", "bias", "mean", "var")
_BN_TOKENS = ("gamma", "beta", "moving_mean", "moving_variance")
# Keras 3 .weights.h5 group prefixes (snake_case class names) of each layer kind.
_KERAS3_KIND = {"conv": "conv2d", "bn": "batch_normalization", "dense": "dense"}


class WeightFileError(UserError, ValueError):
    """A weight file or ported directory that cannot be loaded into the model."""


# --------------------------------------------------------------------------------------------
# Helpers.


def file_md5(path: str) -> str:
    """md5 hex digest of a file (streamed)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _backbone_of(module: nnx.Module) -> nnx.Module:
    """The backbone inside a MultiTaskModel, or the module itself."""
    backbone = getattr(module, "backbone", module)
    if getattr(backbone, "arch", None) not in _ARCH_LIBS:
        raise TypeError(
            f"expected a VGG16/ResNet50 backbone or a model with .backbone, got "
            f"{type(module).__name__}"
        )
    return backbone


def _layer_kind(arch: str, name: str) -> str:
    if name in _ARCH_LIBS[arch].TOP_LAYER_NAMES:
        return "dense"
    return "bn" if name.endswith("_bn") else "conv"


def _guess_arch(names: set[str]) -> str | None:
    for arch, marker in _ARCH_MARKERS.items():
        if marker in names:
            return arch
    return None


def _decode(values: Any) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _attr_list(group: h5py.Group, name: str) -> list[str] | None:
    """A (possibly chunked: name0, name1, ...) list attribute, as Keras writes it."""
    if name in group.attrs:
        return _decode(group.attrs[name])
    if f"{name}0" not in group.attrs:
        return None
    out: list[str] = []
    i = 0
    while f"{name}{i}" in group.attrs:
        out += _decode(group.attrs[f"{name}{i}"])
        i += 1
    return out


# --------------------------------------------------------------------------------------------
# Reading Keras files into {layer name: [arrays in Keras order]}.


def _read_legacy(root: h5py.Group) -> tuple[dict[str, list[np.ndarray]], dict[str, list[str]]]:
    layer_names = _attr_list(root, "layer_names")
    layers: dict[str, list[np.ndarray]] = {}
    weight_names: dict[str, list[str]] = {}
    for name in layer_names or []:
        if name not in root:
            raise WeightFileError(f"layer '{name}' is listed in layer_names but has no group")
        names = _attr_list(root[name], "weight_names") or []
        if not names:
            continue  # Layers without weights (input, padding, pooling, activations).
        arrays = []
        for wname in names:
            if wname not in root[name]:
                raise WeightFileError(f"layer '{name}': weight '{wname}' is missing")
            arrays.append(np.asarray(root[name][wname]))
        layers[name] = arrays
        weight_names[name] = names
    return layers, weight_names


def _read_keras3(
    root: h5py.Group, arch: str, source: str
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[str]]]:
    # keras.applications names its models 'vgg16' / 'resnet50' (root 'vars' metadata).
    model_name = root["vars"].attrs.get("name") if "vars" in root else None
    if isinstance(model_name, bytes):
        model_name = model_name.decode("utf8")
    if model_name in _ARCH_LIBS and model_name != arch:
        raise WeightFileError(f"{source} holds {model_name} weights but the model is {arch}")
    groups = root["layers"]
    named: dict[str, list[np.ndarray]] = {}
    by_key: dict[str, list[np.ndarray]] = {}
    nameless = False
    for key in groups:
        vars_group = groups[key].get("vars")
        if not isinstance(vars_group, h5py.Group) or len(vars_group) == 0:
            continue
        arrays = [np.asarray(vars_group[str(i)]) for i in range(len(vars_group))]
        by_key[key] = arrays
        name = vars_group.attrs.get("name")
        if name is None:
            nameless = True
        else:
            named[name.decode("utf8") if isinstance(name, bytes) else str(name)] = arrays
    if nameless:
        named = _map_keras3_by_order(by_key, arch)
    return named, {k: [f"vars/{i}" for i in range(len(v))] for k, v in named.items()}


def _map_keras3_by_order(by_key: dict[str, list[np.ndarray]], arch: str) -> dict[str, Any]:
    """Maps `conv2d_N` etc. to Keras layer names through Keras's layer order (older files)."""
    lib = _ARCH_LIBS[arch]
    order = lib.keras_layer_names(include_top=True)
    counters: dict[str, int] = {}
    out = {}
    top = set(lib.TOP_LAYER_NAMES)
    for name in order:
        prefix = _KERAS3_KIND[_layer_kind(arch, name)]
        n = counters.get(prefix, 0)
        counters[prefix] = n + 1
        key = prefix if n == 0 else f"{prefix}_{n}"
        if key in by_key:
            out[name] = by_key.pop(key)
        elif name not in top:
            raise WeightFileError(
                f"Keras 3 file without layer names: no group 'layers/{key}' for layer '{name}' "
                f"(not a {arch} file?)"
            )
    if by_key:
        raise WeightFileError(
            f"Keras 3 file without layer names has groups that {arch} does not: "
            f"{sorted(by_key)[:8]} (a file of another architecture?)"
        )
    return out


def read_keras_h5(path: str, arch: str) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """Reads a Keras weights file: ({layer: [arrays in Keras order]}, info).

    `arch` is only used to name the layers of Keras 3 files lacking name metadata.
    """
    info: dict[str, Any] = {"path": path}
    try:
        with h5py.File(path, "r") as f:
            root: h5py.Group = f
            if "layer_names" not in f.attrs and "layer_names0" not in f.attrs:
                if "model_weights" in f:  # A whole-model .h5 (model.save) keeps them here.
                    root = f["model_weights"]
            if _attr_list(root, "layer_names") is not None:
                info["format"] = "keras-legacy-h5"
                layers, names = _read_legacy(root)
            elif "layers" in f and isinstance(f["layers"], h5py.Group):
                info["format"] = "keras3-weights-h5"
                layers, names = _read_keras3(f, arch, path)
            else:
                raise WeightFileError(
                    f"{path} is HDF5 but not a Keras weights file (no layer_names attribute "
                    f"and no 'layers' group)"
                )
    except WeightFileError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise WeightFileError(
            f"cannot read {path}: {e} (truncated or corrupt file? re-download it and check its md5)"
        ) from e
    info["weight_names"] = names
    return layers, info


def _check_file_identity(path: str, md5: str) -> None:
    base = os.path.basename(path)
    if md5 in OLD_RESNET50_MD5S:
        raise WeightFileError(_old_resnet_message(path))
    official = OFFICIAL_FILES.get(base)
    if official is not None and official["md5"] != md5:
        msg = (
            f"{path} has md5 {md5}, not the official {official['md5']} of {base}; "
            "loading it anyway (a modified or re-saved file?)"
        )
        logging.warning("%s", msg)
        warnings.warn(msg, stacklevel=3)


def _old_resnet_message(path: str) -> str:
    return (
        f"{path} is the old keras ResNet50 weight file (layers like res2a_branch2a, md5 "
        "a268eb855778b3df3c7506639542a6af): it belongs to a different graph (no pool1 padding, "
        "other layer names) and is not loaded. Use the current keras-applications file "
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 (md5 "
        f"{OFFICIAL_FILES['resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5']['md5']})."
    )


def _check_arch(names: set[str], arch: str, source: str) -> str | None:
    """Refuses the old ResNet50 layout and files of the other architecture."""
    if any(_OLD_RESNET_NAME.search(n) for n in names):
        raise WeightFileError(_old_resnet_message(source))
    file_arch = _guess_arch(names)
    if file_arch is not None and file_arch != arch:
        raise WeightFileError(
            f"{source} holds {file_arch} weights but the model is {arch} (wrong file for "
            "config.model.name?)"
        )
    return file_arch


def _to_flax_layers(
    arch: str, layers: dict[str, list[np.ndarray]], weight_names: dict[str, list[str]]
) -> dict[str, dict[str, np.ndarray]]:
    """Keras-ordered tensors -> {layer: {flax variable name: array}}."""
    out = {}
    for name, arrays in layers.items():
        kind = _layer_kind(arch, name)
        keys = _BN_KEYS if kind == "bn" else _CONV_KEYS
        wnames = weight_names.get(name, [])
        if len(arrays) != len(keys):
            raise WeightFileError(
                f"layer '{name}' has {len(arrays)} tensors {wnames}, expected {len(keys)} "
                f"({', '.join(keys)})"
            )
        if kind == "bn":
            # Keras order is gamma, beta, moving_mean, moving_variance; when the names say
            # which is which, trust the names.
            pos = [
                next((i for i, w in enumerate(wnames) if tok in w.split("/")[-1]), None)
                for tok in _BN_TOKENS
            ]
            if None not in pos and len(set(pos)) == 4:
                arrays = [arrays[i] for i in pos]
        out[name] = dict(zip(keys, arrays, strict=True))
    return out


# --------------------------------------------------------------------------------------------
# Validation and assignment.


def _check_layer_set(backbone: nnx.Module, file_names: set[str], source: str) -> list[str]:
    """Checks the file has exactly the backbone's layers; returns the top layers to skip."""
    arch = backbone.arch
    file_arch = _check_arch(file_names, arch, source)
    expected = _ARCH_LIBS[arch].keras_layer_names(backbone.include_top)
    top = set(_ARCH_LIBS[arch].TOP_LAYER_NAMES)
    ignored = []
    if not backbone.include_top:
        ignored = [n for n in _ARCH_LIBS[arch].keras_layer_names(True) if n in top & file_names]
    missing = [n for n in expected if n not in file_names]
    unexpected = sorted(file_names - set(expected) - set(ignored))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing layers {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(
                f"layers the {arch} model does not have {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        hint = ""
        if file_arch is None:
            hint = f" (not a {arch} weight file?)"
        elif missing and set(missing) <= top:
            hint = " (a no-top file loaded into a model with include_top=True?)"
        raise WeightFileError(f"{source}: {'; '.join(parts)}{hint}")
    return ignored


def _assign(
    backbone: nnx.Module,
    layers: Mapping[str, Mapping[str, np.ndarray]],
    source: str,
) -> list[str]:
    """Validates `layers` against the backbone and assigns them; returns ignored top layers."""
    ignored = _check_layer_set(backbone, set(layers), source)
    expected = _ARCH_LIBS[backbone.arch].keras_layer_names(backbone.include_top)
    state = nnx.state(backbone)
    current = nnx.to_pure_dict(state)
    new: dict[str, dict[str, np.ndarray]] = {}
    for name in expected:
        cur = current.get(name)
        if not isinstance(cur, Mapping):
            raise WeightFileError(f"model has no layer '{name}' (internal naming mismatch)")
        given = layers[name]
        if set(given) != set(cur):
            raise WeightFileError(
                f"layer '{name}': file provides {sorted(given)}, model needs {sorted(cur)}"
            )
        new[name] = {}
        for key in sorted(cur, key=_KEY_ORDER.index):  # Kernel first: clearer errors.
            target = cur[key]
            value = np.asarray(given[key])
            if tuple(value.shape) != tuple(target.shape):
                width_hint = ""
                if getattr(backbone, "width", 1.0) != 1.0:
                    width_hint = f" (model width={backbone.width}; ImageNet weights need 1.0)"
                raise WeightFileError(
                    f"layer '{name}' {key}: file shape {tuple(value.shape)}, model shape "
                    f"{tuple(target.shape)}{width_hint}"
                )
            if not np.issubdtype(value.dtype, np.floating):
                raise WeightFileError(f"layer '{name}' {key}: non-float dtype {value.dtype}")
            value = value.astype(np.float32)
            if not np.all(np.isfinite(value)):
                raise WeightFileError(f"layer '{name}' {key}: contains NaN or inf")
            new[name][key] = value
    extra_model = sorted(set(current) - set(new))
    if extra_model:
        raise WeightFileError(f"model layers not covered by the file: {extra_model[:8]}")
    # Everything is validated: only now touch the model.
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, new))
    nnx.update(backbone, state)
    return ignored


def load_keras_h5(module: nnx.Module, path: str) -> nnx.Module:
    """Loads a Keras VGG16/ResNet50 weight file (legacy .h5 or Keras 3 .weights.h5).

    `module` is a backbone or a model with `.backbone`. A file with the classifier top may be
    loaded into a no-top backbone: exactly the top layers are skipped (and logged). Any other
    mismatch raises `WeightFileError` and leaves the model unchanged.
    """
    backbone = _backbone_of(module)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"weight file not found: {path}")
    md5 = file_md5(path)
    _check_file_identity(path, md5)
    raw, info = read_keras_h5(path, backbone.arch)
    # Before interpreting tensors: a foreign file should fail on its identity and layer set.
    ignored = _check_layer_set(backbone, set(raw), path)
    raw = {k: v for k, v in raw.items() if k not in ignored}
    layers = _to_flax_layers(backbone.arch, raw, info["weight_names"])
    _assign(backbone, layers, path)
    logging.info(
        "Loaded %d %s layers from %s (%s, md5 %s)%s",
        len(layers),
        backbone.arch,
        path,
        info["format"],
        md5,
        f"; skipped top layers {ignored} (model has include_top=False)" if ignored else "",
    )
    return module


# --------------------------------------------------------------------------------------------
# Ported (Orbax) format.


def save_ported(
    module_or_state: nnx.Module | nnx.State,
    output_dir: str,
    *,
    arch: str | None = None,
    include_top: bool | None = None,
    source_file: str = "",
    source_md5: str = "",
    overwrite: bool = False,
) -> str:
    """Stores a backbone's nnx state as an Orbax checkpoint plus `ported.json`; returns the dir.

    With an nnx.State (of the backbone), `arch` and `include_top` must be given.
    """
    import orbax.checkpoint as ocp  # Imported here: only porting and loading need it.

    if isinstance(module_or_state, nnx.Module):
        backbone = _backbone_of(module_or_state)
        arch = backbone.arch
        include_top = backbone.include_top
        width = backbone.width
        state = nnx.state(backbone)
    else:
        if arch not in _ARCH_LIBS or include_top is None:
            raise ValueError(
                f"save_ported(state) needs arch in {tuple(_ARCH_LIBS)} and include_top"
            )
        state, width = module_or_state, None
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    output_dir = os.path.abspath(os.fspath(output_dir))
    ckpt_dir = os.path.join(output_dir, PORTED_STATE_DIR)
    if os.path.exists(ckpt_dir) and not overwrite:
        raise FileExistsError(f"{ckpt_dir} exists (pass overwrite=True to replace it)")
    os.makedirs(output_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt_dir, pure, force=overwrite)
    checkpointer.wait_until_finished()
    meta = {
        "format": PORTED_FORMAT,
        "version": 1,
        "arch": arch,
        "include_top": bool(include_top),
        "width": width,
        "source_file": os.path.basename(source_file) if source_file else "",
        "source_md5": source_md5,
    }
    with open(os.path.join(output_dir, PORTED_METADATA), "w") as f:
        json.dump(meta, f, indent=2)
    return output_dir


def read_ported_metadata(directory: str) -> dict[str, Any]:
    """The `ported.json` of a ported directory (validated)."""
    path = os.path.join(directory, PORTED_METADATA)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightFileError(f"cannot read {path}: {e}") from e
    if meta.get("format") != PORTED_FORMAT or meta.get("arch") not in _ARCH_LIBS:
        raise WeightFileError(f"{path} is not an affect_jax ported-backbone description")
    return meta


def load_ported(model: nnx.Module, directory: str) -> nnx.Module:
    """Loads a directory written by `save_ported` / affect-jax-port-weights into the backbone."""
    import orbax.checkpoint as ocp

    backbone = _backbone_of(model)
    directory = os.path.abspath(os.fspath(directory))
    meta = read_ported_metadata(directory)
    if meta["arch"] != backbone.arch:
        raise WeightFileError(
            f"{directory} holds ported {meta['arch']} weights but the model is {backbone.arch}"
        )
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(directory, PORTED_STATE_DIR))
    except Exception as e:  # Orbax raises assorted types for damaged checkpoints.
        raise WeightFileError(f"cannot restore {directory}/{PORTED_STATE_DIR}: {e}") from e
    layers = {
        name: {k: np.asarray(v) for k, v in tensors.items()} for name, tensors in restored.items()
    }
    ignored = _assign(backbone, layers, directory)
    logging.info(
        "Loaded ported %s weights from %s (source %s, md5 %s)%s",
        backbone.arch,
        directory,
        meta.get("source_file") or "?",
        meta.get("source_md5") or "?",
        f"; skipped top layers {ignored}" if ignored else "",
    )
    return model


def port_keras_h5(
    arch: str, keras_h5: str, output_dir: str, *, include_top: bool = False, overwrite: bool = False
) -> str:
    """Reads a Keras weight file and writes the ported directory (affect-jax-port-weights)."""
    from affect_jax.models import create_backbone

    # Abstract model: every value is replaced by the file's, so skip the random init.
    backbone = nnx.eval_shape(lambda: create_backbone(arch, include_top=include_top))
    load_keras_h5(backbone, keras_h5)
    return save_ported(
        backbone,
        output_dir,
        source_file=keras_h5,
        source_md5=file_md5(keras_h5),
        overwrite=overwrite,
    )


def load_backbone_weights(model: nnx.Module, path: str) -> nnx.Module:
    """Loads `config.model.weights`: a ported directory or a Keras .h5 file."""
    path = os.fspath(path) if path else ""
    if not path:
        raise WeightFileError(
            "config.model.weights is empty: give a directory written by affect-jax-port-weights "
            "or a Keras .h5 file (or set config.model.init=random)"
        )
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, PORTED_METADATA)):
            raise WeightFileError(
                f"{path} is a directory without {PORTED_METADATA}: write it with "
                "affect-jax-port-weights"
            )
        return load_ported(model, path)
    if os.path.isfile(path):
        if not path.endswith(".h5"):
            raise WeightFileError(f"{path}: expected a Keras .h5 file or a ported directory")
        return load_keras_h5(model, path)
    raise WeightFileError(f"config.model.weights: no such file or directory: {path}")
