"""AffectNet read from the layout the user already holds, prepared once into TFDS's cache.

AffectNet cannot be downloaded automatically; ``config.data.dir`` points at the user's copy in
one of four layouts (``official``, ``npy``, ``manifest``, ``folders``; see ``layouts``). Every
example is checked before it is stored: the annotation (parseable; an image without annotation
or an annotation without image), the label (non-emotion codes, Contempt under the 7-class
protocol, unknown codes), valence/arousal (-2 = missing, outside [-1, 1]), then the image
(present, decodable by ``tf.io.decode_image`` exactly as the input pipeline decodes it; a face
box outside the image counts as a malformed row). Each dropped example is counted once, under
the first check it fails; the counts and the first offending files per reason are stored with
the prepared copy and logged by every run.

Modules, in the order the data flows:

* ``layouts``: which layout a directory holds (``detect_layout`` -> ``LayoutPlan``).
* ``readers``: one reader per layout; annotation files -> ``Candidate``/``Drop``.
* ``labels``: expression codes, class aliases, which labels and valence/arousal are kept.
* ``faces``: the image check and face crop of one candidate -> the stored example.
* ``builder``: the TFDS builder that runs the above once and stores the kept examples.
* ``report``: drop reasons, counts per split, their formatting and logging.
* ``source``: ``prepare``/``load_source``, the adapter the input pipeline calls.
* ``errors``: ``DataError``, raised for files that cannot be used as given.
"""

from affect_jax.data.affectnet.builder import Affectnet, AffectNetConfig, make_builder_config
from affect_jax.data.affectnet.errors import DataError
from affect_jax.data.affectnet.layouts import LAYOUTS, LayoutPlan, SplitSpec, detect_layout
from affect_jax.data.affectnet.report import COUNT_KEYS, DROP_REASONS, format_counts
from affect_jax.data.affectnet.source import IN_MEMORY_MAX_BYTES, load_source, prepare

__all__ = [
    "COUNT_KEYS",
    "DROP_REASONS",
    "IN_MEMORY_MAX_BYTES",
    "LAYOUTS",
    "AffectNetConfig",
    "Affectnet",
    "DataError",
    "LayoutPlan",
    "SplitSpec",
    "detect_layout",
    "format_counts",
    "load_source",
    "make_builder_config",
    "prepare",
]
