"""The contract between data sources (synthetic, AffectNet layouts) and the input pipeline.

A source turns what the user holds into one or more *pools* of examples. A pool is a table of
equal-length NumPy columns plus a function that turns one row into an image inside tf.data. The
pipeline splits the ``'train'`` pool into train/validation (stratified by expression) unless the
source gives a ``'validation'`` pool (a dataset's standard split, e.g. FER2013's PublicTest), and
reads an optional ``'test'`` pool (e.g. AffectNet's official validation release) as a held-out
split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: importing this module does not load TensorFlow
    import tensorflow as tf

# Columns every pool carries. Valence/arousal are NaN where the source has none (class folders).
REQUIRED_COLUMNS = ("expression", "valence", "arousal")

# What a source kept and dropped, written into the run's workdir (run_dir.DATA_REPORT).
REPORT_FILE = "data_report.json"
AFFECTNET_CLASS_NAMES = (
    "Neutral",
    "Happy",
    "Sad",
    "Surprise",
    "Fear",
    "Disgust",
    "Anger",
    "Contempt",
)


@dataclasses.dataclass(frozen=True)
class ExamplePool:
    """A table of examples: ``columns`` (NumPy, one row per example) and ``decode``.

    ``columns`` must hold ``expression`` (int32, 0..num_classes-1), ``valence`` and ``arousal``
    (float32 in [-1, 1], NaN where absent) and whatever ``decode`` needs (a path, a box, encoded
    bytes or a raw uint8 image). ``decode`` maps one row (a dict of scalar tf.Tensors, traced in
    ``tf.data.Dataset.map``) to a uint8 image ``[H, W, 3]`` of any size; the pipeline resizes.
    """

    columns: Mapping[str, np.ndarray]
    decode: Callable[[Mapping[str, tf.Tensor]], tf.Tensor]

    def __post_init__(self):
        missing = [c for c in REQUIRED_COLUMNS if c not in self.columns]
        if missing:
            raise ValueError(
                f"ExamplePool is missing columns {missing}; it has {sorted(self.columns)}"
            )
        lengths = {name: len(col) for name, col in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"ExamplePool columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.columns["expression"])

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.columns["expression"], np.int32)


@dataclasses.dataclass(frozen=True)
class Source:
    """What a data source provides to the pipeline."""

    name: str
    class_names: tuple[str, ...]
    # 'train' (required), 'validation' (optional: used as is instead of a split of 'train'),
    # 'test' (optional held-out split).
    pools: Mapping[str, ExamplePool]
    has_valence_arousal: bool
    # Examples kept/dropped per reason, e.g. {'kept': 3999, 'dropped_contempt': 0, ...};
    # the pipeline logs it and writes it to the workdir.
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if "train" not in self.pools:
            raise ValueError(
                f"Source {self.name!r} has no 'train' pool (pools: {sorted(self.pools)})"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def decode_raw_image(row: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """``decode`` for pools that hold the uint8 image itself in column ``image``."""
    return row["image"]
