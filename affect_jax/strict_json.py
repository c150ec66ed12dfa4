"""Strict JSON files: undefined numbers (NaN, infinities) are written as ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity``, which other JSON readers reject. Every JSON
file a run writes (``run_dir.write_json``/``append_jsonl``, the data report, predictions) goes
through ``json_safe`` and is dumped with ``allow_nan=False``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays as Python numbers and lists, tuples as lists and
    NaN or infinite numbers as None."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``json_safe(value)``; raises ValueError rather than write NaN."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write(path: str | os.PathLike, value: Any) -> None:
    """Writes ``value`` to ``path`` (indented)."""
    text = dumps(value, indent=2)
    with open(path, "w") as f:
        f.write(text)
