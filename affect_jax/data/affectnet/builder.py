"""TFDS builder ``affectnet``: the user's AffectNet, checked and stored once as ArrayRecord.

``make_builder_config`` names a config by everything the prepared copy depends on; the
``Affectnet`` builder reads each split with ``readers.read_split``, checks labels and
valence/arousal (``labels``) and images (``faces.load_face``), and stores the kept examples
with the drop counts in the dataset's ``metadata.json`` (``info.metadata['report']``).

affect-jax prepares through ``affect_jax.data.affectnet.prepare``/``load_source``. The builder's
default config 'auto' (layout detected, 8 classes, no margin; unlike the configs ``load_source``
makes, it is not keyed by the manual dir) also serves TFDS's own tools, e.g.
``Affectnet(data_dir=...).download_and_prepare(download_config=tfds.download.DownloadConfig(
manual_dir=...))`` or ``tfds build affect_jax/data/affectnet/builder.py --manual_dir=...`` (the
``tfds`` command of TFDS 4.9.10 also needs apache-beam installed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from affect_jax.data.affectnet import faces
from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.labels import label_drop_reason, valence_arousal_ok
from affect_jax.data.affectnet.layouts import (
    LAYOUT_HELP,
    OFFICIAL_IMAGES_DIR,
    LayoutPlan,
    SplitSpec,
    detect_layout,
)
from affect_jax.data.affectnet.readers import official_unreferenced, read_split
from affect_jax.data.affectnet.report import Tally, format_counts
from affect_jax.data.affectnet.rows import NUM_LANDMARKS, Candidate, Drop
from affect_jax.data.source import AFFECTNET_CLASS_NAMES

# Bump when what preparation stores changes: it is part of every cache key.
# 2: .webp images are read (data/images.py IMAGE_EXTENSIONS). 3: .tif/.tiff are read; whole
# images are turned upright by EXIF, and stored as PNG unless they are JPEG or PNG as stored.
# 4: label files separated by ';' or tabs, decimal commas, and .heic/.heif images are read.
# 5: .avif images are read.
PREPARE_FORMAT = 5

_WORKERS = max(1, min(4, os.cpu_count() or 1))
_CHUNK = 64  # Images decoded per batch of worker tasks (bounds memory).

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
AffectNet must be obtained from its authors (http://mohammadmahoor.com/affectnet/). Point the
manual dir (affect-jax: --config.data.dir) at your copy, in any of these layouts: {LAYOUT_HELP}.
"""


@dataclasses.dataclass
class AffectNetConfig(tfds.core.BuilderConfig):
    """What a prepared copy depends on; ``make_builder_config`` names it by their hash."""

    data_dir: str = ""  # '' = TFDS's manual dir.
    layout: str = "auto"
    num_classes: int = 8
    face_margin: float = 0.0
    image_root: str = ""  # Manifest: where relative image paths start ('' = the CSV's dir).


def make_builder_config(
    data_dir: str,
    layout: str = "auto",
    num_classes: int = 8,
    face_margin: float = 0.0,
    image_root: str = "",
) -> tuple[AffectNetConfig, LayoutPlan]:
    """A config keyed by everything the prepared data depends on, and the detected layout.

    The name carries a hash of the resolved directory, layout, class count, margin, the
    annotation files' fingerprint (list stamps, or the file listing of npy/folder trees) and the
    preparation format, so a change of any of them prepares a new copy instead of reusing a
    wrong one.
    """
    if num_classes not in (7, 8):
        raise DataError(f"config.data.num_classes={num_classes}; AffectNet supports 7 or 8")
    if not (math.isfinite(face_margin) and face_margin >= 0):
        raise DataError(f"config.data.face_margin={face_margin}; expected a fraction >= 0")
    plan = detect_layout(data_dir, layout, image_root)
    if num_classes > plan.num_classes:
        raise DataError(
            f"config.data.num_classes={num_classes} but the {plan.layout} layout at {plan.root} "
            f"carries {plan.num_classes} classes (no Contempt): pass "
            f"--config.data.num_classes={plan.num_classes}"
        )
    key = json.dumps(
        {
            "format": PREPARE_FORMAT,
            "dir": plan.root,
            "layout": plan.layout,
            "num_classes": num_classes,
            "face_margin": repr(float(face_margin)),
            "fingerprint": plan.fingerprint,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    config = AffectNetConfig(
        name=f"{plan.layout}_{num_classes}cls_{digest}",
        description=(
            f"{plan.layout} layout at {plan.root}, {num_classes} classes, face margin {face_margin}"
        ),
        data_dir=plan.root,
        layout=plan.layout,
        num_classes=num_classes,
        face_margin=float(face_margin),
        image_root=plan.images_dir if plan.layout == "manifest" else "",
    )
    return config, plan


class Affectnet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """AffectNet faces with expression, valence, arousal and landmarks, from a manual dir."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Four layouts; faces cropped; drops counted per reason."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        AffectNetConfig(
            name="auto", description="Layout detected in the manual dir; 8 classes; no margin."
        )
    ]

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own code_path needs `importlib_resources`, which it declares only for
        # Python < 3.9 (ModuleNotFoundError on 3.11); this file is the builder's code.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        num_classes = self.builder_config.num_classes
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "AffectNet face crops: expression (AffectNet codes 0-6, plus 7 Contempt in the "
                "8-class protocol), valence and arousal in [-1, 1] (NaN when the layout has "
                "none), 68 landmarks in crop pixels (NaN when absent), the crop box in the "
                "source image and the source path."
            ),
            features=tfds.features.FeaturesDict(
                {
                    # Official layout: the crop re-encoded as JPEG; other layouts: the file's bytes.
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "expression": tfds.features.ClassLabel(
                        names=list(AFFECTNET_CLASS_NAMES[:num_classes])
                    ),
                    "valence": tfds.features.Scalar(dtype=np.float32),
                    "arousal": tfds.features.Scalar(dtype=np.float32),
                    "landmarks": tfds.features.Tensor(shape=(NUM_LANDMARKS, 2), dtype=np.float32),
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),  # x0, y0, x1, y1.
                    "path": tfds.features.Text(),
                }
            ),
            homepage="http://mohammadmahoor.com/affectnet/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        root = config.data_dir or os.fspath(dl_manager.manual_dir)
        plan = detect_layout(root, config.layout, config.image_root)
        report = {
            "layout": plan.layout,
            "data_dir": plan.root,
            "num_classes": config.num_classes,
            "face_margin": config.face_margin,
            "has_valence_arousal": plan.has_valence_arousal,
            "notes": list(plan.notes),
            "splits": {},
        }
        self.info.metadata["report"] = report
        unreferenced = official_unreferenced(plan) if plan.layout == "official" else []
        return {
            spec.pool: self._generate_examples(
                spec, plan, unreferenced if spec.pool == "train" else [], report
            )
            for spec in plan.splits
        }

    def _generate_examples(
        self, spec: SplitSpec, plan: LayoutPlan, unreferenced: list[str], report: dict
    ):
        config = self.builder_config
        tally = Tally()
        for rel in unreferenced:
            tally.drop("dropped_missing_annotation", f"{OFFICIAL_IMAGES_DIR}/{rel}", "in no list")
        candidates = _label_checked(
            read_split(spec, plan), config.num_classes, plan.has_valence_arousal, tally
        )

        def load(candidate: Candidate):
            try:
                return faces.load_face(candidate, config.face_margin)
            except faces.DropError as e:
                return e

        with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
            for start in range(0, len(candidates), _CHUNK):
                chunk = candidates[start : start + _CHUNK]
                for candidate, result in zip(chunk, pool.map(load, chunk), strict=True):
                    if isinstance(result, faces.DropError):
                        tally.drop(result.reason, candidate.name, result.detail)
                        continue
                    tally.counts["kept"] += 1
                    yield candidate.key, result

        report["splits"][spec.pool] = {
            "source": spec.name,
            "counts": tally.counts,
            "examples": tally.examples,
        }
        if tally.counts["kept"] == 0:
            # Stops preparation: nothing is cached, and the user sees why everything went.
            raise DataError(
                f"no usable example in {spec.name} ({plan.layout} layout at {plan.root}): "
                f"{format_counts(tally.counts)}; first offenders: "
                f"{ {r: e[:3] for r, e in tally.examples.items() if e} }"
            )


def _label_checked(
    items: Iterable[Candidate | Drop], num_classes: int, has_valence_arousal: bool, tally: Tally
) -> list[Candidate]:
    """The candidates whose expression and valence/arousal are kept; ``tally`` counts the rest
    (and the readers' drops)."""
    candidates = []
    for item in items:
        if isinstance(item, Drop):
            tally.drop(item.reason, item.name, item.detail)
            continue
        reason = label_drop_reason(item.expression, num_classes)
        if reason:
            tally.drop(reason, item.name, f"expression {item.expression}")
            continue
        if has_valence_arousal and not (
            valence_arousal_ok(item.valence) and valence_arousal_ok(item.arousal)
        ):
            tally.drop(
                "dropped_bad_valence_arousal",
                item.name,
                f"valence {item.valence}, arousal {item.arousal}",
            )
            continue
        candidates.append(item)
    return candidates
