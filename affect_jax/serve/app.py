"""The HTTP API and the page: a Starlette application around a ``FaceScorer``.

  GET  /          the page (static/index.html, app.js, style.css)
  POST /predict   multipart file field 'image'; query face=auto|detect|none,
                  faces=all|largest, align=false|true
  GET  /model     the run: backbone, classes, image size, checkpoint step
  GET  /health    status, batching settings and counters

Errors are JSON ``{"error": "..."}`` with a 4xx status (503 when the server is full). Only
the page's three files are served, from memory: no endpoint opens a file a client names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from affect_jax.serve import upload
from affect_jax.serve.batcher import Busy, FaceBatcher
from affect_jax.serve.scorer import FACE_MODES, FACE_SELECTIONS, Face, FaceScorer

BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
# The page's files: URL path -> (file in static/, media type).
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may carry and how requests are batched."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_wait_s: float = 0.01
    max_pending: int = 64
    workers: int = 2  # threads decoding uploads and finding faces
    upload_timeout_s: float = 30.0  # longest silence of a client mid-upload


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _page_files() -> dict[str, bytes]:
    static = importlib.resources.files("affect_jax.serve") / "static"
    return {name: (static / name).read_bytes() for name, _ in PAGE_FILES.values()}


def create_app(scorer: FaceScorer, limits: Limits = Limits()) -> Starlette:
    """The application; its lifespan starts and stops the batching worker."""
    batcher = FaceBatcher(scorer.score, scorer.max_batch, limits.max_wait_s, limits.max_pending)
    files = _page_files()
    started = time.time()
    # Decoding and face finding run on a few threads of their own, each with its own detector.
    workers = ThreadPoolExecutor(
        limits.workers, thread_name_prefix="faces", initializer=scorer.load_detector
    )

    async def page(request: Request) -> Response:
        name, media_type = PAGE_FILES[request.url.path]
        return Response(files[name], media_type=media_type, headers={"Cache-Control": "no-cache"})

    async def model(request: Request) -> JSONResponse:
        return JSONResponse(scorer.info)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "uptime_s": round(time.time() - started, 1),
                "batching": {
                    "max_batch": scorer.max_batch,
                    "step_sizes": scorer.step_sizes,
                    "max_wait_ms": limits.max_wait_s * 1000,
                    "max_pending": limits.max_pending,
                },
                "limits": {
                    "max_upload_bytes": limits.max_upload_bytes,
                    "max_pixels": limits.max_pixels,
                    "upload_timeout_s": limits.upload_timeout_s,
                },
                "workers": limits.workers,
                "stats": batcher.stats.as_dict(),
            }
        )

    async def predict(request: Request) -> JSONResponse:
        try:
            options = face_options(request.query_params)
            with batcher.admit():
                data = await upload.image_bytes(
                    request, limits.max_upload_bytes, limits.upload_timeout_s
                )
                image, faces = await asyncio.get_running_loop().run_in_executor(
                    workers, _find_faces, scorer, data, options, limits.max_pixels
                )
                scores = await batcher.score([f.crop for f in faces])
        except Busy as e:
            return error(503, str(e))
        except upload.UploadError as e:
            return error(e.status, e.message)
        height, width = image.shape[:2]
        return JSONResponse(
            {
                "faces": [{**f.description(), **s} for f, s in zip(faces, scores, strict=True)],
                "width": width,
                "height": height,
                "options": options,
                "model": scorer.info,
            }
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    async def disconnected(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # Every worker thread starts (and builds its detector) now, not on a first request.
        started = threading.Barrier(limits.workers)
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(workers, started.wait) for _ in range(limits.workers))
        )
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            workers.shutdown(wait=True)

    routes = [Route(path, page, methods=["GET"]) for path in PAGE_FILES]
    routes += [
        Route("/predict", predict, methods=["POST"]),
        Route("/model", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: http_error,
            ClientDisconnect: disconnected,
            Exception: internal_error,
        },
    )
    app.state.batcher = batcher
    return app


def face_options(query: Mapping[str, str]) -> dict[str, Any]:
    """``face``, ``faces`` and ``align`` of a /predict query (UploadError 400 if unknown)."""
    options = {"face": query.get("face", "auto"), "faces": query.get("faces", "all")}
    for name, allowed in (("face", FACE_MODES), ("faces", FACE_SELECTIONS)):
        if options[name] not in allowed:
            raise upload.UploadError(
                400,
                f"query parameter {name}={options[name]!r}: expected one of {', '.join(allowed)}",
            )
    align = query.get("align", "false").lower()
    if align not in BOOLEANS:
        raise upload.UploadError(400, f"query parameter align={align!r}: expected true or false")
    options["align"] = BOOLEANS[align]
    return options


def _find_faces(
    scorer: FaceScorer, data: bytes, options: dict[str, Any], max_pixels: int
) -> tuple[np.ndarray, list[Face]]:
    """Decoding and face finding: the request's work on a worker thread."""
    image = upload.decode(data, max_pixels)
    return image, scorer.find_faces(image, **options)
