"""Which layout a directory holds: ``detect_layout`` and the ``LayoutPlan`` it returns (the
splits, which pool each feeds, a fingerprint of the annotation files).

AffectNet's layouts, detected here:

* ``official``: ``training.csv``/``validation.csv`` + ``Manually_Annotated_Images/<sub>/<f>.jpg``.
* ``npy``: ``<split>/images/<id>.jpg`` + ``<split>/annotations/<id>_{exp,val,aro,lnd}.npy``.
* ``manifest``: any CSV with an image column and a label column (``MANIFEST_IMAGE_COLUMNS``,
  ``MANIFEST_LABEL_COLUMNS``), optionally ``valence`` and ``arousal``.
* ``folders``: ``<root>/<class name or index>/*.jpg``, expression only.

Other datasets, detected by their own modules: ``fer2013``, ``ferplus`` (``fer2013``/``ferplus``
modules) and ``rafdb``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from absl import logging

from affect_jax.data.affectnet import fer2013, ferplus, rafdb
from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.labels import class_from_name
from affect_jax.data.affectnet.plans import (
    LayoutPlan,
    SplitSpec,
    assign_pools,
    list_dir,
    listing_fingerprint,
    read_header,
    root_and_children,
    stamp_fingerprint,
    subdirs,
    summary,
)

# Auto-detection tries them in this order (FER+ before FER2013: its votes sit beside
# FER2013's file; manifest and folders last, as the most general).
LAYOUTS = ("official", "npy", "ferplus", "fer2013", "rafdb", "manifest", "folders")

OFFICIAL_CSVS = {"training.csv": "train", "validation.csv": "test"}
OFFICIAL_IMAGES_DIR = "Manually_Annotated_Images"

# Manifest columns, matched case-insensitively with spaces, '_' and '-' ignored; the first of
# each list the header has is used.
MANIFEST_IMAGE_COLUMNS = ("path", "image", "file", "filename", "filepath")
MANIFEST_LABEL_COLUMNS = ("expression", "emotion", "label", "class")

LAYOUT_HELP = (
    "official: training.csv and/or validation.csv plus a Manually_Annotated_Images/ directory "
    "(at the root or one level down); "
    "npy: <split>/images/*.jpg plus <split>/annotations/<id>_exp.npy (the root itself or its "
    "sub-directories as splits); "
    f"ferplus: {ferplus.HELP}; "
    f"fer2013: {fer2013.HELP}; "
    f"rafdb: {rafdb.HELP}; "
    "manifest: a *.csv at the root (or config.data.dir naming the CSV itself) whose header has "
    f"an image column ({'/'.join(MANIFEST_IMAGE_COLUMNS)}) and a label column "
    f"({'/'.join(MANIFEST_LABEL_COLUMNS)}), optionally 'valence' and 'arousal'; "
    "folders: <root>/<class name or index 0-7>/*.jpg"
)


# --------------------------------------------------------------------------------------------
# Detection.


def _detect_official(root: str) -> LayoutPlan | None:
    dirs = root_and_children(root)
    csvs: dict[str, str] = {}
    images_dir = ""
    for d in dirs:
        for entry in list_dir(d):
            full = os.path.join(d, entry)
            if entry.lower() in OFFICIAL_CSVS and os.path.isfile(full):
                csvs.setdefault(entry.lower(), full)
            elif entry == OFFICIAL_IMAGES_DIR and os.path.isdir(full) and not images_dir:
                images_dir = full
    if not csvs:
        return None
    if not images_dir:
        raise DataError(
            f"{root} has the official AffectNet lists ({', '.join(sorted(csvs.values()))}) but no "
            f"{OFFICIAL_IMAGES_DIR}/ directory at the root or one level down (found: "
            f"{summary(root)}). Extract the images next to the CSV files."
        )
    if len(csvs) == 1:  # A single list is the pool the pipeline splits.
        ((name, path),) = csvs.items()
        splits = (SplitSpec("train", name, path),)
    else:
        splits = tuple(
            SplitSpec(OFFICIAL_CSVS[name], name, path) for name, path in sorted(csvs.items())
        )
    return LayoutPlan(
        "official",
        root,
        splits,
        True,
        images_dir,
        stamp_fingerprint(s.path for s in splits),
    )


def _detect_split_dirs(
    root: str, layout: str, is_split: Callable[[str], bool], what: str, has_va: bool
) -> LayoutPlan | None:
    """A plan whose splits are directories: ``root`` itself if ``is_split`` holds for it, else
    its sub-directories for which it holds; None if there is none."""
    if is_split(root):
        found = {os.path.basename(os.path.normpath(root)): root}
    else:
        found = {d: os.path.join(root, d) for d in subdirs(root) if is_split(os.path.join(root, d))}
    if not found:
        return None
    pools = assign_pools(sorted(found), what, root)
    splits = tuple(SplitSpec(pool, name, found[name]) for pool, name in sorted(pools.items()))
    return LayoutPlan(layout, root, splits, has_va, "", listing_fingerprint(splits))


def _is_npy_split(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "images")) and os.path.isdir(
        os.path.join(path, "annotations")
    )


def _is_class_root(path: str) -> bool:
    return any(class_from_name(d) is not None for d in subdirs(path))


def _detect_npy(root: str) -> LayoutPlan | None:
    return _detect_split_dirs(root, "npy", _is_npy_split, "npy split directories", True)


def _detect_folders(root: str) -> LayoutPlan | None:
    return _detect_split_dirs(root, "folders", _is_class_root, "class-folder trees", False)


def column_key(name: str) -> str:
    """A header field as the column lists spell it: 'File Name' -> 'filename'."""
    return "".join(c for c in name.strip().lower() if c not in " _-")


def manifest_columns(header: list[str]) -> tuple[int, int] | None:
    """Indices of the image and the label column of a CSV header, or None if it lacks one."""
    keys = [column_key(c) for c in header]
    image = next((keys.index(c) for c in MANIFEST_IMAGE_COLUMNS if c in keys), None)
    label = next((keys.index(c) for c in MANIFEST_LABEL_COLUMNS if c in keys), None)
    return None if image is None or label is None else (image, label)


def csv_files(root: str) -> list[str]:
    """``root`` itself if it is a CSV file, else the CSV files directly in it."""
    if os.path.isfile(root):
        return [root] if root.lower().endswith(".csv") else []
    return [
        os.path.join(root, e)
        for e in list_dir(root)
        if e.lower().endswith(".csv") and os.path.isfile(os.path.join(root, e))
    ]


def _detect_manifest(root: str) -> LayoutPlan | None:
    found = {}
    for path in csv_files(root):
        header = read_header(path)
        if manifest_columns(header) is not None:
            found[os.path.basename(path)] = (path, [column_key(c) for c in header])
    if not found:
        return None
    pools = assign_pools(sorted(found), "manifest CSV files", root)
    has_va = []
    for name in pools.values():
        header = found[name][1]
        va = ("valence" in header, "arousal" in header)
        if va[0] != va[1]:
            raise DataError(
                f"manifest {found[name][0]} has a {'valence' if va[0] else 'arousal'} column but "
                "no " + ("arousal" if va[0] else "valence") + " column: give both or neither"
            )
        has_va.append(va[0])
    if len(set(has_va)) > 1:
        raise DataError(
            f"the manifests in {root} disagree: some have valence/arousal columns, some do not"
        )
    splits = tuple(SplitSpec(pool, name, found[name][0]) for pool, name in sorted(pools.items()))
    return LayoutPlan(
        "manifest", root, splits, has_va[0], "", stamp_fingerprint(s.path for s in splits)
    )


def _with_image_root(plan: LayoutPlan, image_root: str) -> LayoutPlan:
    """A manifest plan whose relative image paths resolve against ``image_root``."""
    path = os.path.realpath(os.path.expanduser(image_root))
    if not os.path.isdir(path):
        raise DataError(
            f"config.data.image_root={image_root!r} does not exist or is not a directory; "
            "expected the directory the manifest's relative image paths start from"
        )
    return dataclasses.replace(
        plan,
        images_dir=path,
        fingerprint=stamp_fingerprint((s.path for s in plan.splits), f"image_root={path}"),
    )


_DETECTORS: dict[str, Callable[[str], LayoutPlan | None]] = {
    "official": _detect_official,
    "npy": _detect_npy,
    "ferplus": ferplus.detect,
    "fer2013": fer2013.detect,
    "rafdb": rafdb.detect,
    "manifest": _detect_manifest,
    "folders": _detect_folders,
}


def check_data_dir(data_dir: str) -> str:
    """The absolute path of ``data_dir`` (a directory, or a CSV file for the manifest and
    FER2013 layouts), or ``DataError`` if it is missing or empty."""
    if not data_dir:
        raise DataError(
            "config.data.dir is empty: set it to the root of your AffectNet files. Layouts read: "
            + LAYOUT_HELP
        )
    path = os.path.realpath(os.path.expanduser(data_dir))
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return path
    if not os.path.isdir(path):
        raise DataError(
            f"config.data.dir={data_dir!r} does not exist or is not a directory (nor a CSV "
            f"file). Layouts read: {LAYOUT_HELP}"
        )
    if not [e for e in list_dir(path) if not e.startswith(".")]:
        raise DataError(f"config.data.dir={data_dir!r} is empty. Layouts read: {LAYOUT_HELP}")
    return path


def detect_layout(data_dir: str, layout: str = "auto", image_root: str = "") -> LayoutPlan:
    """Finds which layout ``data_dir`` holds (or checks the one requested).

    ``image_root`` (config.data.image_root) is where a manifest's relative image paths start
    (default: the CSV's directory); other layouts ignore it.
    """
    root = check_data_dir(data_dir)
    if layout != "auto" and layout not in _DETECTORS:
        raise DataError(f"config.data.layout={layout!r}; expected 'auto' or one of {LAYOUTS}")
    if layout != "auto":
        plan = _DETECTORS[layout](root)
        if plan is None:
            raise DataError(
                f"config.data.layout={layout!r} but {root} does not look like it. Expected "
                f"{_layout_help(layout)}; found: {summary(_listed(root))}."
            )
    else:
        plan = next(
            (p for p in (_DETECTORS[name](root) for name in LAYOUTS) if p is not None), None
        )
        if plan is None:
            raise DataError(
                f"no AffectNet layout (nor FER2013, FER+, RAF-DB, manifest or class folders) "
                f"found in {root}. Searched: {LAYOUT_HELP}. Found: {summary(_listed(root))}."
            )
        logging.info(
            "Data layout %r detected in %s (splits: %s)",
            plan.layout,
            root,
            ", ".join(f"{s.name} -> {s.pool}" for s in plan.splits),
        )
    if image_root and plan.layout == "manifest":
        plan = _with_image_root(plan, image_root)
    for note in plan.notes:
        logging.warning("%s layout at %s: %s", plan.layout, root, note)
    return plan


def _listed(root: str) -> str:
    return os.path.dirname(root) if os.path.isfile(root) else root


def _layout_help(layout: str) -> str:
    return next(part for part in LAYOUT_HELP.split("; ") if part.startswith(layout + ":"))
