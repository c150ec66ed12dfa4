"""The ``synthetic`` source: procedurally drawn cartoon faces with expression and valence/arousal.

Needs no download. Each face shows its expression class through mouth shape, brows and eyes
(AffectNet's classes), and its continuous valence/arousal through within-class variation of the
same features: valence bends the mouth, arousal opens the eyes and raises the brows. Nuisance
variation (pose, scale, rotation, colours, lighting, noise) keeps the task from being trivial.

Faces are drawn with OpenCV's anti-aliased polygons on a canvas of at least 128 px, then
downsampled, so sub-pixel changes of the features survive as smooth intensity changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow as tf

from affect_jax.data.source import AFFECTNET_CLASS_NAMES, ExamplePool, Source

# Circumplex centres (valence, arousal) per AffectNet class, indexed like AFFECTNET_CLASS_NAMES.
CLASS_VA_CENTRES = np.array(
    [
        [0.0, 0.0],  # Neutral
        [0.7, 0.3],  # Happy
        [-0.6, -0.3],  # Sad
        [0.2, 0.7],  # Surprise
        [-0.5, 0.7],  # Fear
        [-0.6, 0.3],  # Disgust
        [-0.5, 0.6],  # Anger
        [-0.4, 0.2],  # Contempt
    ],
    np.float32,
)
VA_JITTER = 0.25  # Half-width of the uniform per-example valence/arousal jitter.
MIN_IMAGE_SIZE = 16

# Class-typical geometry in face units (face half-width = 1, y points down). Columns:
# eye half-height, brow raise, brow inner-end raise (tilt), brow arch, mouth half-width,
# mouth opening, mouth curvature (corners up > 0), smirk (right corner up), upper-lip snarl,
# teeth shown, nose wrinkles, frown lines between the brows, lip thickness factor.
_FEATURES = np.array(
    [
        # eye   brow   tilt   arch  width  open  curve  smirk snarl teeth nose frown lip
        [0.10, 0.00, 0.00, 0.03, 0.34, 0.00, 0.00, 0.00, 0.00, 0, 0, 0, 1.0],  # Neutral
        [0.07, 0.02, 0.00, 0.05, 0.46, 0.08, 0.12, 0.00, 0.00, 1, 0, 0, 1.0],  # Happy
        [0.08, 0.03, 0.13, 0.00, 0.32, 0.00, -0.13, 0.00, 0.00, 0, 0, 0, 1.0],  # Sad
        [0.17, 0.15, 0.00, 0.08, 0.17, 0.20, 0.00, 0.00, 0.00, 0, 0, 0, 1.0],  # Surprise
        [0.16, 0.09, 0.12, 0.00, 0.40, 0.06, -0.05, 0.00, 0.00, 1, 0, 0, 1.0],  # Fear
        [0.06, -0.06, -0.06, 0.02, 0.34, 0.00, -0.07, 0.00, 0.12, 1, 1, 0, 1.0],  # Disgust
        [0.05, -0.08, -0.15, 0.00, 0.27, 0.00, -0.03, 0.00, 0.00, 0, 0, 1, 1.6],  # Anger
        [0.09, 0.00, 0.00, 0.03, 0.34, 0.00, 0.00, 0.13, 0.00, 0, 0, 0, 1.0],  # Contempt
    ],
    np.float32,
)
# Within-class gains: feature change per unit of (value - class centre). Large enough that the
# +-0.25 jitter moves features by about a pixel at 64 px, so the variation is learnable.
_VALENCE_CURVE_GAIN = 0.32
_AROUSAL_EYE_GAIN = 0.2
_AROUSAL_BROW_GAIN = 0.3

_SKIN_LIGHT = np.array([240.0, 205.0, 180.0])
_SKIN_DARK = np.array([105.0, 70.0, 50.0])
_HAIR_COLOURS = np.array(
    [[25, 20, 18], [70, 45, 25], [120, 80, 40], [200, 165, 100], [140, 140, 140]], np.float32
)
_SHIFT = 4  # Sub-pixel bits for cv2 drawing.


@dataclasses.dataclass(frozen=True)
class FaceParams:
    """Everything that determines one drawn face (the image is a pure function of these)."""

    expression: int
    valence: float
    arousal: float
    centre: tuple[float, float]  # Face centre (x, y) as a fraction of the image side.
    scale: float  # Face half-width as a fraction of the image side.
    angle: float  # In-plane rotation in degrees.
    gaze: tuple[float, float]  # Iris offset in face units.
    skin: tuple[float, float, float]  # RGB.
    hair: tuple[float, float, float]
    background: tuple[float, float, float]
    light_angle: float  # Direction of the lighting gradient (radians).
    light_strength: float  # Relative brightness change from the image centre to its edge.
    noise_std: float  # Gaussian pixel noise (0-255 scale).
    noise_seed: int


def _validate(num_examples: int, image_size: int, num_classes: int) -> None:
    if num_classes not in (7, 8):
        raise ValueError(f"num_classes must be 7 or 8 (AffectNet protocols), got {num_classes}")
    if int(image_size) != image_size or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size}")
    if int(num_examples) != num_examples or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples}")


def sample_params(num_examples: int, num_classes: int, seed: int) -> list[FaceParams]:
    """Draws balanced, shuffled expression labels, valence/arousal and nuisance parameters."""
    _validate(num_examples, MIN_IMAGE_SIZE, num_classes)
    rng = np.random.default_rng(seed)
    n = int(num_examples)
    # Balanced: cycle through the classes, then shuffle.
    expression = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    va = CLASS_VA_CENTRES[expression] + rng.uniform(-VA_JITTER, VA_JITTER, (n, 2))
    va = np.clip(va, -1.0, 1.0).astype(np.float32)
    centre = 0.5 + rng.uniform(-0.06, 0.06, (n, 2))
    scale = rng.uniform(0.27, 0.33, n)
    angle = rng.uniform(-8.0, 8.0, n)
    gaze = rng.uniform(-0.04, 0.04, (n, 2))
    tone = rng.uniform(0.0, 1.0, (n, 1))
    skin = tone * _SKIN_LIGHT + (1 - tone) * _SKIN_DARK + rng.normal(0, 8, (n, 3))
    hair = _HAIR_COLOURS[rng.integers(0, len(_HAIR_COLOURS), n)] + rng.normal(0, 6, (n, 3))
    background = rng.uniform(30, 230, (n, 3))
    light_angle = rng.uniform(0, 2 * np.pi, n)
    light_strength = rng.uniform(0.0, 0.3, n)
    noise_std = rng.uniform(2.0, 8.0, n)
    noise_seed = rng.integers(0, 2**31 - 1, n)
    return [
        FaceParams(
            expression=int(expression[i]),
            valence=float(va[i, 0]),
            arousal=float(va[i, 1]),
            centre=(float(centre[i, 0]), float(centre[i, 1])),
            scale=float(scale[i]),
            angle=float(angle[i]),
            gaze=(float(gaze[i, 0]), float(gaze[i, 1])),
            skin=tuple(float(c) for c in np.clip(skin[i], 0, 255)),
            hair=tuple(float(c) for c in np.clip(hair[i], 0, 255)),
            background=tuple(float(c) for c in background[i]),
            light_angle=float(light_angle[i]),
            light_strength=float(light_strength[i]),
            noise_std=float(noise_std[i]),
            noise_seed=int(noise_seed[i]),
        )
        for i in range(n)
    ]


@functools.cache
def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _ellipse(cx: float, cy: float, ax: float, ay: float, n: int = 36) -> np.ndarray:
    return _unit_circle(n) * (ax, ay) + (cx, cy)


class _Canvas:
    """Draws face-unit polygons on a supersampled canvas through the face's similarity transform."""

    def __init__(self, p: FaceParams, side: int):
        self.img = np.empty((side, side, 3), np.uint8)
        # cv2 fills ~10x faster than NumPy's broadcast of a 3-byte pattern.
        cv2.rectangle(self.img, (0, 0), (side, side), p.background, -1)
        self.radius = p.scale * side  # Face half-width in canvas pixels.
        a = np.deg2rad(p.angle)
        self.rot = self.radius * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        self.offset = np.array(p.centre) * side

    def _pts(self, pts: np.ndarray) -> np.ndarray:
        xy = pts @ self.rot.T + self.offset
        return np.round(xy * (1 << _SHIFT)).astype(np.int32)

    def fill(self, pts: np.ndarray, colour: Sequence[float]) -> None:
        cv2.fillPoly(self.img, [self._pts(pts)], tuple(colour), cv2.LINE_AA, _SHIFT)

    def line(self, pts: np.ndarray, colour: Sequence[float], width: float, closed=False) -> None:
        # Line widths are in face units; cv2 wants whole pixels.
        th = max(1, int(round(width * self.radius)))
        cv2.polylines(self.img, [self._pts(pts)], closed, tuple(colour), th, cv2.LINE_AA, _SHIFT)


def _shade(colour: Sequence[float], factor: float) -> tuple[float, ...]:
    return tuple(min(255.0, max(0.0, c * factor)) for c in colour)


def draw_face(p: FaceParams, image_size: int) -> np.ndarray:
    """Draws one face as a uint8 [image_size, image_size, 3] RGB image."""
    # Supersample to a canvas of >= 128 px: enough for smooth sub-pixel edges at small sizes,
    # while cv2's anti-aliasing alone suffices for large ones.
    ss = -(-128 // image_size)
    cv = _Canvas(p, image_size * ss)
    f = _FEATURES[p.expression]
    eye_h, brow, tilt, arch, mw, mopen, curve, smirk, snarl, teeth, nose_wr, frown, lip = f
    dv = p.valence - CLASS_VA_CENTRES[p.expression, 0]
    da = p.arousal - CLASS_VA_CENTRES[p.expression, 1]
    # Within-class variation: valence bends the mouth, arousal opens the eyes and lifts the brows.
    curve = curve + _VALENCE_CURVE_GAIN * dv
    eye_h = float(np.clip(eye_h + _AROUSAL_EYE_GAIN * da, 0.015, 0.25))
    brow = brow + _AROUSAL_BROW_GAIN * da

    skin, hair = p.skin, p.hair
    dark = (35.0, 25.0, 25.0)
    # Hair behind the head, ears, head, fringe.
    cv.fill(_ellipse(0.0, -0.12, 1.1, 1.32), hair)
    for s in (-1, 1):
        cv.fill(_ellipse(s * 0.98, 0.0, 0.14, 0.24, 20), _shade(skin, 0.9))
    cv.fill(_ellipse(0.0, 0.0, 1.0, 1.25, 48), skin)
    t = np.linspace(np.pi, 2 * np.pi, 24)
    fringe = np.stack([0.93 * np.cos(t), -0.78 + 0.5 * np.sin(t)], axis=1)
    cv.fill(fringe, hair)

    # Eyes: sclera, iris, pupil (squashed with the opening so the lids seem to cover them), lid.
    for s in (-1, 1):
        ex, ey = s * 0.38, -0.16
        cv.fill(_ellipse(ex, ey, 0.19, eye_h, 28), (245, 245, 240))
        ix, iy = ex + p.gaze[0], ey + p.gaze[1] * min(1.0, eye_h / 0.1)
        cv.fill(_ellipse(ix, iy, 0.095, min(0.095, 0.92 * eye_h), 20), (70, 50, 35))
        cv.fill(_ellipse(ix, iy, 0.045, min(0.045, 0.8 * eye_h), 16), (10, 10, 10))
        cv.line(_ellipse(ex, ey, 0.19, eye_h, 28), dark, 0.035, closed=True)

    # Brows: inner end, middle, outer end; tilt > 0 raises the inner ends (sadness, fear).
    yb = -0.47 - brow
    for s in (-1, 1):
        pts = np.array([[s * 0.13, yb - tilt], [s * 0.36, yb - arch - 0.5 * tilt], [s * 0.6, yb]])
        cv.line(pts, _shade(hair, 0.8), 0.085)
    if frown:  # Vertical lines between lowered brows.
        for s in (-1, 1):
            cv.line(
                np.array([[s * 0.05, yb - tilt + 0.02], [s * 0.06, yb - tilt + 0.16]]),
                _shade(skin, 0.7),
                0.03,
            )

    # Nose: bridge line and nostrils.
    cv.line(np.array([[0.02, -0.02], [0.07, 0.24], [0.0, 0.28]]), _shade(skin, 0.75), 0.035)
    for s in (-1, 1):
        cv.fill(_ellipse(s * 0.07, 0.29, 0.04, 0.022, 12), _shade(skin, 0.55))
    if nose_wr:  # Wrinkles across the bridge.
        for y in (0.02, 0.08, 0.14):
            cv.line(np.array([[-0.1, y], [0.0, y - 0.02], [0.1, y]]), _shade(skin, 0.7), 0.025)

    # Mouth: a centre line bent by curvature/smirk, opened symmetrically by the opening profile.
    u = np.linspace(-1.0, 1.0, 25)
    x = mw * u
    # Smirk: the right corner pulled up, the left one slightly down.
    right, left = np.clip(u, 0, None), np.clip(-u, 0, None)
    centre = 0.58 - curve * u**2 - smirk * (right**2 - 0.3 * left**2)
    profile = mopen * np.sqrt(1 - u**2)
    upper = centre - profile - snarl * np.exp(-(((u - 0.3) / 0.3) ** 2))
    lower = centre + profile
    lip_colour = _shade((175, 85, 85), 0.6 + 0.4 * np.mean(skin) / 255)
    if np.max(lower - upper) > 0.01:
        outline = np.concatenate([np.stack([x, upper], 1), np.stack([x, lower], 1)[::-1]])
        cv.fill(outline, (60, 20, 25))
        if teeth:
            band = upper + 0.45 * (lower - upper)
            cv.fill(
                np.concatenate([np.stack([x, upper], 1), np.stack([x, band], 1)[::-1]]),
                (240, 240, 230),
            )
        cv.line(outline, lip_colour, 0.04 * lip, closed=True)
    else:
        cv.line(np.stack([x, centre], 1), lip_colour, 0.05 * lip)
    if smirk:  # Dimple at the raised corner.
        cx, cy = mw + 0.04, 0.58 - curve - smirk
        dimple = np.array([[cx, cy - 0.07], [cx + 0.04, cy], [cx, cy + 0.07]])
        cv.line(dimple, _shade(skin, 0.7), 0.03)

    img = cv2.resize(cv.img, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return _light_and_noise(img, p)


@functools.cache
def _ramp_axis(size: int) -> np.ndarray:
    return np.linspace(-1.0, 1.0, size, dtype=np.float32)


def _light_and_noise(img: np.ndarray, p: FaceParams) -> np.ndarray:
    g = _ramp_axis(img.shape[0])
    ramp = np.cos(p.light_angle) * g[None, :] + np.sin(p.light_angle) * g[:, None]
    # Luminance noise (shared by the channels): a third of the cost of per-channel noise.
    noise = np.random.default_rng(p.noise_seed).standard_normal(ramp.shape, np.float32)
    out = img * (1.0 + p.light_strength * ramp)[..., None] + (p.noise_std * noise)[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_faces(
    num_examples: int, image_size: int, num_classes: int, seed: int
) -> dict[str, np.ndarray]:
    """Draws ``num_examples`` faces; same seed gives bit-identical arrays.

    Returns ``image`` uint8 [N, S, S, 3], ``expression`` int32 [N] (balanced across
    ``num_classes``, shuffled), ``valence`` and ``arousal`` float32 [N] in [-1, 1].
    """
    _validate(num_examples, image_size, num_classes)
    params = sample_params(num_examples, num_classes, seed)
    image = np.empty((len(params), image_size, image_size, 3), np.uint8)
    for i, p in enumerate(params):
        image[i] = draw_face(p, image_size)
    return {
        "image": image,
        "expression": np.array([p.expression for p in params], np.int32),
        "valence": np.array([p.valence for p in params], np.float32),
        "arousal": np.array([p.arousal for p in params], np.float32),
    }


def _derived_seed(seed: int, purpose: int) -> int:
    """A seed for another purpose (e.g. the test pool) that does not collide with ``seed``'s."""
    return int(np.random.SeedSequence([int(seed), purpose]).generate_state(1)[0])


_TEST_POOL = 1


def class_subset(labels: np.ndarray, fractions: Sequence[float], num_classes: int) -> np.ndarray:
    """Sorted indices keeping the first ``fractions[c]`` of class ``c``'s examples (an imbalanced
    version of the balanced drawing; the drawn faces themselves are unchanged)."""
    if len(fractions) != num_classes or not all(0 < f <= 1 for f in fractions):
        raise ValueError(
            f"config.data.synthetic_class_fractions={tuple(fractions)}; expected "
            f"{num_classes} fractions in (0, 1], one per class"
        )
    kept = [
        np.flatnonzero(labels == c)[: max(2, round(f * np.sum(labels == c)))]
        for c, f in enumerate(fractions)
    ]
    return np.sort(np.concatenate(kept))


class LazyFaces:
    """A pool's faces, each drawn the first time the input pipeline reads it, then kept.

    The pool's ``decode`` (``__call__``): its ``face`` column indexes ``params``. Drawing only
    what the batches read keeps a run's start from waiting for every face; a face is the same
    whenever (and in whichever thread) it is drawn, so the data are those of ``draw_faces``.
    """

    def __init__(self, params: Sequence[FaceParams], image_size: int):
        self.params = list(params)
        self.image_size = int(image_size)
        # Pages are only touched by the faces drawn.
        self._images = np.empty((len(self.params), self.image_size, self.image_size, 3), np.uint8)
        self._drawn = np.zeros(len(self.params), bool)

    def image(self, face: int) -> np.ndarray:
        """Face ``face``'s uint8 [S, S, 3] image (drawn now if it was not yet)."""
        face = int(face)
        if not self._drawn[face]:
            # Two threads may draw the same face: they write the same bytes.
            self._images[face] = draw_face(self.params[face], self.image_size)
            self._drawn[face] = True
        return self._images[face]

    def images(self, faces: Sequence[int]) -> np.ndarray:
        """The images [N, S, S, 3] of faces ``faces``."""
        out = np.empty((len(faces), self.image_size, self.image_size, 3), np.uint8)
        for i, face in enumerate(faces):
            out[i] = self.image(face)
        return out

    @property
    def num_drawn(self) -> int:
        return int(self._drawn.sum())

    def __call__(self, row: Any) -> tf.Tensor:
        image = tf.numpy_function(self.image, [row["face"]], tf.uint8, stateful=False)
        return tf.ensure_shape(image, (self.image_size, self.image_size, 3))


def pool_images(pool: ExamplePool) -> np.ndarray:
    """Every image [N, S, S, 3] of a synthetic pool, in the pool's order."""
    return pool.decode.images(pool.columns["face"])


def lazy_pool(num_examples: int, image_size: int, num_classes: int, seed: int) -> ExamplePool:
    """``draw_faces``'s examples as a pool whose faces are drawn when first read."""
    _validate(num_examples, image_size, num_classes)
    params = sample_params(num_examples, num_classes, seed)
    columns = {
        "face": np.arange(len(params), dtype=np.int32),
        "expression": np.array([p.expression for p in params], np.int32),
        "valence": np.array([p.valence for p in params], np.float32),
        "arousal": np.array([p.arousal for p in params], np.float32),
    }
    return ExamplePool(columns=columns, decode=LazyFaces(params, image_size))


def load_source(config: Any, workdir: str | None = None) -> Source:
    """The ``synthetic`` source: a 'train' pool of ``data.synthetic_size`` faces and a held-out
    'test' pool of a fifth as many, drawn from ``data.split_seed`` (independent of ``seed``).

    The faces are drawn as the input pipeline first reads them (``LazyFaces``);
    ``pool_images`` gives a pool's images."""
    del workdir  # Nothing to cache: drawing is deterministic.
    data = config.data
    num, size, num_classes = int(data.synthetic_size), int(data.image_size), int(data.num_classes)
    seed = int(data.split_seed)
    train = lazy_pool(num, size, num_classes, seed)
    fractions = tuple(data.get("synthetic_class_fractions", ()))
    if fractions:  # An imbalanced training pool (docs/imbalance.md); the test pool stays whole.
        kept = class_subset(train.labels, fractions, num_classes)
        train = ExamplePool({k: v[kept] for k, v in train.columns.items()}, train.decode)
    pools = {"train": train}
    if num // 5 >= 1:
        test_seed = _derived_seed(seed, _TEST_POOL)
        pools["test"] = lazy_pool(num // 5, size, num_classes, test_seed)
    return Source(
        name="synthetic",
        class_names=tuple(AFFECTNET_CLASS_NAMES[:num_classes]),
        pools=pools,
        has_valence_arousal=True,
        counts={"kept": len(pools["train"])},
    )
