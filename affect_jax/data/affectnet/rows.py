"""What every reader yields (``Candidate``, ``Drop``) and the parsing the readers share: CSV rows
that never stop a read, numbers, landmarks."""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from affect_jax.data.affectnet.errors import DataError

NUM_LANDMARKS = 68
CSV_ERROR = "\0csv-error"  # First field of the row csv_rows yields for a row csv cannot parse.


@dataclasses.dataclass
class Candidate:
    """An example a reader parsed; its labels, valence/arousal and image are checked next."""

    key: str
    name: str  # Shown in reports.
    image_path: str  # The image file (pixel layouts: the name shown as the example's path).
    expression: int
    valence: float
    arousal: float
    landmarks: np.ndarray  # [68, 2] float32, NaN when absent.
    box: tuple[float, float, float, float] | None = None  # official: x, y, width, height.
    pixels: np.ndarray | None = None  # FER2013, FER+: the uint8 [H, W] image itself.


@dataclasses.dataclass
class Drop:
    """An example a reader rejected: the drop reason, its name in reports and why."""

    reason: str
    name: str
    detail: str


# A number with a decimal comma, as spreadsheets write it in much of Europe: '-0,25'.
_DECIMAL_COMMA = re.compile(r"\s*[+-]?\d*,\d+\s*")


def parse_float(text: str, what: str) -> float:
    """``text`` as a number ('0.5', or '0,5' with a decimal comma); ValueError naming ``what``."""
    try:
        return float(text)
    except (TypeError, ValueError):
        if isinstance(text, str) and _DECIMAL_COMMA.fullmatch(text):
            return float(text.replace(",", "."))
        raise ValueError(f"{what} {text!r} is not a number") from None


def parse_int(text: str, what: str = "expression") -> int:
    value = parse_float(text, what)
    if not value.is_integer():
        raise ValueError(f"{what} {text!r} is not an integer")
    return int(value)


def parse_landmarks(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, np.float32).reshape(-1)
    if array.size != 2 * NUM_LANDMARKS:
        raise ValueError(f"{what} has {array.size} numbers, expected {2 * NUM_LANDMARKS}")
    return array.reshape(NUM_LANDMARKS, 2)


def no_landmarks() -> np.ndarray:
    return np.full((NUM_LANDMARKS, 2), np.nan, np.float32)


def csv_delimiter(first_line: str) -> str:
    """The field separator of a CSV file, from its first line: ',' if the line has a comma
    (AffectNet's landmark fields hold ';'), else ';' or a tab, whichever it has more of
    (spreadsheets write ';' where the comma is the decimal mark)."""
    if "," in first_line or not (";" in first_line or "\t" in first_line):
        return ","
    return ";" if first_line.count(";") >= first_line.count("\t") else "\t"


def csv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row, separated by ``csv_delimiter``'s choice;
    a broken file raises DataError."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            delimiter = csv_delimiter(f.readline())
            f.seek(0)
            reader = csv.reader(f, delimiter=delimiter)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # E.g. a NUL byte: this row is lost, the rest is read.
                    yield reader.line_num, [CSV_ERROR, str(e)]
                    continue
                if any(c.strip() for c in row):
                    yield reader.line_num, row
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e


def checked_rows(
    split_name: str,
    rows: Iterable[tuple[int, list[str]]],
    num_columns: int,
    path_index: int | None = None,
) -> Iterator[Drop | tuple[int, str, str, list[str]]]:
    """(line number, name in reports, image path as written or '', fields) of every row that
    has ``num_columns`` fields; a Drop for any other row (one csv could not parse, or another
    field count)."""
    for line, row in rows:
        if row and row[0] == CSV_ERROR:
            problem = f"unreadable CSV row ({row[1]})"
        elif len(row) != num_columns:
            problem = f"{len(row)} fields, expected {num_columns}"
        elif path_index is None:
            yield line, f"{split_name}:{line}", "", row
            continue
        else:
            rel = row[path_index].strip()
            yield line, f"{split_name}:{line} ({rel})", rel, row
            continue
        yield Drop("dropped_malformed_row", f"{split_name}:{line}", problem)
