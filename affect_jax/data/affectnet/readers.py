"""The readers of AffectNet's four layouts, and ``read_split``, which picks the reader of any
layout (FER2013, FER+ and RAF-DB read in their own modules). Each reader turns one split's
annotation files into a ``Candidate`` per parsed example (its image not yet opened) or a
``Drop`` per example it rejects.

Label, valence/arousal and image checks come after (``labels``, ``faces``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator

import numpy as np

from affect_jax.data.affectnet import fer2013, ferplus, rafdb
from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.labels import class_from_name
from affect_jax.data.affectnet.layouts import column_key, manifest_columns
from affect_jax.data.affectnet.plans import LayoutPlan, SplitSpec, list_dir, tree_listing
from affect_jax.data.affectnet.rows import (
    Candidate,
    Drop,
    checked_rows,
    csv_rows,
    no_landmarks,
    parse_float,
    parse_int,
    parse_landmarks,
)
from affect_jax.data.images import is_image_name

OFFICIAL_COLUMNS = (
    "subdirectory_filepath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
NPY_KINDS = ("exp", "val", "aro", "lnd")
_NPY_ANNOTATION = re.compile(r"^(.+)_(exp|val|aro|lnd)\.npy$")


def _read_official(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    rows = csv_rows(spec.path)
    columns = list(OFFICIAL_COLUMNS)
    first = next(rows, None)
    if first is None:
        return
    header = [c.strip().lower() for c in first[1]]
    if header and header[0] == OFFICIAL_COLUMNS[0]:
        missing = [c for c in OFFICIAL_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{spec.path}: header lacks columns {missing} (has {header})")
        columns = header
        pending: Iterable[tuple[int, list[str]]] = rows
    else:  # No header (some copies of validation.csv): the release's column order.
        pending = [first, *rows]
    index = {c: i for i, c in enumerate(columns)}
    for item in checked_rows(spec.name, pending, len(columns), index["subdirectory_filepath"]):
        if isinstance(item, Drop):
            yield item
            continue
        line, name, rel, row = item
        try:
            if not rel:
                raise ValueError("empty subDirectory_filePath")
            box = tuple(
                parse_float(row[index[c]], c)
                for c in ("face_x", "face_y", "face_width", "face_height")
            )
            if box[2] <= 0 or box[3] <= 0 or not all(math.isfinite(v) for v in box):
                raise ValueError(f"face box {box} has no area")
            text = row[index["facial_landmarks"]].strip()
            landmarks = (
                parse_landmarks([parse_float(v, "landmark") for v in text.split(";")], "landmarks")
                if text
                else no_landmarks()
            )
            expression = parse_int(row[index["expression"]])
            valence = parse_float(row[index["valence"]], "valence")
            arousal = parse_float(row[index["arousal"]], "arousal")
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
            continue
        yield Candidate(
            key=f"{spec.name}:{line}",
            name=name,
            image_path=os.path.join(plan.images_dir, rel),
            expression=expression,
            valence=valence,
            arousal=arousal,
            landmarks=landmarks,
            box=box,
        )


def _npy_text(path: str) -> str:
    """The content of a 0-d (or 1-element) npy file as text: np.array('3') -> '3'."""
    value = np.load(path, allow_pickle=False)
    if value.size != 1:
        raise ValueError(f"holds {value.size} values, expected 1")
    item = value.reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else str(item)


def _npy_landmarks(path: str) -> np.ndarray:
    value = np.load(path, allow_pickle=False)
    if value.dtype.kind in "US":  # Strings of numbers: parse them.
        value = np.array([float(v) for v in value.reshape(-1)], np.float32)
    return parse_landmarks(value.astype(np.float32), os.path.basename(path))


def _read_npy(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    images_dir = os.path.join(spec.path, "images")
    ann_dir = os.path.join(spec.path, "annotations")
    images = {}
    for f in list_dir(images_dir):
        if is_image_name(f):
            images.setdefault(os.path.splitext(f)[0], f)
    annotations: dict[str, dict[str, str]] = {}
    for f in list_dir(ann_dir):
        match = _NPY_ANNOTATION.match(f)
        if match:
            annotations.setdefault(match.group(1), {})[match.group(2)] = os.path.join(ann_dir, f)
    for example_id in sorted(set(images) | set(annotations)):
        files = annotations.get(example_id, {})
        if example_id not in images:
            shown = os.path.basename(files.get("exp") or next(iter(files.values())))
            yield Drop(
                "dropped_missing_image",
                f"{spec.name}/annotations/{shown}",
                f"no image {example_id}.* in {spec.name}/images",
            )
            continue
        name = f"{spec.name}/images/{images[example_id]}"
        lacking = [k for k in NPY_KINDS[:3] if k not in files]
        if lacking:
            yield Drop(
                "dropped_missing_annotation",
                name,
                "no " + ", ".join(f"{example_id}_{k}.npy" for k in lacking),
            )
            continue
        current = files["exp"]
        try:
            expression = parse_int(_npy_text(current))
            current = files["val"]
            valence = parse_float(_npy_text(current), "valence")
            current = files["aro"]
            arousal = parse_float(_npy_text(current), "arousal")
            current = files.get("lnd", "")
            landmarks = _npy_landmarks(current) if current else no_landmarks()
        except (ValueError, OSError, EOFError) as e:
            yield Drop(
                "dropped_malformed_row",
                f"{spec.name}/annotations/{os.path.basename(current)}",
                f"unparseable: {e}",
            )
            continue
        yield Candidate(
            key=f"{spec.name}/{example_id}",
            name=name,
            image_path=os.path.join(images_dir, images[example_id]),
            expression=expression,
            valence=valence,
            arousal=arousal,
            landmarks=landmarks,
        )


def _read_folders(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    for rel in tree_listing(spec.path):
        if not is_image_name(os.path.basename(rel)):
            continue
        parts = rel.split(os.sep)
        name = f"{spec.name}/{rel}"
        if len(parts) < 2:
            yield Drop("dropped_missing_annotation", name, "image outside any class folder")
            continue
        code = class_from_name(parts[0])
        if code is None:
            yield Drop("dropped_unknown_label", name, f"folder {parts[0]!r} is not a class")
            continue
        yield Candidate(
            key=name,
            name=name,
            image_path=os.path.join(spec.path, rel),
            expression=code,
            valence=math.nan,
            arousal=math.nan,
            landmarks=no_landmarks(),
        )


def _read_manifest(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    rows = csv_rows(spec.path)
    first = next(rows, None)
    if first is None:
        return
    header = [column_key(c) for c in first[1]]
    image_column, label_column = manifest_columns(header)
    va_columns = (
        (header.index("valence"), header.index("arousal")) if (plan.has_valence_arousal) else None
    )
    # Relative image paths start at data.image_root when given, else at the CSV's directory.
    base = plan.images_dir or os.path.dirname(spec.path)
    for item in checked_rows(spec.name, rows, len(header), image_column):
        if isinstance(item, Drop):
            yield item
            continue
        _, name, rel, row = item
        if not rel:
            yield Drop("dropped_malformed_row", name, "empty path")
            continue
        text = row[label_column]
        code = class_from_name(text)
        if code is None:
            try:  # A number outside 0-10 is an unknown label; other text is unknown too.
                code = parse_int(text)
            except ValueError:
                yield Drop("dropped_unknown_label", name, f"expression {text.strip()!r}")
                continue
        try:
            if va_columns:
                valence = parse_float(row[va_columns[0]].strip(), "valence")
                arousal = parse_float(row[va_columns[1]].strip(), "arousal")
            else:
                valence = arousal = math.nan
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
            continue
        yield Candidate(
            key=name,
            name=name,
            image_path=os.path.join(base, rel),
            expression=code,
            valence=valence,
            arousal=arousal,
            landmarks=no_landmarks(),
        )


_READERS = {
    "official": _read_official,
    "npy": _read_npy,
    "folders": _read_folders,
    "manifest": _read_manifest,
    "fer2013": fer2013.read,
    "ferplus": ferplus.read,
    "rafdb": rafdb.read,
}


def read_split(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    """The candidates and drops of one split, read by the reader of ``plan.layout``."""
    return _READERS[plan.layout](spec, plan)


def official_unreferenced(plan: LayoutPlan) -> list[str]:
    """Images under Manually_Annotated_Images that no list names (images without annotations)."""
    referenced = set()
    for spec in plan.splits:
        for _, row in csv_rows(spec.path):
            if row:
                referenced.add(os.path.normpath(row[0].strip()))
    return [
        rel
        for rel in tree_listing(plan.images_dir)
        if is_image_name(os.path.basename(rel)) and os.path.normpath(rel) not in referenced
    ]
