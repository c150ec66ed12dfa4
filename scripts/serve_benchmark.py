r"""Latency and throughput of ``python -m affect_jax.serve`` seen by HTTP clients.

  python scripts/serve_benchmark.py --workdir=runs/demo [--requests=100] [--clients=1,8]
  python scripts/serve_benchmark.py --random=resnet50 --output_dir=/tmp/serve_bench

Starts the server as a process (``--random``: first writes a run of that backbone with random
weights at its config's full size), then for each client count sends ``--requests`` POST
/predict of one photo (skimage's astronaut, JPEG, 512 px; ``--face`` mode) from that many
threads, each waiting for its answer before sending the next. Prints per client count: the
requests' latency p50/p95, images/s, and the server's model calls and faces per call. The
figures go into docs/serving.md.
"""

from __future__ import annotations

import io
import os
import runpy
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def random_run(name: str, root: str) -> str:
    from export_check import write_random_run  # this script's folder

    config = runpy.run_path(os.path.join(REPO, "configs", f"{name}.py"))["get_config"]()
    config.model.init = "random"
    config.data.source = "synthetic"
    return write_random_run(config, os.path.join(root, name))


def start_server(workdir: str, log_path: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "affect_jax.serve", f"--workdir={workdir}", "--port=0", *extra]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    line, deadline = "", time.time() + 900
    while not line.startswith("Serving on "):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start; see {log_path}")
        if select.select([process.stdout], [], [], 1.0)[0]:
            line = process.stdout.readline()
    return process, line.split()[-1].rstrip("/")


def photo() -> bytes:
    from PIL import Image
    from skimage import data

    out = io.BytesIO()
    Image.fromarray(data.astronaut()).save(out, "JPEG", quality=90)
    return out.getvalue()


def load(url: str, image: bytes, clients: int, n: int, face: str) -> dict[str, float]:
    """n requests from ``clients`` threads; latencies in ms, images/s, server counters."""
    before = requests.get(f"{url}/health", timeout=30).json()["stats"]

    def one(_):
        with requests.Session() as session:
            start = time.perf_counter()
            response = session.post(
                f"{url}/predict",
                params={"face": face},
                files={"image": ("a.jpg", image, "image/jpeg")},
                timeout=600,
            )
            response.raise_for_status()
            return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(n)))
    elapsed = time.perf_counter() - start
    after = requests.get(f"{url}/health", timeout=30).json()["stats"]
    calls = after["model_calls"] - before["model_calls"]
    return {
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p95_ms": 1000 * float(np.percentile(latencies, 95)),
        "images_per_s": n / elapsed,
        "faces_per_call": (after["faces"] - before["faces"]) / max(calls, 1),
        "max_faces_per_call": after["max_faces_per_call"],
        "model_share": (after["model_seconds"] - before["model_seconds"]) / elapsed,
    }


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    workdir = random_run(FLAGS.random, FLAGS.output_dir) if FLAGS.random else FLAGS.workdir
    name = FLAGS.random or os.path.basename(os.path.normpath(workdir))
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    process, url = start_server(
        workdir,
        os.path.join(FLAGS.output_dir, f"{name}_server.log"),
        [f"--max_batch={FLAGS.max_batch}"],
    )
    try:
        image = photo()
        load(url, image, 1, 3, FLAGS.face)  # warm: first requests, connections
        print(
            "| model | face | clients | p50 ms | p95 ms | images/s | faces per model call | "
            "time in model calls |"
        )
        for clients in FLAGS.clients:
            clients = int(clients)
            r = load(url, image, clients, FLAGS.requests, FLAGS.face)
            print(
                f"| {name} | {FLAGS.face} | {clients} | {r['p50_ms']:.0f} | "
                f"{r['p95_ms']:.0f} | {r['images_per_s']:.1f} | "
                f"{r['faces_per_call']:.1f} (max {r['max_faces_per_call']}) | "
                f"{100 * r['model_share']:.0f}% |",
                flush=True,
            )
        print(f"load average after {os.getloadavg()[0]:.1f}")
    finally:
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A run to serve.")
    flags.DEFINE_enum(
        "random",
        None,
        ["resnet50", "vgg16"],
        "Serve a random-weight run of this backbone's config (full size) instead of --workdir.",
    )
    flags.DEFINE_string("output_dir", "/tmp/affect_jax_serve_benchmark", "Random runs, logs.")
    flags.DEFINE_integer("requests", 100, "Requests per client count.")
    flags.DEFINE_list("clients", ["1", "8"], "Concurrent clients.")
    flags.DEFINE_enum("face", "auto", ["auto", "detect", "none"], "Face mode of the requests.")
    flags.DEFINE_integer("max_batch", 8, "The server's --max_batch.")
    flags.mark_flags_as_mutual_exclusive(["workdir", "random"], required=True)
    app.run(main)
