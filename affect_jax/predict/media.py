"""Inputs of prediction: files and folders expanded to images and videos, video frames read."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import cv2
import numpy as np
from absl import logging

from affect_jax.data.images import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


def extension(path: str) -> str:
    """The file's extension, lower case, with its dot."""
    return os.path.splitext(path)[1].lower()


def media_kind(path: str) -> str | None:
    """'image' or 'video' by the file's extension; None for anything else."""
    ext = extension(path)
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def supported_text() -> str:
    """The accepted extensions, for messages."""
    return ", ".join(e[1:] for e in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)


def expand_inputs(paths: Iterable[str]) -> Iterator[tuple[str, str | None, str | None]]:
    """``(path, kind, error)`` for every input: kind 'image' or 'video', or an error message.

    Folders are searched recursively (sorted); files in them with other extensions are skipped
    and counted in a warning, while a named file with another extension is an error. A path
    named more than once (again, inside a named folder, or spelled another way) comes once, at
    its first place, and the repeats are counted in a warning: each path has one set of rows,
    which is what ``--resume`` counts on. Links are paths of their own.
    """
    seen: set[str] = set()
    repeats: list[str] = []
    for path, kind, error in _named_inputs(paths):
        if kind is not None:
            same_path = os.path.abspath(path)
            if same_path in seen:
                repeats.append(path)
                continue
            seen.add(same_path)
        yield path, kind, error
    if repeats:
        logging.warning(
            "%d input(s) named more than once, predicted once at their first place, e.g. %s",
            len(repeats),
            repeats[:3],
        )


def _named_inputs(paths: Iterable[str]) -> Iterator[tuple[str, str | None, str | None]]:
    """``expand_inputs`` before repeats are dropped."""
    for path in paths:
        if os.path.isdir(path):
            found, skipped = [], []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    file = os.path.join(root, name)
                    (found if media_kind(file) else skipped).append(file)
            if skipped:
                logging.warning(
                    "%s: skipped %d file(s) that are not images or videos (%s), e.g. %s",
                    path,
                    len(skipped),
                    supported_text(),
                    skipped[:3],
                )
            if not found:
                yield path, None, f"no images or videos ({supported_text()}) in this folder"
            for file in found:
                yield file, media_kind(file), None
        elif not os.path.exists(path):
            yield path, None, "no such file or folder"
        elif media_kind(path) is None:
            yield (
                path,
                None,
                (f"unsupported format {extension(path)!r} (expected {supported_text()})"),
            )
        else:
            yield path, media_kind(path), None


def read_video(path: str, every_n_frames: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """``(frame index, uint8 RGB frame)`` for every ``every_n_frames``-th frame from frame 0,
    turned as the file says to show it (a phone's portrait video: OpenCV's FFmpeg reader
    applies the rotation in its track header)."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError("cannot open video")
    try:
        index = 0
        while True:
            if index % every_n_frames:
                if not capture.grab():  # skipped frames are not decoded
                    break
            else:
                ok, frame = capture.read()
                if not ok:
                    break
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
        if index == 0:
            raise ValueError("no frame could be read")
    finally:
        capture.release()
