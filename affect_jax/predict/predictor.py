"""The ``Predictor``: a trained run scoring face crops, images, folders and videos.

The run's ``config.json`` fixes the architecture, classes, input size and preprocessing; every
face crop goes through the evaluation pipeline's resize and preprocessing (in NumPy:
``network_input.py``) and the batches through ``steps.make_predict_step`` (the forward pass of
validation's ``steps.make_eval_step``), so a crop is scored as validation scores it. Files and
videos are streamed through it by ``stream.py``, into the rows of ``rows.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any

import jax
import numpy as np
from absl import logging

from affect_jax import distributed, run_dir, sharding, steps
from affect_jax.data import preprocessing_mode
from affect_jax.predict import detectors, stream
from affect_jax.predict.faces import BoxTable, Face, FaceOptions, read_boxes
from affect_jax.predict.network_input import network_input
from affect_jax.predict.rows import RowLayout
from affect_jax.predict.samples import image_samples
from affect_jax.predict.timing import StageTimes

# XLA options of the weights' preparation, which runs once per loaded model: a lower backend
# optimisation level than the default compiles faster and gives the same folded weights bit
# for bit (tests/test_inference.py); level 0 does not.
_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}

# Detection and the model share the CPU: on 2 cores one worker already keeps it busy.
DEFAULT_WORKERS = min(4, max(1, (os.cpu_count() or 2) // 2))


def compile_prepare(prepare: Callable[[steps.State], steps.State], variables: Any) -> Any:
    """``jax.jit(prepare)`` compiled for ``variables`` (arrays or ``jax.ShapeDtypeStruct``s) by
    a program that compiles faster and gives the same prepared weights bit for bit (it runs
    once per loaded model)."""
    return jax.jit(prepare).lower(variables).compile(compiler_options=_ONCE_COMPILER_OPTIONS)


def compile_inference(
    prepare: Callable[[steps.State], steps.State],
    on_prepared: Any,
    variables: steps.State,
    images: jax.ShapeDtypeStruct,
) -> tuple[Any, Any]:
    """(prepare, predict) executables for the shapes of the variables (``jax.ShapeDtypeStruct``
    leaves) and of a batch of images: compiled while the checkpoint is read. ``on_prepared``
    is the jitted step."""
    prepare = compile_prepare(prepare, variables)
    prepared = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), prepare.out_info
    )
    return prepare, on_prepared.lower(prepared, images).compile()


def checked_crop(image: np.ndarray) -> np.ndarray:
    """The face crop as an array; ValueError unless it is a non-empty uint8 RGB [H, W, 3]."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image {image.shape}")
    return image


class Predictor:
    """A trained run, ready to score face images.

    Args:
      workdir: the run directory (``config.json`` and ``checkpoints/``).
      which: 'best' (by the run's ``best_metric``) or 'latest' checkpoint.
      batch_size: images per jitted step (the last batch is padded).
      step: a specific checkpoint (epoch) instead of ``which``.
      flip_tta: average over a horizontally flipped copy (as ``main --mode=eval --flip_tta``).
      detector: 'mtcnn' or 'lbp' (``detectors.DETECTORS``), built on first use.
      min_face_confidence: MTCNN faces below this confidence are dropped.
      detect_size: images are searched for faces downscaled to at most this many pixels a
        side (smaller is faster and misses more small faces).
      workers: threads that read files, detect faces and prepare crops ahead of the model.
    """

    def __init__(
        self,
        workdir: str,
        which: str = "best",
        batch_size: int = 32,
        *,
        step: int | None = None,
        flip_tta: bool = False,
        detector: str = "mtcnn",
        min_face_confidence: float = detectors.DEFAULT_MIN_CONFIDENCE,
        detect_size: int = detectors.DETECT_MAX_SIDE,
        workers: int = DEFAULT_WORKERS,
    ):
        self.detectors = detectors.ThreadDetectors(detector, min_face_confidence, detect_size)
        if workers < 1:
            raise ValueError(f"workers={workers}; expected at least 1")
        self.workdir = workdir
        self.config = run_dir.load_config(workdir)
        self.class_names = run_dir.class_names(workdir, self.config)
        self.image_size = int(self.config.data.image_size)
        self.face_margin = float(self.config.data.get("face_margin", 0.0))
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self._mesh = sharding.make_mesh()
        devices = self._mesh.devices.size
        if self.batch_size < 1 or self.batch_size % devices:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of the {devices} devices"
            )
        graphdef, shapes = steps.abstract_variables(self.config)
        predict_step = steps.make_predict_step(graphdef, flip_tta=flip_tta)
        self._predict_step = jax.jit(predict_step.on_prepared)
        # Both programs are compiled from shapes while the checkpoint is read: the weights'
        # preparation, and the step for the batch run_batch feeds (another batch_size compiles
        # on first use).
        images = sharding.batch_shapes(
            {"image": ((self.image_size, self.image_size, 3), np.dtype(np.float32))},
            self.batch_size,
            self._mesh,
        )["image"]
        variables_like = sharding.replicated_shapes(shapes, self._mesh)
        pool = futures.ThreadPoolExecutor(1, thread_name_prefix="compile_inference")
        try:
            compiling = pool.submit(
                compile_inference,
                predict_step.prepare,
                self._predict_step,
                variables_like,
                images,
            )
            self.step, _, variables = run_dir.restore_checkpoint(
                workdir,
                self.config,
                self._mesh,
                which,
                step,
                variables_only=True,
                abstract=(graphdef, shapes),
            )
            prepare, compiled = compiling.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        # The weights are fixed from here on: prepared for inference once (BatchNorm folded).
        self._variables = prepare(variables)
        del variables
        self._compiled = (self.batch_size, compiled)
        self.preprocessing = preprocessing_mode(self.config)
        self.timings = StageTimes()
        self.layout = RowLayout(self.class_names)
        self.columns, self.prob_columns = self.layout.columns, self.layout.prob_columns
        logging.info(
            "Loaded %s (%s, %d classes, %d px, %s preprocessing), checkpoint %d",
            workdir,
            self.config.model.name,
            len(self.class_names),
            self.image_size,
            self.preprocessing,
            self.step,
        )

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Network input [S, S, 3] float32 of one uint8 RGB face crop (any size)."""
        return network_input(checked_crop(image), self.image_size, self.preprocessing)

    def run_batch(self, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probs [n, C], clipped valence/arousal [n, 2]) of up to batch_size prepared images."""
        n = len(inputs)
        images = np.zeros((self.batch_size, *inputs[0].shape), np.float32)  # padded
        images[:n] = np.stack(inputs)
        images = sharding.shard_batch({"image": images}, self._mesh)["image"]
        size, compiled = self._compiled
        step = compiled if self.batch_size == size else self._predict_step
        out = distributed.to_host(step(self._variables, images))
        return out["probs"][:n], np.clip(out["valence_arousal"][:n], -1.0, 1.0)

    def predict(self, images: Sequence[np.ndarray] | np.ndarray) -> dict[str, Any]:
        """Scores face crops (uint8 RGB [H, W, 3] each, any size; no face detection).

        Returns ``class_names``, ``probs`` [N, C], ``expression`` [N] (class names) and
        ``valence_arousal`` [N, 2] clipped to [-1, 1].
        """
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise ValueError(
                f"expected images [N, H, W, 3] or a list of [H, W, 3], got shape {images.shape}"
            )
        prepared = [self.prepare(image) for image in images]
        size = self.batch_size
        chunks = [self.run_batch(prepared[i : i + size]) for i in range(0, len(prepared), size)]
        probs = np.zeros((0, len(self.class_names)), np.float32)
        va = np.zeros((0, 2), np.float32)
        if chunks:
            probs, va = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
        return {
            "class_names": self.class_names,
            "probs": probs,
            "expression": np.array(self.class_names)[probs.argmax(-1)],
            "valence_arousal": va,
        }

    def load_detector(self):
        """This thread's face detector, built on first use (one per thread). Raises
        RuntimeError if its package is missing."""
        return self.detectors.get()

    def detect_faces(self, image: np.ndarray) -> list[Face]:
        """Every face the detector finds in a uint8 RGB image (boxes and, for MTCNN, confidence
        and landmarks in the image's pixels), in the detector's order."""
        detector = self.load_detector()
        with self.timings.timed("detect"):
            return detector.detect(image)

    def predict_image(
        self,
        image: np.ndarray,
        path: str = "",
        *,
        face: str = "auto",
        faces: str = "all",
        align: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows (see ``columns``) for every face of one uint8 RGB image held in memory;
        ``path`` only fills the rows' path."""
        if face == "box":
            raise ValueError("face='box' takes boxes from a file: use predict_files")
        options = FaceOptions(face, faces, align)
        options.check()
        samples = image_samples(self, np.asarray(image), path, None, options)
        return list(stream.scored(self, samples, smooth=None))

    def iter_predictions(
        self,
        paths: Iterable[str],
        face: str = "auto",
        boxes: str | BoxTable | None = None,
        every_n_frames: int = 1,
        log_every: int = 100,
        *,
        faces: str = "all",
        align: bool = False,
        detect_every: int = 1,
        smooth: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows (see ``columns``) for every image, sampled video frame and face, in input order.

        A file that cannot be used gives a row whose ``status`` says why (and a warning); no
        face (face='detect') gives status 'no_face'. Prediction fields of such rows are None.
        Video faces are linked into tracks (``track_id``); ``detect_every``, ``smooth``: see
        ``stream.StreamSettings``.
        """
        settings = stream.StreamSettings(every_n_frames, detect_every, smooth, log_every)
        settings.check()
        if isinstance(boxes, (str, os.PathLike)):
            boxes = read_boxes(os.fspath(boxes))
        options = FaceOptions(face, faces, align, boxes)
        options.check()
        yield from stream.predictions(self, paths, options, settings)

    def predict_files(
        self, paths: Iterable[str], *args: Any, **options: Any
    ) -> list[dict[str, Any]]:
        """``iter_predictions`` as a list (images, folders and videos; see the CLI)."""
        return list(self.iter_predictions(paths, *args, **options))
