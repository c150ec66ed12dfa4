"""RAF-DB (basic) as users hold it: ``EmoLabel/list_patition_label.txt`` (lines such as
``train_00001.jpg 5``) and ``Image/aligned/train_00001_aligned.jpg`` or ``Image/original/``.

Classes 1-7 (Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral) are mapped by name onto
the project's class order; the file name prefix gives the pool (``train_`` -> 'train', split
80/20 into train/validation; ``test_`` -> 'test'). The aligned 100x100 faces are read when
``Image/aligned`` holds images, else the original photos (the run says so).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.labels import class_from_name
from affect_jax.data.affectnet.plans import (
    LayoutPlan,
    SplitSpec,
    list_dir,
    root_and_children,
    stamp_fingerprint,
)
from affect_jax.data.affectnet.rows import Candidate, Drop, no_landmarks, parse_int
from affect_jax.data.images import is_image_name

# The release's spelling first; some copies correct it.
LABEL_FILES = ("list_patition_label.txt", "list_partition_label.txt")
CLASS_NAMES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
CODES = {k + 1: class_from_name(name) for k, name in enumerate(CLASS_NAMES)}
POOLS = ("train", "test")  # File name prefix -> pool.
ALIGNED_SUFFIX = "_aligned"

HELP = (
    "EmoLabel/list_patition_label.txt plus Image/aligned/ or Image/original/ (at the root or one "
    "level down)"
)


def _label_file(base: str) -> str:
    names = {e.lower(): e for e in list_dir(os.path.join(base, "EmoLabel"))}
    found = next((names[n] for n in LABEL_FILES if n in names), "")
    return os.path.join(base, "EmoLabel", found) if found else ""


def detect(root: str) -> LayoutPlan | None:
    if os.path.isfile(root):
        return None
    found = [(base, path) for base in root_and_children(root) if (path := _label_file(base))]
    if not found:
        return None
    base, labels = found[0]
    aligned, original = (os.path.join(base, "Image", d) for d in ("aligned", "original"))
    notes: tuple[str, ...] = ()
    if any(is_image_name(f) for f in list_dir(aligned)):
        images = aligned
    elif any(is_image_name(f) for f in list_dir(original)):
        images = original
        notes = (
            "Image/aligned/ holds no image: reading the original photos of Image/original/ "
            "(whole photos, not aligned face crops)",
        )
    else:
        raise DataError(
            f"{base} has RAF-DB's {os.path.relpath(labels, base)} but no images in Image/aligned/ "
            "or Image/original/: extract the images next to EmoLabel/"
        )
    splits = tuple(SplitSpec(pool, pool, labels) for pool in POOLS)
    return LayoutPlan(
        "rafdb",
        root,
        splits,
        False,
        images,
        stamp_fingerprint([labels], f"images={images}"),
        num_classes=7,
        notes=notes,
    )


def image_name(listed: str, images_dir: str) -> str:
    """The file of a listed name: ``train_00001.jpg`` -> ``train_00001_aligned.jpg`` in the
    aligned directory (the listed name itself in the original one)."""
    if os.path.basename(images_dir) != "aligned":
        return listed
    stem, ext = os.path.splitext(listed)
    return f"{stem}{ALIGNED_SUFFIX}{ext}"


def _listed_name(file_name: str, images_dir: str) -> str:
    """The inverse of ``image_name``."""
    stem, ext = os.path.splitext(file_name)
    if os.path.basename(images_dir) == "aligned" and stem.endswith(ALIGNED_SUFFIX):
        stem = stem[: -len(ALIGNED_SUFFIX)]
    return stem + ext


def read(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    """The listed faces of ``spec``'s pool. Lines whose pool cannot be told and images in no
    list are dropped once, by the 'train' pool."""
    train = spec.pool == "train"
    label_file = os.path.basename(spec.path)
    listed = set()
    try:
        with open(spec.path, encoding="utf-8-sig", errors="replace") as f:
            lines = list(f)
    except OSError as e:
        raise DataError(f"cannot read {spec.path}: {e}") from e
    for number, text in enumerate(lines, 1):
        fields = text.split()
        if not fields:
            continue
        name = f"{label_file}:{number} ({fields[0]})"
        listed.add(fields[0])
        pool = fields[0].split("_")[0].lower()
        if len(fields) != 2 or pool not in POOLS:
            if train:
                problem = (
                    f"{len(fields)} fields, expected 2 (file name, label)"
                    if len(fields) != 2
                    else f"file name {fields[0]!r} starts with neither train_ nor test_"
                )
                yield Drop("dropped_malformed_row", name, problem)
            continue
        if pool != spec.pool:
            continue
        try:
            label = parse_int(fields[1], "label")
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
            continue
        if label not in CODES:
            yield Drop("dropped_unknown_label", name, f"label {label} (RAF-DB has 1-7)")
            continue
        path = os.path.join(plan.images_dir, image_name(fields[0], plan.images_dir))
        yield Candidate(
            key=name,
            name=name,
            image_path=path,
            expression=CODES[label],
            valence=math.nan,
            arousal=math.nan,
            landmarks=no_landmarks(),
        )
    if train:
        shown = f"Image/{os.path.basename(plan.images_dir)}"
        for f in list_dir(plan.images_dir):
            if is_image_name(f) and _listed_name(f, plan.images_dir) not in listed:
                yield Drop(
                    "dropped_missing_annotation", f"{shown}/{f}", f"in no line of {label_file}"
                )
