"""The user's face datasets read from the layout they already hold, prepared once into TFDS's
cache: AffectNet (``official``, ``npy``), FER2013 (``fer2013``), FER+ (``ferplus``), RAF-DB
(``rafdb``) and the generic ``manifest`` CSV and class ``folders`` (see ``layouts``).

AffectNet cannot be downloaded automatically, nor can the others be redistributed;
``config.data.dir`` points at the user's copy. Every example is checked before it is stored: the
annotation (parseable; an image without annotation or an annotation without image), the label
(non-emotion codes, FER+ faces without a majority vote, Contempt under the 7-class protocol,
unknown codes), valence/arousal (-2 = missing, outside [-1, 1]), then the image (present,
decodable by ``tf.io.decode_image`` exactly as the input pipeline decodes it; a face box outside
the image counts as a malformed row). Each dropped example is counted once, under the first
check it fails; the counts and the first offending files per reason are stored with the
prepared copy and logged by every run. Class names are mapped by name onto the project's class
order (``affect_jax.data.source.AFFECTNET_CLASS_NAMES``).

The package keeps AffectNet's name: AffectNet's class order, TFDS builder and cache are the ones
every dataset is mapped onto.

Modules, in the order the data flows:

* ``plans``: ``LayoutPlan``/``SplitSpec`` and the listings and fingerprints of the user's files.
* ``layouts``: which layout a directory holds (``detect_layout`` -> ``LayoutPlan``); AffectNet's
  and the generic layouts' detectors.
* ``fer2013``, ``ferplus``, ``rafdb``: detector and reader of each of those datasets.
* ``rows``: what readers yield (``Candidate``/``Drop``) and the CSV parsing they share.
* ``readers``: AffectNet's and the generic layouts' readers; ``read_split`` picks any layout's.
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
