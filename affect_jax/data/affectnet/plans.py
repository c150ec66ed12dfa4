"""What a layout detector returns (``LayoutPlan`` of ``SplitSpec``s) and the listings of the
user's files it is built from: directory listings, fingerprints, CSV headers, pool assignment."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence

from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.rows import csv_delimiter

# The pipeline's pools: 'train' (split into train/validation unless a 'validation' pool is
# given), 'validation' (a dataset's own validation split) and 'test' (held out).
POOLS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """One split of a layout: which files feed which pool."""

    pool: str  # One of POOLS.
    name: str  # What the user calls it: 'val_set', 'training.csv', 'PublicTest', ...
    path: str  # Split directory (npy, folders) or annotation file (the other layouts).


@dataclasses.dataclass(frozen=True)
class LayoutPlan:
    """What ``detect_layout`` found."""

    layout: str
    root: str
    splits: tuple[SplitSpec, ...]
    has_valence_arousal: bool
    # official: Manually_Annotated_Images; rafdb: Image/aligned or Image/original; manifest:
    # data.image_root (relative image paths resolve against it instead of the CSV's directory).
    images_dir: str = ""
    fingerprint: str = ""  # Changes when the annotation files change (part of the cache key).
    num_classes: int = 8  # Classes the dataset carries: 7 for FER2013 and RAF-DB (no Contempt).
    # Pixel layouts: the file that holds the images (FER+: fer2013.csv beside fer2013new.csv).
    pixels_path: str = ""
    # What was found but not read, and why (logged, and kept in the data report).
    notes: tuple[str, ...] = ()


def list_dir(path: str) -> list[str]:
    """The sorted entries of ``path``; [] if it cannot be listed."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def tree_listing(path: str) -> Iterator[str]:
    """Every file under ``path``, relative to it, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.relpath(os.path.join(dirpath, name), path)


def subdirs(path: str) -> list[str]:
    """The sorted non-hidden sub-directories of ``path``."""
    return [
        d for d in list_dir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d))
    ]


def root_and_children(root: str) -> list[str]:
    """``root`` and its sub-directories (datasets are often extracted one level down)."""
    return [root] + [os.path.join(root, d) for d in subdirs(root)]


def summary(root: str, limit: int = 15) -> str:
    """A short listing of ``root`` for error messages."""
    entries = [e for e in list_dir(root) if not e.startswith(".")]
    shown = [e + ("/" if os.path.isdir(os.path.join(root, e)) else "") for e in entries[:limit]]
    more = f" ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(shown) + more if shown else "nothing"


def hash_lines(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "backslashreplace") + b"\n")
    return digest.hexdigest()


def stamp_fingerprint(paths: Iterable[str], *extra: str) -> str:
    """Fingerprint of annotation files (and ``extra`` settings): their paths, sizes and
    modification times."""
    stamps = []
    for path in paths:
        stat = os.stat(path)
        stamps.append(f"{path}|{stat.st_size}|{stat.st_mtime_ns}")
    return hash_lines([*stamps, *extra])


def listing_fingerprint(splits: Sequence[SplitSpec]) -> str:
    """Fingerprint of split directories: the names of every file in them."""
    return hash_lines(f"{s.name}/{line}" for s in splits for line in tree_listing(s.path))


def read_header(path: str) -> list[str]:
    """The first row of a CSV file, each field stripped and lowercased; [] if unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
        row = next(csv.reader([first], delimiter=csv_delimiter(first)), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [c.strip().lower() for c in row]


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
