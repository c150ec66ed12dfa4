"""Which of the four layouts a directory holds: ``detect_layout`` and the ``LayoutPlan`` it
returns (the splits, which pool each feeds, a fingerprint of the annotation files).

* ``official``: ``training.csv``/``validation.csv`` + ``Manually_Annotated_Images/<sub>/<f>.jpg``.
* ``npy``: ``<split>/images/<id>.jpg`` + ``<split>/annotations/<id>_{exp,val,aro,lnd}.npy``.
* ``manifest``: a CSV ``path, expression[, valence, arousal]``.
* ``folders``: ``<root>/<class name or index>/*.jpg``, expression only.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from absl import logging

from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.labels import class_from_name

LAYOUTS = ("official", "npy", "manifest", "folders")  # Auto-detection tries them in this order.

OFFICIAL_CSVS = {"training.csv": "train", "validation.csv": "test"}
OFFICIAL_IMAGES_DIR = "Manually_Annotated_Images"

LAYOUT_HELP = (
    "official: training.csv and/or validation.csv plus a Manually_Annotated_Images/ directory "
    "(at the root or one level down); "
    "npy: <split>/images/*.jpg plus <split>/annotations/<id>_exp.npy (the root itself or its "
    "sub-directories as splits); "
    "manifest: a *.csv at the root whose header has 'path' and 'expression' columns "
    "(optionally 'valence' and 'arousal'); "
    "folders: <root>/<class name or index 0-7>/*.jpg"
)


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


# --------------------------------------------------------------------------------------------
# Listings and fingerprints of the user's files.


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


def _subdirs(path: str) -> list[str]:
    return [
        d for d in list_dir(path)
        if not d.startswith(".") and os.path.isdir(os.path.join(path, d))
    ]


def _summary(root: str, limit: int = 15) -> str:
    """A short listing of ``root`` for error messages."""
    entries = [e for e in list_dir(root) if not e.startswith(".")]
    shown = [e + ("/" if os.path.isdir(os.path.join(root, e)) else "") for e in entries[:limit]]
    more = f" ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(shown) + more if shown else "nothing"


def _hash_lines(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "backslashreplace") + b"\n")
    return digest.hexdigest()


def _stamp_fingerprint(splits: Sequence[SplitSpec]) -> str:
    """Fingerprint of split files (CSV lists): their paths, sizes and modification times."""
    stamps = []
    for s in splits:
        stat = os.stat(s.path)
        stamps.append(f"{s.path}|{stat.st_size}|{stat.st_mtime_ns}")
    return _hash_lines(stamps)


def _listing_fingerprint(splits: Sequence[SplitSpec]) -> str:
    """Fingerprint of split directories: the names of every file in them."""
    return _hash_lines(f"{s.name}/{line}" for s in splits for line in tree_listing(s.path))


# --------------------------------------------------------------------------------------------
# Detection.


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
            f"{_summary(root)}). Extract the images next to the CSV files."
        )
    if len(csvs) == 1:  # A single list is the pool the pipeline splits.
        ((name, path),) = csvs.items()
        splits = (SplitSpec("train", name, path),)
    else:
        splits = tuple(
            SplitSpec(OFFICIAL_CSVS[name], name, path) for name, path in sorted(csvs.items())
        )
    return LayoutPlan("official", root, splits, True, images_dir, _stamp_fingerprint(splits))


def _detect_split_dirs(
    root: str, layout: str, is_split: Callable[[str], bool], what: str, has_va: bool
) -> LayoutPlan | None:
    """A plan whose splits are directories: ``root`` itself if ``is_split`` holds for it, else
    its sub-directories for which it holds; None if there is none."""
    if is_split(root):
        found = {os.path.basename(os.path.normpath(root)): root}
    else:
        found = {
            d: os.path.join(root, d) for d in _subdirs(root) if is_split(os.path.join(root, d))
        }
    if not found:
        return None
    pools = assign_pools(sorted(found), what, root)
    splits = tuple(SplitSpec(pool, name, found[name]) for pool, name in sorted(pools.items()))
    return LayoutPlan(layout, root, splits, has_va, "", _listing_fingerprint(splits))


def _is_npy_split(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "images")) and os.path.isdir(
        os.path.join(path, "annotations")
    )


def _is_class_root(path: str) -> bool:
    return any(class_from_name(d) is not None for d in _subdirs(path))


def _detect_npy(root: str) -> LayoutPlan | None:
    return _detect_split_dirs(root, "npy", _is_npy_split, "npy split directories", True)


def _detect_folders(root: str) -> LayoutPlan | None:
    return _detect_split_dirs(root, "folders", _is_class_root, "class-folder trees", False)


def _read_header(path: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            row = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [c.strip().lower() for c in row]


def _detect_manifest(root: str) -> LayoutPlan | None:
    found = {}
    for entry in list_dir(root):
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
    return LayoutPlan("manifest", root, splits, has_va[0], "", _stamp_fingerprint(splits))


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
    if not [e for e in list_dir(path) if not e.startswith(".")]:
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
