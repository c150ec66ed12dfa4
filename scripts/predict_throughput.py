r"""Throughput of ``python -m affect_jax.predict`` on photos and a video, with face detection.

  python scripts/predict_throughput.py --output_dir=/tmp/predict_throughput

For each backbone (random weights, default width, 224 px; no training): a folder of
``--photos`` 640x480 photos (scikit-image's pictures with one or two astronaut heads pasted in)
and a 640x480 video of ``--frames`` frames with a moving head are scored with the default face
handling (MTCNN, --face=auto, --faces=all). Prints images/s and frames/s (with 1 and 2 worker
threads, a larger smallest face, the LBP cascade, sparser video detection) and where the time
goes: seconds spent decoding, detecting, preparing crops and in the model, summed over threads
(their sum is what one thread doing everything in turn would take). The figures go into the
README's prediction section.
"""

from __future__ import annotations

import os
import runpy
import time

import cv2
import jax
import numpy as np
from absl import app, flags
from export_check import CONFIGS, write_random_run

FLAGS = flags.FLAGS
SIZE = (640, 480)  # width, height


def _head() -> np.ndarray:
    from skimage import data

    return data.astronaut()[20:210, 130:310]


def make_photos(folder: str, count: int) -> list[str]:
    """``count`` 640x480 JPEG photos: a scikit-image picture as the scene and one or two heads
    of 90 to 200 pixels pasted at random places."""
    from skimage import data

    scenes = [data.coffee(), data.chelsea(), data.rocket(), data.astronaut()]
    rng = np.random.default_rng(0)
    head = _head()
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        photo = cv2.resize(scenes[i % len(scenes)], SIZE, interpolation=cv2.INTER_AREA)
        for _ in range(1 + i % 2):
            side = int(rng.integers(90, 200))
            pasted = cv2.resize(head, (side, int(side * head.shape[0] / head.shape[1])))
            y = int(rng.integers(0, SIZE[1] - pasted.shape[0]))
            x = int(rng.integers(0, SIZE[0] - pasted.shape[1]))
            photo[y : y + pasted.shape[0], x : x + pasted.shape[1]] = pasted
        paths.append(os.path.join(folder, f"photo_{i:03d}.jpg"))
        cv2.imwrite(paths[-1], cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    return paths


def make_video(path: str, frames: int) -> str:
    """A 640x480 MJPG video of a head moving across a still scene."""
    from skimage import data

    scene = cv2.resize(data.coffee(), SIZE, interpolation=cv2.INTER_AREA)
    head = cv2.resize(_head(), (150, 158))
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25, SIZE)
    for i in range(frames):
        frame = scene.copy()
        x = 40 + (i * 4) % (SIZE[0] - 240)
        frame[100:258, x : x + 150] = head
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def timed(predictor, inputs: list[str], **options) -> tuple[float, int, dict[str, float]]:
    """(seconds, rows, time per stage) of one predict_files call."""
    start = time.perf_counter()
    rows = predictor.predict_files(inputs, **options)
    return time.perf_counter() - start, len(rows), dict(predictor.timings)


def measure(name: str, root: str, photos: list[str], video: str, frames: int) -> None:
    from affect_jax.predict import Predictor

    config = runpy.run_path(os.path.join(CONFIGS, f"{name}.py"))["get_config"]()
    config.model.init = "random"
    config.data.source = "synthetic"
    config.compilation_cache_dir = ""
    workdir = os.path.join(root, name, "run")
    if not os.path.isdir(workdir):
        write_random_run(config, workdir)
    cases = [  # (what, Predictor options, inputs, how many, predict_files options)
        ("photos", {"workers": 1}, photos, {}),
        ("photos", {"workers": 2}, photos, {}),
        ("photos, --detect_size=320", {"workers": 1, "detect_size": 320}, photos, {}),
        ("photos, --detector=lbp", {"workers": 1, "detector": "lbp"}, photos, {}),
        ("video", {"workers": 1}, [video], {}),
        ("video, --detect_every=5", {"workers": 1}, [video], {"detect_every": 5}),
    ]
    for what, settings, inputs, options in cases:
        predictor = Predictor(workdir, batch_size=FLAGS.batch_size, **settings)
        predictor.predict_files(photos[:4])  # compiles the step, builds the detectors
        seconds, rows, stages = timed(predictor, inputs, **options)
        count = len(photos) if inputs is photos else frames
        spent = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
        print(
            f"| {name} | {what} | {settings['workers']} | {count / seconds:.1f} | "
            f"{seconds:.1f} s | {rows} | {spent} |",
            flush=True,
        )


def main(argv):
    del argv
    print(f"jax {jax.__version__}, cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    photos = make_photos(os.path.join(FLAGS.output_dir, "photos"), FLAGS.photos)
    video = make_video(os.path.join(FLAGS.output_dir, "video.avi"), FLAGS.frames)
    print("| backbone | input | workers | images or frames/s | wall | rows | time per stage |")
    for name in FLAGS.backbones:
        measure(name, FLAGS.output_dir, photos, video, FLAGS.frames)


if __name__ == "__main__":
    flags.DEFINE_string("output_dir", "/tmp/affect_jax_predict_throughput", "Runs and inputs.")
    flags.DEFINE_list("backbones", ["resnet50", "vgg16"], "Backbones to time.")
    flags.DEFINE_integer("photos", 64, "Photos in the folder.")
    flags.DEFINE_integer("frames", 100, "Frames of the video.")
    flags.DEFINE_integer("batch_size", 32, "Images per step.")
    app.run(main)
