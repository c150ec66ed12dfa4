"""FER2013 as users download it: ``fer2013.csv`` (``emotion, pixels, Usage``), or the two-file
variant (``train.csv`` with ``emotion, pixels``; ``test.csv`` with pixels only).

Each row holds a 48x48 grayscale face as 2,304 space-separated values and a class 0-6 (Angry,
Disgust, Fear, Happy, Sad, Surprise, Neutral), mapped by name onto the project's class order.
``Usage`` gives the standard protocol's split: Training -> 'train', PublicTest -> 'validation',
PrivateTest -> 'test' pools (the pipeline then uses the given validation split instead of a
random one). The two-file variant's ``train.csv`` is the 'train' pool (split 80/20); a
``test.csv`` without labels is not read (nothing to train or score on) and the run says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np

from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.labels import class_from_name
from affect_jax.data.affectnet.plans import (
    LayoutPlan,
    SplitSpec,
    assign_pools,
    read_header,
    root_and_children,
    stamp_fingerprint,
)
from affect_jax.data.affectnet.rows import (
    Candidate,
    Drop,
    checked_rows,
    csv_rows,
    no_landmarks,
    parse_int,
)

SIDE = 48  # Faces are SIDE x SIDE grayscale.
CLASS_NAMES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
CODES = tuple(class_from_name(name) for name in CLASS_NAMES)  # FER2013 class -> project code.
USAGE_POOLS = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
PREFERRED_NAME = "fer2013.csv"

HELP = (
    "fer2013.csv (emotion, pixels, Usage), or train.csv (emotion, pixels) with an optional "
    "test.csv, at the root or one level down, or config.data.dir naming the CSV"
)


def pixel_csvs(root: str) -> dict[str, tuple[str, list[str]]]:
    """CSV files with a 'pixels' column in ``root`` (a directory or a CSV file) or one level
    down: name (relative to ``root``) -> (path, lowercased header)."""
    if os.path.isfile(root):
        paths = [root]
        base = os.path.dirname(root)
    else:
        base = root
        paths = [
            os.path.join(d, e)
            for d in root_and_children(root)
            for e in sorted(os.listdir(d))
            if e.lower().endswith(".csv") and os.path.isfile(os.path.join(d, e))
        ]
    found = {}
    for path in paths:
        header = read_header(path)
        if "pixels" in header:
            found[os.path.relpath(path, base)] = (path, header)
    return found


def pick_usage_file(found: dict[str, tuple[str, list[str]]], what: str, root: str) -> str:
    """The one FER2013 file with a Usage column among ``found`` (fer2013.csv if several)."""
    if len(found) == 1:
        return next(iter(found.values()))[0]
    named = [v[0] for k, v in found.items() if os.path.basename(k).lower() == PREFERRED_NAME]
    if len(named) == 1:
        return named[0]
    raise DataError(
        f"{root} holds {len(found)} {what} ({', '.join(sorted(found))}); point config.data.dir "
        "at the one to read"
    )


def usage_splits(path: str, layout: str) -> tuple[SplitSpec, ...]:
    """The pools of a file with a Usage column: one per standard split it has rows of."""
    header = read_header(path)
    column = header.index("usage")
    usages = set()
    for _, row in csv_rows(path):
        if len(row) == len(header):
            usages.add(canonical_usage(row[column]))
    splits = tuple(
        SplitSpec(pool, usage, path) for usage, pool in USAGE_POOLS.items() if usage in usages
    )
    if not any(s.pool == "train" for s in splits):
        raise DataError(
            f"{path} ({layout} layout) has no row with Usage 'Training' (found: "
            f"{sorted(u for u in usages if u)}); expected Training, PublicTest and PrivateTest"
        )
    return splits


def canonical_usage(text: str) -> str | None:
    """'publictest ' -> 'PublicTest'; None for anything that is not a standard split."""
    key = text.strip().lower()
    return next((u for u in USAGE_POOLS if u.lower() == key), None)


def detect(root: str) -> LayoutPlan | None:
    found = pixel_csvs(root)
    if not found:
        return None
    labelled = {k: v for k, v in found.items() if "emotion" in v[1]}
    unlabelled = sorted(k for k in found if k not in labelled)
    with_usage = {k: v for k, v in labelled.items() if "usage" in v[1]}
    notes = tuple(
        f"{name} has no 'emotion' column: not read (no labels to train or score on; "
        "python -m affect_jax.predict scores image files)"
        for name in unlabelled
    )
    if with_usage:
        path = pick_usage_file(with_usage, "FER2013 files with a Usage column", root)
        splits = usage_splits(path, "fer2013")
    elif labelled:
        pools = assign_pools(sorted(labelled), "labelled FER2013 CSV files", root)
        splits = tuple(
            SplitSpec(pool, name, labelled[name][0]) for pool, name in sorted(pools.items())
        )
    else:
        raise DataError(
            f"{root} holds FER2013 pixels ({', '.join(unlabelled)}) but no 'emotion' column to "
            "train on: expected fer2013.csv (emotion, pixels, Usage) or train.csv (emotion, "
            "pixels)"
        )
    return LayoutPlan(
        "fer2013",
        root,
        splits,
        False,
        num_classes=7,
        notes=notes,
        fingerprint=stamp_fingerprint(sorted({s.path for s in splits})),
    )


def parse_pixels(text: str) -> np.ndarray:
    """The uint8 [48, 48] face of a 'pixels' field; ValueError if it is not 2,304 values in
    0-255."""
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        raise ValueError("pixels are not all integers") from None
    if values.size != SIDE * SIDE:
        raise ValueError(f"{values.size} pixel values, expected {SIDE * SIDE} ({SIDE}x{SIDE})")
    if values.min() < 0 or values.max() > 255:
        raise ValueError(f"pixel values span {values.min()}..{values.max()}, expected 0..255")
    return values.astype(np.uint8).reshape(SIDE, SIDE)


def face_candidate(name: str, code: int, pixels_text: str) -> Candidate:
    """The candidate of one parsed row (ValueError for bad pixels)."""
    return Candidate(
        key=name,
        name=name,
        image_path=name,
        expression=code,
        valence=math.nan,
        arousal=math.nan,
        landmarks=no_landmarks(),
        pixels=parse_pixels(pixels_text),
    )


def read(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    """The rows of ``spec``'s pool. Rows whose split cannot be told (malformed, an unknown
    Usage) are dropped once, by the 'train' pool."""
    rows = csv_rows(spec.path)
    first = next(rows, None)
    if first is None:
        return
    header = [c.strip().lower() for c in first[1]]
    emotion, pixels = header.index("emotion"), header.index("pixels")
    usage = header.index("usage") if "usage" in header else None
    file_name = os.path.basename(spec.path)
    for item in checked_rows(file_name, rows, len(header)):
        if isinstance(item, Drop):
            if spec.pool == "train":
                yield item
            continue
        _, name, _, row = item
        if usage is not None:
            split = canonical_usage(row[usage])
            if split is None:
                if spec.pool == "train":
                    yield Drop(
                        "dropped_malformed_row",
                        name,
                        f"Usage {row[usage].strip()!r} is none of {', '.join(USAGE_POOLS)}",
                    )
                continue
            if split != spec.name:
                continue
        try:
            label = parse_int(row[emotion].strip(), "emotion")
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
            continue
        if not 0 <= label < len(CODES):
            yield Drop("dropped_unknown_label", name, f"emotion {label} (FER2013 has 0-6)")
            continue
        try:
            yield face_candidate(name, CODES[label], row[pixels])
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
