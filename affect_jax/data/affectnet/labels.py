"""AffectNet's expression codes: class names and aliases, and which labels and valence/arousal
values are kept."""

from __future__ import annotations

import math

# Expression codes of the official release: 0-7 emotions, then three non-emotion codes.
CONTEMPT = 7
NON_EMOTION = (8, 9, 10)  # None, Uncertain, No-Face.
CLASS_ALIASES = {
    "neutral": 0,
    "happy": 1,
    "happiness": 1,
    "sad": 2,
    "sadness": 2,
    "surprise": 3,
    "surprised": 3,
    "fear": 4,
    "fearful": 4,
    "disgust": 5,
    "disgusted": 5,
    "anger": 6,
    "angry": 6,
    "contempt": 7,
    "none": 8,
    "uncertain": 9,
    "no-face": 10,
    "no_face": 10,
    "noface": 10,
}


def class_from_name(name: str) -> int | None:
    """The expression code (0-10) of a class name or index, or None if unknown."""
    text = name.strip().lower()
    if text in CLASS_ALIASES:
        return CLASS_ALIASES[text]
    try:
        value = float(text)
    except ValueError:
        return None
    if value.is_integer() and 0 <= value <= max(NON_EMOTION):
        return int(value)
    return None


def label_drop_reason(code: int, num_classes: int) -> str | None:
    """Why an expression code is not kept under ``num_classes``, or None if it is."""
    if code in NON_EMOTION:
        return "dropped_non_emotion"
    if code == CONTEMPT and num_classes == 7:
        return "dropped_contempt"
    if not 0 <= code < num_classes:
        return "dropped_unknown_label"
    return None


def valence_arousal_ok(value: float) -> bool:
    """-2 (AffectNet's 'missing'), NaN and anything outside [-1, 1] are not usable."""
    return math.isfinite(value) and -1.0 <= value <= 1.0
