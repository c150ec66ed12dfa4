"""The ``affectnet`` source the input pipeline loads: the user's AffectNet (FER2013, FER+,
RAF-DB, manifest, class folders) files, prepared once by the TFDS builder (``builder``), read back
as pools.

``load_source`` detects the layout of ``config.data.dir`` (or checks ``config.data.layout``),
prepares it into TFDS's cache (``config.data.tfds_data_dir``, else TFDS's default) under a config
name hashed from everything the result depends on, and returns pools whose ``decode`` decodes the
stored image bytes with ``tf.io.decode_image`` (as the preparation's check did).

Memory: a split whose encoded images total at most ``IN_MEMORY_MAX_BYTES`` (1 GiB; the 3999-image
release is ~60-80 MB) is read into memory as bytes. A larger one (the full 290k-image release is
several GB) is read by random access from the prepared ArrayRecord files: its pool holds only the
labels and a record index, and ``decode`` fetches the image bytes inside ``tf.data`` (one
``tf.numpy_function`` call per example).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from affect_jax import strict_json
from affect_jax.data import tfds_cache
from affect_jax.data.affectnet.builder import Affectnet, make_builder_config
from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.report import log_report, total_counts
from affect_jax.data.images import decode_image_tensor
from affect_jax.data.source import AFFECTNET_CLASS_NAMES, REPORT_FILE, ExamplePool, Source

IN_MEMORY_MAX_BYTES = 1 << 30
# Layouts of other datasets, named as such in runs' files; AffectNet's (and the generic manifest
# and class folders) are 'affectnet'.
OTHER_DATASETS = ("fer2013", "ferplus", "rafdb")
_READ_CHUNK = 1024


def prepare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Prepares (or reuses) the TFDS copy of ``config.data.dir``; returns the builder."""
    data = config.data
    builder_config, plan = make_builder_config(
        data.dir,
        data.layout,
        int(data.num_classes),
        float(data.face_margin),
        data.get("image_root", ""),
    )
    builder = Affectnet(config=builder_config, data_dir=data.get("tfds_data_dir") or None)
    if builder.is_prepared():
        logging.info("Data: reusing the prepared copy in %s", builder.data_dir)
        return builder
    logging.info(
        "Data: preparing the %s layout of %s into %s (once; later runs reuse it)",
        plan.layout,
        plan.root,
        builder.data_dir,
    )
    try:
        tfds_cache.prepare_once(
            builder,
            download_config=tfds.download.DownloadConfig(manual_dir=plan.root),
            file_format="array_record",
        )
    except DataError as e:
        e.report = builder.info.metadata.get("report", {})  # what was read before it stopped
        raise
    return builder


def load_source(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    in_memory_max_bytes: int | None = None,
) -> Source:
    """The user's AffectNet as a Source (see the module docstring); raises DataError if unusable.

    Logs what was kept and dropped per reason (with the first offending files) and writes it to
    ``<workdir>/data_report.json`` when ``workdir`` is given, with the error if there is one.
    """
    try:
        builder = prepare(config)
    except DataError as e:
        if workdir:
            _write_report(
                workdir,
                {
                    "error": str(e),
                    "data_dir": config.data.dir,
                    "layout": config.data.layout,
                    **getattr(e, "report", {}),
                },
            )
        raise
    report = json.loads(json.dumps(builder.info.metadata["report"]))  # A copy to extend.
    report["cache_dir"] = os.fspath(builder.data_dir)
    limit = IN_MEMORY_MAX_BYTES if in_memory_max_bytes is None else in_memory_max_bytes

    totals = total_counts(split["counts"] for split in report["splits"].values())
    report["counts"] = totals
    log_report(report)

    num_classes = int(config.data.num_classes)
    pools = {}
    for pool_name in report["splits"]:
        pools[pool_name] = _read_pool(builder, pool_name, limit)
        report["splits"][pool_name]["class_counts"] = {
            AFFECTNET_CLASS_NAMES[c]: int(n)
            for c, n in enumerate(np.bincount(pools[pool_name].labels, minlength=num_classes))
        }
    if workdir:
        _write_report(workdir, report)
    return Source(
        name=dataset_name(report["layout"]),
        class_names=tuple(AFFECTNET_CLASS_NAMES[:num_classes]),
        pools=pools,
        has_valence_arousal=bool(report["has_valence_arousal"]),
        counts=totals,
    )


def dataset_name(layout: str) -> str:
    """The Source name of a layout: 'fer2013', 'ferplus', 'rafdb', else 'affectnet'."""
    return layout if layout in OTHER_DATASETS else "affectnet"


def _write_report(workdir: str, report: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    strict_json.write(os.path.join(workdir, REPORT_FILE), report)


def _read_pool(builder: tfds.core.DatasetBuilder, split: str, limit: int) -> ExamplePool:
    """A pool of the prepared ``split``, sorted by source path (a stable row order)."""
    in_memory = builder.info.splits[split].num_bytes <= limit
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    columns: dict[str, list] = {
        k: [] for k in ("expression", "valence", "arousal", "landmarks", "path", "box")
    }
    images: list[bytes] = []
    for start in range(0, len(source), _READ_CHUNK):
        for example in source.__getitems__(range(start, min(start + _READ_CHUNK, len(source)))):
            for k in columns:
                columns[k].append(example[k])
            if in_memory:
                images.append(example["image"])
    order = np.argsort(np.array([_text(p) for p in columns["path"]]), kind="stable")
    table = {
        "expression": np.asarray(columns["expression"], np.int32)[order],
        "valence": np.asarray(columns["valence"], np.float32)[order],
        "arousal": np.asarray(columns["arousal"], np.float32)[order],
        "landmarks": np.asarray(columns["landmarks"], np.float32)[order],
        "box": np.asarray(columns["box"], np.int32)[order],
        "path": np.array([_text(p) for p in columns["path"]], dtype=object)[order],
    }
    if in_memory:
        table["image_bytes"] = np.array(images, dtype=object)[order]
        return ExamplePool(table, decode_image_bytes)
    logging.info(
        "AffectNet split %r (%d MB) is read from %s by random access",
        split,
        builder.info.splits[split].num_bytes >> 20,
        builder.data_dir,
    )
    table["record"] = order.astype(np.int64)
    return ExamplePool(table, _RecordDecoder(builder, split))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_image_bytes(row: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """``decode`` of in-memory pools: the encoded image in column ``image_bytes``."""
    return tf.ensure_shape(decode_image_tensor(row["image_bytes"]), (None, None, 3))


class _RecordDecoder:
    """``decode`` of large pools: fetches the image bytes of row ``record`` from ArrayRecord."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        self._source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})

    def _fetch(self, index: np.ndarray) -> bytes:
        return self._source[int(index)]["image"]

    def __call__(self, row: Mapping[str, tf.Tensor]) -> tf.Tensor:
        data = tf.numpy_function(self._fetch, [row["record"]], tf.string, stateful=False)
        data = tf.ensure_shape(data, ())
        return decode_image_bytes({"image_bytes": data})
