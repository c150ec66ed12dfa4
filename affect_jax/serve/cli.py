r"""The server's command line.

  python -m affect_jax.serve --workdir=runs/demo [--which=best] [--host=127.0.0.1] [--port=8000]

Loads the run once, compiles its step sizes, then serves until interrupted. The first line on
standard output, ``Serving on http://HOST:PORT/``, names the bound port (``--port=0`` picks a
free one).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import jax
import tensorflow as tf
import threadpoolctl
import uvicorn
from absl import app, flags, logging

from affect_jax import cli as command_line
from affect_jax import run_dir
from affect_jax.errors import UserError
from affect_jax.serve.app import Limits, create_app
from affect_jax.serve.scorer import (
    DEFAULT_MIN_CONFIDENCE,
    DETECT_MAX_SIDE,
    DETECTORS,
    FaceScorer,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined only when run, so importing the module defines none)."""
    flags.DEFINE_string(
        "workdir", None, "The run directory (config.json, checkpoints/).", required=True
    )
    flags.DEFINE_enum(
        "which", "best", list(run_dir.CHECKPOINT_CHOICES), "Checkpoint of --workdir to serve."
    )
    flags.DEFINE_string(
        "host",
        "127.0.0.1",
        "Address to bind; 0.0.0.0 serves other machines too (the API has no authentication).",
    )
    flags.DEFINE_integer(
        "port", 8000, "Port to bind (0: a free one).", lower_bound=0, upper_bound=65535
    )
    flags.DEFINE_integer("max_batch", 8, "Most faces in one model call.", lower_bound=1)
    flags.DEFINE_float(
        "max_wait_ms",
        10.0,
        "Longest a model call waits for requests that arrived meanwhile.",
        lower_bound=0.0,
    )
    flags.DEFINE_integer(
        "max_pending", 64, "Requests held at once; more are answered 503.", lower_bound=1
    )
    flags.DEFINE_float(
        "max_upload_mb",
        10.0,
        "Largest request body in MiB; larger ones are answered 413.",
        lower_bound=0.0,
    )
    flags.DEFINE_integer(
        "max_pixels",
        40_000_000,
        "Largest image (width x height) decoded; larger ones are answered 413.",
        lower_bound=1,
    )
    flags.DEFINE_float(
        "upload_timeout_s",
        30.0,
        "An upload from which nothing arrives for this long is answered 408.",
        lower_bound=0.1,
    )
    flags.DEFINE_integer(
        "workers",
        min(4, os.cpu_count() or 1),
        "Threads that decode uploads and find faces.",
        lower_bound=1,
    )
    flags.DEFINE_enum(
        "detector",
        "mtcnn",
        list(DETECTORS),
        "Face detector: MTCNN (boxes, confidences, five landmarks) or the LBP cascade.",
    )
    flags.DEFINE_float(
        "min_face_confidence",
        DEFAULT_MIN_CONFIDENCE,
        "MTCNN faces below this confidence are dropped.",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_integer(
        "detect_size",
        DETECT_MAX_SIDE,
        "Images are searched for faces downscaled to at most this many pixels a side.",
        lower_bound=24,
    )
    flags.DEFINE_bool("flip_tta", False, "Average over a horizontally flipped copy.")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6); UserError if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except (OSError, OverflowError) as e:
        sock.close()
        raise UserError(f"--host={host} --port={port}: cannot listen there ({e})") from None
    return sock


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    # TensorFlow only decodes uploads other than JPEG and PNG here (imported at start-up, not
    # on the first such request): keep it off any accelerator.
    tf.config.experimental.set_visible_devices([], "GPU")
    # Requests are detected side by side in threads while the model runs: NumPy's matrix
    # products (MTCNN, the crops' resize) on one thread each, as predict runs them.
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    # A missing run or checkpoint, a port in use: one line from cli.run.
    config = run_dir.load_config(FLAGS.workdir)
    if config.get("compilation_cache_dir"):
        jax.config.update(
            "jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir)
        )
    sock = bind(FLAGS.host, FLAGS.port)
    scorer = FaceScorer(
        FLAGS.workdir,
        FLAGS.which,
        max_batch=FLAGS.max_batch,
        flip_tta=FLAGS.flip_tta,
        detector=FLAGS.detector,
        min_face_confidence=FLAGS.min_face_confidence,
        detect_size=FLAGS.detect_size,
    )
    try:
        scorer.load_detector()  # a missing detector package: one line now, not per request
    except RuntimeError as e:
        raise UserError(str(e)) from None
    scorer.warm_up()
    limits = Limits(
        max_upload_bytes=int(FLAGS.max_upload_mb * 2**20),
        max_pixels=FLAGS.max_pixels,
        max_wait_s=FLAGS.max_wait_ms / 1000,
        max_pending=FLAGS.max_pending,
        workers=FLAGS.workers,
        upload_timeout_s=FLAGS.upload_timeout_s,
    )
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"Serving on http://{url_host}:{port}/", flush=True)
    logging.info(
        "Serving %s (%s) on http://%s:%d/", FLAGS.workdir, scorer.info["backbone"], url_host, port
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(scorer, limits), log_level="warning", access_log=False)
    )
    server.run(sockets=[sock])
    return 0


run = command_line.console_script(define_flags, main)  # affect-jax-serve
