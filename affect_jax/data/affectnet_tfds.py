"""TFDS builder ``affectnet``: AffectNet read from the layout the user already holds.

AffectNet cannot be downloaded automatically; the user points TFDS's manual dir (affect-jax's
``config.data.dir``) at their copy, in one of four layouts (see ``detect_layout``):

* ``official``: ``training.csv``/``validation.csv`` + ``Manually_Annotated_Images/<sub>/<f>.jpg``;
  faces are cropped by the CSV's box (plus ``face_margin``) and re-encoded as JPEG (quality 95).
* ``npy``: the redistributed release, ``<split>/images/<id>.jpg`` +
  ``<split>/annotations/<id>_{exp,val,aro,lnd}.npy``; images are stored as they are.
* ``folders``: ``<root>/<class name or index>/*.jpg``, expression only (valence/arousal NaN).
* ``manifest``: a CSV ``path, expression[, valence, arousal]``.

Every example is checked before it is stored: labels (non-emotion codes, Contempt under the
7-class protocol, unknown codes), valence/arousal (-2 = missing, outside [-1, 1]), the image
(present, decodable by ``tf.io.decode_image`` exactly as the input pipeline decodes it) and the
annotation itself (parseable). Each dropped example is counted once, under the first check it
fails: the annotation (malformed row; an image without annotation or an annotation without
image), the label (unknown label, non-emotion, Contempt), valence/arousal, then the image
(missing, undecodable; a face box outside the image counts as a malformed row). The counts
and the first offending files per reason are stored in the prepared dataset's
``metadata.json`` (``info.metadata['report']``).

affect-jax prepares through ``affect_jax.data.affectnet.prepare``/``load_source``. The builder's
default config 'auto' (layout detected, 8 classes, no margin; unlike the configs ``load_source``
makes, it is not keyed by the manual dir) also serves TFDS's own tools, e.g.
``Affectnet(data_dir=...).download_and_prepare(download_config=tfds.download.DownloadConfig(
manual_dir=...))`` or ``tfds build affect_jax/data/affectnet_tfds.py --manual_dir=...`` (the
``tfds`` command of TFDS 4.9.10 also needs apache-beam installed).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from affect_jax.data.source import AFFECTNET_CLASS_NAMES

LAYOUTS = ("official", "npy", "manifest", "folders")  # Auto-detection tries them in this order.

# Bump when what preparation stores changes: it is part of every cache key.
PREPARE_FORMAT = 1

NUM_LANDMARKS = 68
JPEG_QUALITY = 95
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
OFFICIAL_CSVS = {"training.csv": "train", "validation.csv": "test"}
OFFICIAL_IMAGES_DIR = "Manually_Annotated_Images"
OFFICIAL_COLUMNS = (
    "subdirectory_filepath", "face_x", "face_y", "face_width", "face_height",
    "facial_landmarks", "expression", "valence", "arousal",
)
NPY_KINDS = ("exp", "val", "aro", "lnd")
_NPY_ANNOTATION = re.compile(r"^(.+)_(exp|val|aro|lnd)\.npy$")

# Expression codes of the official release: 0-7 emotions, then three non-emotion codes.
CONTEMPT = 7
NON_EMOTION = (8, 9, 10)  # None, Uncertain, No-Face.
CLASS_ALIASES = {
    "neutral": 0, "happy": 1, "happiness": 1, "sad": 2, "sadness": 2, "surprise": 3,
    "surprised": 3, "fear": 4, "disgust": 5, "anger": 6, "angry": 6, "contempt": 7,
    "none": 8, "uncertain": 9, "no-face": 10, "no_face": 10, "noface": 10,
}

DROP_REASONS = (
    "dropped_malformed_row",
    "dropped_missing_annotation",
    "dropped_unknown_label",
    "dropped_non_emotion",
    "dropped_contempt",
    "dropped_bad_valence_arousal",
    "dropped_missing_image",
    "dropped_undecodable_image",
)
COUNT_KEYS = ("kept",) + DROP_REASONS
REPORT_EXAMPLES = 20  # Offending files kept per reason in the report.

_WORKERS = max(1, min(4, os.cpu_count() or 1))
_CHUNK = 64  # Images decoded per batch of worker tasks (bounds memory).

LAYOUT_HELP = (
    "official: training.csv and/or validation.csv plus a Manually_Annotated_Images/ directory "
    "(at the root or one level down); "
    "npy: <split>/images/*.jpg plus <split>/annotations/<id>_exp.npy (the root itself or its "
    "sub-directories as splits); "
    "manifest: a *.csv at the root whose header has 'path' and 'expression' columns "
    "(optionally 'valence' and 'arousal'); "
    "folders: <root>/<class name or index 0-7>/*.jpg"
)

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
AffectNet must be obtained from its authors (http://mohammadmahoor.com/affectnet/). Point the
manual dir (affect-jax: --config.data.dir) at your copy, in any of these layouts: {LAYOUT_HELP}.
"""


class DataError(ValueError):
    """The AffectNet files cannot be used as given; the message says what was searched and found."""


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """One split of a layout: which files feed which pool."""

    pool: str  # 'train' or 'test' (the pipeline's pool names).
    name: str  # What the user calls it: 'val_set', 'training.csv', ...
    path: str  # Split directory (npy, folders) or CSV file (official, manifest).


@dataclasses.dataclass(frozen=True)
class LayoutPlan:
    """What ``detect_layout`` found."""

    layout: str
    root: str
    splits: tuple[SplitSpec, ...]
    has_valence_arousal: bool
    images_dir: str = ""  # official: the Manually_Annotated_Images directory.
    fingerprint: str = ""  # Changes when the annotation files change (part of the cache key).


@dataclasses.dataclass
class _Candidate:
    """An annotated example whose labels passed; its image is checked next."""

    key: str
    name: str  # Shown in reports.
    image_path: str
    expression: int
    valence: float
    arousal: float
    landmarks: np.ndarray  # [68, 2] float32, NaN when absent.
    box: tuple[float, float, float, float] | None = None  # official: x, y, width, height.


@dataclasses.dataclass
class _Drop:
    reason: str
    name: str
    detail: str


class _DropError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Tally:
    """Kept/dropped counts of one split, with the first offending files per reason."""

    def __init__(self):
        self.counts = {k: 0 for k in COUNT_KEYS}
        self.examples: dict[str, list[str]] = {r: [] for r in DROP_REASONS}

    def drop(self, reason: str, name: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < REPORT_EXAMPLES:
            self.examples[reason].append(f"{name}: {detail}")


# --------------------------------------------------------------------------------------------
# Layout detection.


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _subdirs(path: str) -> list[str]:
    return [
        d for d in _listdir(path)
        if not d.startswith(".") and os.path.isdir(os.path.join(path, d))
    ]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _summary(root: str, limit: int = 15) -> str:
    """A short listing of ``root`` for error messages."""
    entries = [e for e in _listdir(root) if not e.startswith(".")]
    shown = [e + ("/" if os.path.isdir(os.path.join(root, e)) else "") for e in entries[:limit]]
    more = f" ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(shown) + more if shown else "nothing"


def _hash_lines(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "backslashreplace") + b"\n")
    return digest.hexdigest()


def _file_stamp(path: str) -> str:
    stat = os.stat(path)
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _tree_listing(path: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.relpath(os.path.join(dirpath, name), path)


def assign_pools(names: Sequence[str], what: str, root: str) -> dict[str, str]:
    """Maps split names found on disk to the pipeline's pools.

    One split is the 'train' pool (the pipeline splits it 80/20). Two splits: the one whose name
    contains 'train' is 'train', the other (its name must contain 'val' or 'test') is 'test'.
    Anything else is ambiguous and raises ``DataError``.
    """
    if len(names) == 1:
        return {"train": names[0]}
    if len(names) == 2:
        train = [n for n in names if "train" in n.lower()]
        if len(train) == 1:
            other = next(n for n in names if n != train[0])
            if "val" in other.lower() or "test" in other.lower():
                return {"train": train[0], "test": other}
    raise DataError(
        f"{root} holds {len(names)} {what} ({', '.join(names)}); affect-jax reads one (the "
        "'train' pool, split 80/20 into train/validation) or two (a '*train*' one and a "
        "'*val*'/'*test*' one, read as a held-out test pool). Point config.data.dir at a "
        "directory with one or two of them."
    )


def _detect_official(root: str) -> LayoutPlan | None:
    dirs = [root] + [os.path.join(root, d) for d in _subdirs(root)]
    csvs: dict[str, str] = {}
    images_dir = ""
    for d in dirs:
        for entry in _listdir(d):
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
            f"{_summary(root)}). Extract the images next to the CSV files."
        )
    if len(csvs) == 1:  # A single list is the pool the pipeline splits.
        ((name, path),) = csvs.items()
        splits = (SplitSpec("train", name, path),)
    else:
        splits = tuple(
            SplitSpec(OFFICIAL_CSVS[name], name, path) for name, path in sorted(csvs.items())
        )
    fingerprint = _hash_lines(_file_stamp(s.path) for s in splits)
    return LayoutPlan("official", root, splits, True, images_dir, fingerprint)


def _is_npy_split(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "images")) and os.path.isdir(
        os.path.join(path, "annotations")
    )


def _detect_npy(root: str) -> LayoutPlan | None:
    if _is_npy_split(root):
        found = {os.path.basename(os.path.normpath(root)): root}
    else:
        found = {
            d: os.path.join(root, d) for d in _subdirs(root)
            if _is_npy_split(os.path.join(root, d))
        }
    if not found:
        return None
    pools = assign_pools(sorted(found), "npy split directories", root)
    splits = tuple(SplitSpec(pool, name, found[name]) for pool, name in sorted(pools.items()))
    fingerprint = _hash_lines(
        f"{s.name}/{line}" for s in splits for line in _tree_listing(s.path)
    )
    return LayoutPlan("npy", root, splits, True, "", fingerprint)


def _read_header(path: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            row = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [c.strip().lower() for c in row]


def _detect_manifest(root: str) -> LayoutPlan | None:
    found = {}
    for entry in _listdir(root):
        full = os.path.join(root, entry)
        if entry.lower().endswith(".csv") and os.path.isfile(full):
            header = _read_header(full)
            if "path" in header and "expression" in header:
                found[entry] = (full, header)
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
    splits = tuple(
        SplitSpec(pool, name, found[name][0]) for pool, name in sorted(pools.items())
    )
    fingerprint = _hash_lines(_file_stamp(s.path) for s in splits)
    return LayoutPlan("manifest", root, splits, has_va[0], "", fingerprint)


def class_from_name(name: str) -> int | None:
    """The expression code (0-10) of a class name or index, or None if unknown."""
    text = name.strip().lower()
    if text in CLASS_ALIASES:
        return CLASS_ALIASES[text]
    try:
        value = float(text)
    except ValueError:
        return None
    if value.is_integer() and 0 <= value <= max(NON_EMOTION):
        return int(value)
    return None


def _is_class_root(path: str) -> bool:
    return any(class_from_name(d) is not None for d in _subdirs(path))


def _detect_folders(root: str) -> LayoutPlan | None:
    if _is_class_root(root):
        found = {os.path.basename(os.path.normpath(root)): root}
    else:
        found = {
            d: os.path.join(root, d) for d in _subdirs(root)
            if _is_class_root(os.path.join(root, d))
        }
    if not found:
        return None
    pools = assign_pools(sorted(found), "class-folder trees", root)
    splits = tuple(SplitSpec(pool, name, found[name]) for pool, name in sorted(pools.items()))
    fingerprint = _hash_lines(
        f"{s.name}/{line}" for s in splits for line in _tree_listing(s.path)
    )
    return LayoutPlan("folders", root, splits, False, "", fingerprint)


_DETECTORS = {
    "official": _detect_official,
    "npy": _detect_npy,
    "manifest": _detect_manifest,
    "folders": _detect_folders,
}


def check_data_dir(data_dir: str) -> str:
    """The absolute path of ``data_dir``, or ``DataError`` if it is missing or empty."""
    if not data_dir:
        raise DataError(
            "config.data.dir is empty: set it to the root of your AffectNet files. Layouts read: "
            + LAYOUT_HELP
        )
    path = os.path.realpath(os.path.expanduser(data_dir))
    if not os.path.isdir(path):
        raise DataError(
            f"config.data.dir={data_dir!r} does not exist or is not a directory. Layouts read: "
            + LAYOUT_HELP
        )
    if not [e for e in _listdir(path) if not e.startswith(".")]:
        raise DataError(f"config.data.dir={data_dir!r} is empty. Layouts read: {LAYOUT_HELP}")
    return path


def detect_layout(data_dir: str, layout: str = "auto") -> LayoutPlan:
    """Finds which layout ``data_dir`` holds (or checks the one requested)."""
    root = check_data_dir(data_dir)
    if layout != "auto" and layout not in _DETECTORS:
        raise DataError(f"config.data.layout={layout!r}; expected 'auto' or one of {LAYOUTS}")
    if layout != "auto":
        plan = _DETECTORS[layout](root)
        if plan is None:
            raise DataError(
                f"config.data.layout={layout!r} but {root} does not look like it. Expected "
                f"{_layout_help(layout)}; found: {_summary(root)}."
            )
        return plan
    for name in LAYOUTS:
        plan = _DETECTORS[name](root)
        if plan is not None:
            logging.info(
                "AffectNet layout %r detected in %s (splits: %s)", name, root,
                ", ".join(f"{s.name} -> {s.pool}" for s in plan.splits),
            )
            return plan
    raise DataError(
        f"no AffectNet layout found in {root}. Searched: {LAYOUT_HELP}. Found: {_summary(root)}."
    )


def _layout_help(layout: str) -> str:
    return next(part for part in LAYOUT_HELP.split("; ") if part.startswith(layout + ":"))


# --------------------------------------------------------------------------------------------
# Annotation readers: yield a _Candidate per parsed example or a _Drop per rejected one.


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
                    yield reader.line_num, ["\0csv-error", str(e)]
                    continue
                if any(c.strip() for c in row):
                    yield reader.line_num, row
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _read_official(spec: SplitSpec, plan: LayoutPlan) -> Iterator[_Candidate | _Drop]:
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
    for line, row in pending:
        name = f"{spec.name}:{line}"
        if row and row[0] == "\0csv-error":
            yield _Drop("dropped_malformed_row", name, f"unreadable CSV row ({row[1]})")
            continue
        if len(row) != len(columns):
            yield _Drop(
                "dropped_malformed_row", name, f"{len(row)} fields, expected {len(columns)}"
            )
            continue
        rel = row[index["subdirectory_filepath"]].strip()
        name = f"{spec.name}:{line} ({rel})"
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
            yield _Drop("dropped_malformed_row", name, str(e))
            continue
        yield _Candidate(
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


def _read_npy(spec: SplitSpec, plan: LayoutPlan) -> Iterator[_Candidate | _Drop]:
    images_dir = os.path.join(spec.path, "images")
    ann_dir = os.path.join(spec.path, "annotations")
    images = {}
    for f in _listdir(images_dir):
        if _is_image(f):
            images.setdefault(os.path.splitext(f)[0], f)
    annotations: dict[str, dict[str, str]] = {}
    for f in _listdir(ann_dir):
        match = _NPY_ANNOTATION.match(f)
        if match:
            annotations.setdefault(match.group(1), {})[match.group(2)] = os.path.join(ann_dir, f)
    for example_id in sorted(set(images) | set(annotations)):
        files = annotations.get(example_id, {})
        if example_id not in images:
            shown = os.path.basename(files.get("exp") or next(iter(files.values())))
            yield _Drop(
                "dropped_missing_image", f"{spec.name}/annotations/{shown}",
                f"no image {example_id}.* in {spec.name}/images",
            )
            continue
        name = f"{spec.name}/images/{images[example_id]}"
        lacking = [k for k in NPY_KINDS[:3] if k not in files]
        if lacking:
            yield _Drop(
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
            yield _Drop(
                "dropped_malformed_row", f"{spec.name}/annotations/{os.path.basename(current)}",
                f"unparseable: {e}",
            )
            continue
        yield _Candidate(
            key=f"{spec.name}/{example_id}", name=name,
            image_path=os.path.join(images_dir, images[example_id]), expression=expression,
            valence=valence, arousal=arousal, landmarks=landmarks,
        )


def _read_folders(spec: SplitSpec, plan: LayoutPlan) -> Iterator[_Candidate | _Drop]:
    for rel in _tree_listing(spec.path):
        if not _is_image(os.path.basename(rel)):
            continue
        parts = rel.split(os.sep)
        name = f"{spec.name}/{rel}"
        if len(parts) < 2:
            yield _Drop("dropped_missing_annotation", name, "image outside any class folder")
            continue
        code = class_from_name(parts[0])
        if code is None:
            yield _Drop("dropped_unknown_label", name, f"folder {parts[0]!r} is not a class")
            continue
        yield _Candidate(
            key=name, name=name, image_path=os.path.join(spec.path, rel), expression=code,
            valence=math.nan, arousal=math.nan, landmarks=_no_landmarks(),
        )


def _read_manifest(spec: SplitSpec, plan: LayoutPlan) -> Iterator[_Candidate | _Drop]:
    rows = _csv_rows(spec.path)
    first = next(rows, None)
    if first is None:
        return
    header = [c.strip().lower() for c in first[1]]
    index = {c: i for i, c in enumerate(header)}
    base = os.path.dirname(spec.path)
    for line, row in rows:
        name = f"{spec.name}:{line}"
        if row and row[0] == "\0csv-error":
            yield _Drop("dropped_malformed_row", name, f"unreadable CSV row ({row[1]})")
            continue
        if len(row) != len(header):
            yield _Drop("dropped_malformed_row", name, f"{len(row)} fields, expected {len(header)}")
            continue
        rel = row[index["path"]].strip()
        name = f"{spec.name}:{line} ({rel})"
        if not rel:
            yield _Drop("dropped_malformed_row", name, "empty path")
            continue
        text = row[index["expression"]]
        code = class_from_name(text)
        if code is None:
            try:  # A number outside 0-10 is an unknown label; other text is unknown too.
                code = _int_code(text)
            except ValueError:
                yield _Drop("dropped_unknown_label", name, f"expression {text.strip()!r}")
                continue
        try:
            if plan.has_valence_arousal:
                valence = _float(row[index["valence"]].strip(), "valence")
                arousal = _float(row[index["arousal"]].strip(), "arousal")
            else:
                valence = arousal = math.nan
        except ValueError as e:
            yield _Drop("dropped_malformed_row", name, str(e))
            continue
        yield _Candidate(
            key=name, name=name, image_path=os.path.join(base, rel), expression=code,
            valence=valence, arousal=arousal, landmarks=_no_landmarks(),
        )


_READERS = {
    "official": _read_official,
    "npy": _read_npy,
    "folders": _read_folders,
    "manifest": _read_manifest,
}


# --------------------------------------------------------------------------------------------
# Checks.


def label_drop_reason(code: int, num_classes: int) -> str | None:
    """Why an expression code is not kept under ``num_classes``, or None if it is."""
    if code in NON_EMOTION:
        return "dropped_non_emotion"
    if code == CONTEMPT and num_classes == 7:
        return "dropped_contempt"
    if not 0 <= code < num_classes:
        return "dropped_unknown_label"
    return None


def valence_arousal_ok(value: float) -> bool:
    """-2 (AffectNet's 'missing'), NaN and anything outside [-1, 1] are not usable."""
    return math.isfinite(value) and -1.0 <= value <= 1.0


def crop_box(
    box: tuple[float, float, float, float], margin: float, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Integer crop (x0, y0, x1, y1), end-exclusive, of a face box grown by ``margin`` of its size
    on each side and clipped to the image; None if nothing of it lies inside the image."""
    x, y, w, h = box
    x0 = max(0, math.floor(x - margin * w))
    y0 = max(0, math.floor(y - margin * h))
    x1 = min(width, math.ceil(x + w + margin * w))
    y1 = min(height, math.ceil(y + h + margin * h))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _decode(data: bytes) -> np.ndarray:
    """Decodes exactly as the input pipeline does (so what passes here decodes there)."""
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def _load_face(candidate: _Candidate, margin: float) -> dict:
    """The stored example of ``candidate`` or a _DropError."""
    try:
        with open(candidate.image_path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise _DropError("dropped_missing_image", "no such file") from None
    except OSError as e:
        raise _DropError("dropped_undecodable_image", f"unreadable ({e})") from None
    try:
        image = _decode(data)
    except (tf.errors.OpError, ValueError) as e:
        raise _DropError("dropped_undecodable_image", _op_message(e)) from None
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise _DropError("dropped_undecodable_image", f"empty image {image.shape}")
    landmarks = candidate.landmarks
    if candidate.box is None:
        box = (0, 0, width, height)
    else:
        box = crop_box(candidate.box, margin, width, height)
        if box is None:
            raise _DropError(
                "dropped_malformed_row",
                f"face box {candidate.box} lies outside the {width}x{height} image",
            )
        x0, y0, x1, y1 = box
        # Full-resolution chroma: faces are small and colour edges matter more than bytes.
        data = tf.io.encode_jpeg(
            image[y0:y1, x0:x1], quality=JPEG_QUALITY, chroma_downsampling=False
        ).numpy()
        landmarks = landmarks - np.array([x0, y0], np.float32)
    return {
        "image": data,
        "expression": candidate.expression,
        "valence": np.float32(candidate.valence),
        "arousal": np.float32(candidate.arousal),
        "landmarks": landmarks.astype(np.float32),
        "box": np.array(box, np.int32),
        "path": _display_path(candidate.image_path),
    }


def _op_message(error: Exception) -> str:
    """A TF error's first line without the function-node and op decorations."""
    text = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\]$", "", text)


def _display_path(path: str) -> str:
    # File names that are not UTF-8 must still fit a Text feature.
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _official_unreferenced(plan: LayoutPlan) -> list[str]:
    """Images under Manually_Annotated_Images that no list names (images without annotations)."""
    referenced = set()
    for spec in plan.splits:
        for _, row in _csv_rows(spec.path):
            if row:
                referenced.add(os.path.normpath(row[0].strip()))
    return [
        rel for rel in _tree_listing(plan.images_dir)
        if _is_image(os.path.basename(rel)) and os.path.normpath(rel) not in referenced
    ]


# --------------------------------------------------------------------------------------------
# The builder.


@dataclasses.dataclass
class AffectNetConfig(tfds.core.BuilderConfig):
    """What a prepared copy depends on; ``make_builder_config`` names it by their hash."""

    data_dir: str = ""  # '' = TFDS's manual dir.
    layout: str = "auto"
    num_classes: int = 8
    face_margin: float = 0.0


def make_builder_config(
    data_dir: str, layout: str = "auto", num_classes: int = 8, face_margin: float = 0.0
) -> tuple[AffectNetConfig, LayoutPlan]:
    """A config keyed by everything the prepared data depends on, and the detected layout.

    The name carries a hash of the resolved directory, layout, class count, margin, the
    annotation files' fingerprint (list stamps, or the file listing of npy/folder trees) and the
    preparation format, so a change of any of them prepares a new copy instead of reusing a
    wrong one.
    """
    if num_classes not in (7, 8):
        raise DataError(f"config.data.num_classes={num_classes}; AffectNet supports 7 or 8")
    if not (math.isfinite(face_margin) and face_margin >= 0):
        raise DataError(f"config.data.face_margin={face_margin}; expected a fraction >= 0")
    plan = detect_layout(data_dir, layout)
    key = json.dumps(
        {
            "format": PREPARE_FORMAT, "dir": plan.root, "layout": plan.layout,
            "num_classes": num_classes, "face_margin": repr(float(face_margin)),
            "fingerprint": plan.fingerprint,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    config = AffectNetConfig(
        name=f"{plan.layout}_{num_classes}cls_{digest}",
        description=(
            f"{plan.layout} layout at {plan.root}, {num_classes} classes, face margin "
            f"{face_margin}"
        ),
        data_dir=plan.root, layout=plan.layout, num_classes=num_classes,
        face_margin=float(face_margin),
    )
    return config, plan


class Affectnet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """AffectNet faces with expression, valence, arousal and landmarks, from a manual dir."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Four layouts; faces cropped; drops counted per reason."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        AffectNetConfig(
            name="auto", description="Layout detected in the manual dir; 8 classes; no margin."
        )
    ]

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own code_path needs `importlib_resources`, which it declares only for
        # Python < 3.9 (ModuleNotFoundError on 3.11); this file is the builder's code.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        num_classes = self.builder_config.num_classes
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "AffectNet face crops: expression (AffectNet codes 0-6, plus 7 Contempt in the "
                "8-class protocol), valence and arousal in [-1, 1] (NaN when the layout has "
                "none), 68 landmarks in crop pixels (NaN when absent), the crop box in the "
                "source image and the source path."
            ),
            features=tfds.features.FeaturesDict({
                # Official layout: the crop re-encoded as JPEG; other layouts: the file's bytes.
                "image": tfds.features.Image(shape=(None, None, 3)),
                "expression": tfds.features.ClassLabel(
                    names=list(AFFECTNET_CLASS_NAMES[:num_classes])
                ),
                "valence": tfds.features.Scalar(dtype=np.float32),
                "arousal": tfds.features.Scalar(dtype=np.float32),
                "landmarks": tfds.features.Tensor(shape=(NUM_LANDMARKS, 2), dtype=np.float32),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),  # x0, y0, x1, y1.
                "path": tfds.features.Text(),
            }),
            homepage="http://mohammadmahoor.com/affectnet/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        root = config.data_dir or os.fspath(dl_manager.manual_dir)
        plan = detect_layout(root, config.layout)
        report = {
            "layout": plan.layout, "data_dir": plan.root, "num_classes": config.num_classes,
            "face_margin": config.face_margin, "has_valence_arousal": plan.has_valence_arousal,
            "splits": {},
        }
        self.info.metadata["report"] = report
        unreferenced = _official_unreferenced(plan) if plan.layout == "official" else []
        return {
            spec.pool: self._generate_examples(
                spec, plan, unreferenced if spec.pool == "train" else [], report
            )
            for spec in plan.splits
        }

    def _generate_examples(
        self, spec: SplitSpec, plan: LayoutPlan, unreferenced: list[str], report: dict
    ):
        config = self.builder_config
        tally = _Tally()
        for rel in unreferenced:
            tally.drop(
                "dropped_missing_annotation", f"{OFFICIAL_IMAGES_DIR}/{rel}", "in no list"
            )
        candidates = []
        for item in _READERS[plan.layout](spec, plan):
            if isinstance(item, _Drop):
                tally.drop(item.reason, item.name, item.detail)
                continue
            reason = label_drop_reason(item.expression, config.num_classes)
            if reason:
                tally.drop(reason, item.name, f"expression {item.expression}")
                continue
            if plan.has_valence_arousal and not (
                valence_arousal_ok(item.valence) and valence_arousal_ok(item.arousal)
            ):
                tally.drop(
                    "dropped_bad_valence_arousal", item.name,
                    f"valence {item.valence}, arousal {item.arousal}",
                )
                continue
            candidates.append(item)

        def load(candidate: _Candidate):
            try:
                return _load_face(candidate, config.face_margin)
            except _DropError as e:
                return e

        with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
            for start in range(0, len(candidates), _CHUNK):
                chunk = candidates[start:start + _CHUNK]
                for candidate, result in zip(chunk, pool.map(load, chunk), strict=True):
                    if isinstance(result, _DropError):
                        tally.drop(result.reason, candidate.name, result.detail)
                        continue
                    tally.counts["kept"] += 1
                    yield candidate.key, result

        report["splits"][spec.pool] = {
            "source": spec.name, "counts": tally.counts, "examples": tally.examples,
        }
        if tally.counts["kept"] == 0:
            # Stops preparation: nothing is cached, and the user sees why everything went.
            raise DataError(
                f"no usable example in {spec.name} ({plan.layout} layout at {plan.root}): "
                f"{format_counts(tally.counts)}; first offenders: "
                f"{ {r: e[:3] for r, e in tally.examples.items() if e} }"
            )


def format_counts(counts: dict[str, int]) -> str:
    """'kept 3500, dropped_contempt 499' (zero drops left out)."""
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v or k == "kept")
