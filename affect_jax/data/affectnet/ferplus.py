"""FER+ as users hold it: ``fer2013new.csv`` (10 annotators' votes per face) beside FER2013's
``fer2013.csv`` (the pixels), row by row in the same order.

Labels are the majority vote of Microsoft's FERPlus reference code ('majority' mode): single
votes are discarded as outliers, and the most voted class must hold more than half of the
remaining votes; a face without such a majority (ties included) is dropped as
``dropped_no_majority``, one whose majority is ``unknown`` or ``NF`` (not a face) as
``dropped_non_emotion``. Eight classes (Contempt is dropped under the 7-class protocol); Usage
splits the pools as in FER2013 (Training / PublicTest / PrivateTest -> train / validation / test).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence

from affect_jax.data.affectnet import fer2013
from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.labels import class_from_name
from affect_jax.data.affectnet.plans import (
    LayoutPlan,
    SplitSpec,
    read_header,
    root_and_children,
    stamp_fingerprint,
)
from affect_jax.data.affectnet.rows import CSV_ERROR, Candidate, Drop, csv_rows, parse_int

VOTE_COLUMNS = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "nf",
)
NON_EMOTION_COLUMNS = ("unknown", "nf")
IMAGE_NAME_COLUMN = "image name"

HELP = "fer2013new.csv (Usage, Image name, 10 vote columns) beside FER2013's fer2013.csv"


def majority(votes: Sequence[int]) -> int | None:
    """Index of the majority column of one face's votes, or None (FERPlus 'majority' mode)."""
    kept = [v if v > 1 else 0 for v in votes]  # A single vote is an outlier.
    top = max(kept)
    if top == 0 or 2 * top <= sum(kept):
        return None
    return kept.index(top)


def _is_votes_header(header: list[str]) -> bool:
    return (
        "usage" in header and IMAGE_NAME_COLUMN in header and all(c in header for c in VOTE_COLUMNS)
    )


def detect(root: str) -> LayoutPlan | None:
    if os.path.isfile(root):
        return None
    votes = [
        os.path.join(d, e)
        for d in root_and_children(root)
        for e in sorted(os.listdir(d))
        if e.lower().endswith(".csv") and _is_votes_header(read_header(os.path.join(d, e)))
    ]
    if not votes:
        return None
    if len(votes) > 1:
        raise DataError(f"{root} holds {len(votes)} FER+ vote files ({', '.join(votes)}); keep one")
    pixel_files = {k: v for k, v in fer2013.pixel_csvs(root).items() if "usage" in v[1]}
    if not pixel_files:
        raise DataError(
            f"{root} has FER+ votes ({votes[0]}) but not FER2013's fer2013.csv (emotion, pixels, "
            "Usage) with the faces, at the root or one level down: put it beside"
        )
    pixels = fer2013.pick_usage_file(pixel_files, "FER2013 files with a Usage column", root)
    return LayoutPlan(
        "ferplus",
        root,
        fer2013.usage_splits(votes[0], "ferplus"),
        False,
        fingerprint=stamp_fingerprint([votes[0], pixels]),
        num_classes=8,
        pixels_path=pixels,
    )


# Project code per vote column; None for unknown and NF.
CODES = tuple(class_from_name(c) for c in VOTE_COLUMNS)


def read(spec: SplitSpec, plan: LayoutPlan) -> Iterator[Candidate | Drop]:
    """The faces of ``spec``'s pool; rows whose split cannot be told are dropped once, by the
    'train' pool."""
    vote_rows, pixel_rows = csv_rows(spec.path), csv_rows(plan.pixels_path)
    vote_header = [c.strip().lower() for c in next(vote_rows, (0, []))[1]]
    pixel_header = [c.strip().lower() for c in next(pixel_rows, (0, []))[1]]
    usage, name_column = vote_header.index("usage"), vote_header.index(IMAGE_NAME_COLUMN)
    vote_index = [vote_header.index(c) for c in VOTE_COLUMNS]
    pixels, pixel_usage = pixel_header.index("pixels"), pixel_header.index("usage")
    votes_file = os.path.basename(spec.path)
    pixels_file = os.path.basename(plan.pixels_path)
    train = spec.pool == "train"
    for votes_item, pixels_item in itertools.zip_longest(vote_rows, pixel_rows):
        if votes_item is None:
            if train:
                yield Drop(
                    "dropped_missing_annotation",
                    f"{pixels_file}:{pixels_item[0]}",
                    f"no row of {votes_file} for it",
                )
            continue
        line, row = votes_item
        name = f"{votes_file}:{line}"
        if row[0] == CSV_ERROR or len(row) != len(vote_header):
            if train:
                problem = (
                    f"unreadable CSV row ({row[1]})"
                    if row[0] == CSV_ERROR
                    else f"{len(row)} fields, expected {len(vote_header)}"
                )
                yield Drop("dropped_malformed_row", name, problem)
            continue
        name = f"{name} ({row[name_column].strip() or 'no image name'})"
        split = fer2013.canonical_usage(row[usage])
        if split is None:
            if train:
                yield Drop(
                    "dropped_malformed_row",
                    name,
                    f"Usage {row[usage].strip()!r} is none of {', '.join(fer2013.USAGE_POOLS)}",
                )
            continue
        if split != spec.name:
            continue
        try:
            counts = [
                parse_int(row[i].strip(), f"{VOTE_COLUMNS[k]} votes")
                for k, i in enumerate(vote_index)
            ]
            if min(counts) < 0:
                raise ValueError(f"negative vote count in {counts}")
            if pixels_item is None:
                raise ValueError(f"no row of {pixels_file} for it")
            face = pixels_item[1]
            if face[0] == CSV_ERROR or len(face) != len(pixel_header):
                raise ValueError(f"{pixels_file}:{pixels_item[0]} is malformed")
            if fer2013.canonical_usage(face[pixel_usage]) != split:
                raise ValueError(
                    f"{pixels_file}:{pixels_item[0]} has Usage {face[pixel_usage].strip()!r}: "
                    "the two files are not in the same row order"
                )
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
            continue
        winner = majority(counts)
        if winner is None:
            yield Drop("dropped_no_majority", name, f"votes {counts}")
            continue
        if CODES[winner] is None:
            yield Drop("dropped_non_emotion", name, f"majority {VOTE_COLUMNS[winner]} {counts}")
            continue
        try:
            yield fer2013.face_candidate(name, CODES[winner], face[pixels])
        except ValueError as e:
            yield Drop("dropped_malformed_row", name, str(e))
