"""The four layout readers: each turns one split's annotation files into a ``Candidate`` per
parsed example (its image not yet opened) or a ``Drop`` per example it rejects.

``read_split`` picks the reader of the plan's layout; label, valence/arousal and image checks
come after (``labels``, ``faces``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.labels import class_from_name
from affect_jax.data.affectnet.layouts import LayoutPlan, SplitSpec, list_dir, tree_listing
from affect_jax.data.images import is_image_name

NUM_LANDMARKS = 68
OFFICIAL_COLUMNS = (
    "subdirectory_filepath", "face_x", "face_y", "face_width", "face_height",
    "facial_landmarks", "expression", "valence", "arousal",
)
NPY_KINDS = ("exp", "val", "aro", "lnd")
_NPY_ANNOTATION = re.compile(r"^(.+)_(exp|val|aro|lnd)\.npy$")
_CSV_ERROR = "\0csv-error"  # First field of the row _csv_rows yields for a row csv cannot parse.


@dataclasses.dataclass
class Candidate:
    """An example a reader parsed; its labels, valence/arousal and image are checked next."""

    key: str
    name: str  # Shown in reports.
    image_path: str
    expression: int
    valence: float
    arousal: float
    landmarks: np.ndarray  # [68, 2] float32, NaN when absent.
    box: tuple[float, float, float, float] | None = None  # official: x, y, width, height.


@dataclasses.dataclass
class Drop:
    """An example a reader rejected: the drop reason, its name in reports and why."""

    reason: str
    name: str
    detail: str


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {text!r} is not a number") from None


def _int_code(text: str, what: str = "expression") -> int:
    value = _float(text, what)
    if not value.is_integer():
        raise ValueError(f"{what} {text!r} is not an integer")
    return int(value)


def _parse_landmarks(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, np.float32).reshape(-1)
    if array.size != 2 * NUM_LANDMARKS:
        raise ValueError(f"{what} has {array.size} numbers, expected {2 * NUM_LANDMARKS}")
    return array.reshape(NUM_LANDMARKS, 2)


def _no_landmarks() -> np.ndarray:
    return np.full((NUM_LANDMARKS, 2), np.nan, np.float32)


def _csv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row; a broken file raises DataError."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # E.g. a NUL byte: this row is lost, the rest is read.
                    yield reader.line_num, [_CSV_ERROR, str(e)]
                    continue
                if any(c.strip() for c in row):
                    yield reader.line_num, row
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _checked_rows(
    split_name: str, rows: Iterable[tuple[int, list[str]]], num_columns: int, path_index: int
) -> Iterator[Drop | tuple[int, str, str, list[str]]]:
    """(line number, name in reports, image path as written, fields) of every row that has
    ``num_columns`` fields; a Drop for any other row (one csv could not parse, or another field
    count)."""
    for line, row in rows:
        if row and row[0] == _CSV_ERROR:
            problem = f"unreadable CSV row ({row[1]})"
        elif len(row) != num_columns:
            problem = f"{len(row)} fields, expected {num_columns}"
        else:
            rel = row[path_index].strip()
            yield line, f"{split_name}:{line} ({rel})", rel, row
            continue
        yield Drop("dropped_malformed_row", f"{split_name}:{line}", problem)


def _read_official(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    rows = _csv_rows(spec.path)
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
    for item in _checked_rows(spec.name, pending, len(columns), index["subdirectory_filepath"]):
        if isinstance(item, Drop):
            yield item
            continue
        line, name, rel, row = item
        try:
            if not rel:
                raise ValueError("empty subDirectory_filePath")
            box = tuple(
                _float(row[index[c]], c) for c in ("face_x", "face_y", "face_width", "face_height")
            )
            if box[2] <= 0 or box[3] <= 0 or not all(math.isfinite(v) for v in box):
                raise ValueError(f"face box {box} has no area")
            text = row[index["facial_landmarks"]].strip()
            landmarks = (
                _parse_landmarks([_float(v, "landmark") for v in text.split(";")], "landmarks")
                if text else _no_landmarks()
            )
            expression = _int_code(row[index["expression"]])
            valence = _float(row[index["valence"]], "valence")
            arousal = _float(row[index["arousal"]], "arousal")
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
            continue
        yield Candidate(
            key=f"{spec.name}:{line}", name=name,
            image_path=os.path.join(plan.images_dir, rel), expression=expression,
            valence=valence, arousal=arousal, landmarks=landmarks, box=box,
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
    return _parse_landmarks(value.astype(np.float32), os.path.basename(path))


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
                "dropped_missing_image", f"{spec.name}/annotations/{shown}",
                f"no image {example_id}.* in {spec.name}/images",
            )
            continue
        name = f"{spec.name}/images/{images[example_id]}"
        lacking = [k for k in NPY_KINDS[:3] if k not in files]
        if lacking:
            yield Drop(
                "dropped_missing_annotation", name,
                "no " + ", ".join(f"{example_id}_{k}.npy" for k in lacking),
            )
            continue
        current = files["exp"]
        try:
            expression = _int_code(_npy_text(current))
            current = files["val"]
            valence = _float(_npy_text(current), "valence")
            current = files["aro"]
            arousal = _float(_npy_text(current), "arousal")
            current = files.get("lnd", "")
            landmarks = _npy_landmarks(current) if current else _no_landmarks()
        except (ValueError, OSError, EOFError) as e:
            yield Drop(
                "dropped_malformed_row", f"{spec.name}/annotations/{os.path.basename(current)}",
                f"unparseable: {e}",
            )
            continue
        yield Candidate(
            key=f"{spec.name}/{example_id}", name=name,
            image_path=os.path.join(images_dir, images[example_id]), expression=expression,
            valence=valence, arousal=arousal, landmarks=landmarks,
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
            key=name, name=name, image_path=os.path.join(spec.path, rel), expression=code,
            valence=math.nan, arousal=math.nan, landmarks=_no_landmarks(),
        )


def _read_manifest(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    rows = _csv_rows(spec.path)
    first = next(rows, None)
    if first is None:
        return
    header = [c.strip().lower() for c in first[1]]
    index = {c: i for i, c in enumerate(header)}
    base = os.path.dirname(spec.path)
    for item in _checked_rows(spec.name, rows, len(header), index["path"]):
        if isinstance(item, Drop):
            yield item
            continue
        _, name, rel, row = item
        if not rel:
            yield Drop("dropped_malformed_row", name, "empty path")
            continue
        text = row[index["expression"]]
        code = class_from_name(text)
        if code is None:
            try:  # A number outside 0-10 is an unknown label; other text is unknown too.
                code = _int_code(text)
            except ValueError:
                yield Drop("dropped_unknown_label", name, f"expression {text.strip()!r}")
                continue
        try:
            if plan.has_valence_arousal:
                valence = _float(row[index["valence"]].strip(), "valence")
                arousal = _float(row[index["arousal"]].strip(), "arousal")
            else:
                valence = arousal = math.nan
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
            continue
        yield Candidate(
            key=name, name=name, image_path=os.path.join(base, rel), expression=code,
            valence=valence, arousal=arousal, landmarks=_no_landmarks(),
        )


_READERS = {
    "official": _read_official,
    "npy": _read_npy,
    "folders": _read_folders,
    "manifest": _read_manifest,
}


def read_split(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    """The candidates and drops of one split, read by the reader of ``plan.layout``."""
    return _READERS[plan.layout](spec, plan)


def official_unreferenced(plan: LayoutPlan) -> list[str]:
    """Images under Manually_Annotated_Images that no list names (images without annotations)."""
    referenced = set()
    for spec in plan.splits:
        for _, row in _csv_rows(spec.path):
            if row:
                referenced.add(os.path.normpath(row[0].strip()))
    return [
        rel for rel in tree_listing(plan.images_dir)
        if is_image_name(os.path.basename(rel)) and os.path.normpath(rel) not in referenced
    ]
