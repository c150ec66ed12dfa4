"""Resuming an interrupted prediction into its output file (``--resume``).

The command line writes each input's rows together, in input order, and flushes every row, so
after an interruption the file holds whole inputs and then, possibly, part of one (some of an
image's faces, some of a video's frames, half a line). ``read_progress`` keeps the whole
inputs and cuts the file where the last input it names begins: that input is predicted again,
and so is everything after it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence

from affect_jax.predict.faces import STATUS_OK


@dataclasses.dataclass(frozen=True)
class Progress:
    """What an output file already holds: the inputs done (every row of theirs written), the
    rows kept, how many of them are 'ok', and the byte offset to cut the file at."""

    done: frozenset[str]
    rows: int
    ok: int
    keep_bytes: int


NOTHING_DONE = Progress(frozenset(), 0, 0, 0)


def _parse(text: str, fmt: str, columns: Sequence[str]) -> dict | None:
    """The row of one output line, or None if it is not one of ``columns``."""
    if fmt == "csv":
        fields = next(csv.reader([text]), [])
        return dict(zip(columns, fields, strict=True)) if len(fields) == len(columns) else None
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and set(row) == set(columns) else None


def _rows(data: bytes, fmt: str, columns: Sequence[str], output: str) -> Iterator[tuple[int, dict]]:
    """(offset where its line starts, row) for every row after a CSV's header. A last line
    without its newline was cut by the interruption and is left out; any other line that is
    not a row of ``columns`` is a ValueError: the file is not this run's output."""
    lines = data.splitlines(keepends=True)
    offset = 0
    for number, line in enumerate(lines, 1):
        if not line.endswith(b"\n"):
            return  # only the last line can lack it
        text = line.decode("utf-8", "replace")
        if fmt == "csv" and number == 1:
            header = next(csv.reader([text]), [])
            if header != list(columns):
                raise ValueError(
                    f"--output={output}: its first line is not this run's CSV header "
                    f"({len(header)} fields, {header[:2]}..., expected {len(columns)}, "
                    f"{list(columns[:2])}...): resume with the run, options and --format that "
                    "wrote it, or write to a new file"
                )
        else:
            row = _parse(text, fmt, columns)
            if row is None:
                raise ValueError(
                    f"--output={output}: line {number} is not a {fmt} row of this run "
                    f"({text.strip()[:60]!r}): resume with the run, options and --format that "
                    "wrote it, or write to a new file"
                )
            yield offset, row
        offset += len(line)


def read_progress(output: str, fmt: str, columns: Sequence[str]) -> Progress:
    """The inputs ``output`` (``fmt`` 'csv' or 'jsonl', rows of ``columns``) holds whole.

    A missing or empty file holds nothing. ValueError (one line) when the file's columns are
    not ``columns``: it was written by another run, or in the other format.
    """
    try:
        with open(output, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return NOTHING_DONE
    groups: list[tuple[str, int, int, int]] = []  # (path, start offset, rows, ok rows)
    for offset, row in _rows(data, fmt, columns, output):
        path = str(row["path"])
        if not groups or groups[-1][0] != path:
            groups.append((path, offset, 0, 0))
        name, start, rows, ok = groups[-1]
        groups[-1] = (name, start, rows + 1, ok + (row["status"] == STATUS_OK))
    if not groups:  # nothing yet, or only a CSV's header (checked by _rows)
        first = data.splitlines(keepends=True)[:1]
        header_bytes = len(first[0]) if first and first[0].endswith(b"\n") else 0
        return Progress(frozenset(), 0, 0, header_bytes)
    whole = groups[:-1]  # the last input may have been cut short: it is predicted again
    return Progress(
        frozenset(path for path, *_ in whole),
        sum(rows for *_, rows, _ in whole),
        sum(ok for *_, ok in whole),
        groups[-1][1],
    )


def remaining(
    inputs: Iterable[tuple[str, str | None, str | None]], done: frozenset[str]
) -> list[str]:
    """The paths of ``media.expand_inputs``'s items that are not ``done``, in order."""
    return [path for path, _, _ in inputs if path not in done]


def open_for_resume(output: str, progress: Progress):
    """``output`` cut to ``progress.keep_bytes`` and open for appending (created if missing)."""
    out = open(output, "a", newline="")
    out.truncate(progress.keep_bytes)
    out.seek(0, os.SEEK_END)
    return out
