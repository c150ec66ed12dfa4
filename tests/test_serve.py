"""affect_jax.serve: the server as a process on a free localhost port, a real HTTP client, and
the page in headless Chromium (Debian's package, driven by Playwright)."""

import base64
import io
import os
import re
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pillow_heif
import pytest
import requests
from PIL import Image

from affect_jax import predict
from affect_jax.data import synthetic
from affect_jax.data.images import ORIENTATION_TAG, decode_image
from affect_jax.predict.tracks import box_iou
from affect_jax.serve import scorer as scorer_lib
from scripts import export_check
from tests import face_images
from tests.conftest import REPO, tiny_config

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    # A built-in test-pattern camera, allowed without asking.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
MAX_UPLOAD_MB = 1
MAX_PIXELS = 2_000_000
MAX_PENDING = 8
UPLOAD_TIMEOUT_S = 8
TOLERANCE = 1e-5  # a face scored alone and in a batch: the same up to float32 round-off


def _encode(image, fmt="PNG", **options):
    out = io.BytesIO()
    if fmt == "HEIF":  # pillow-heif writes it; the server reads it with pi-heif
        pillow_heif.from_pillow(Image.fromarray(image)).save(out, **options)
    else:
        Image.fromarray(image).save(out, fmt, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1/16-width VGG16 run with random weights (no training)."""
    return export_check.write_random_run(tiny_config(), str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    """The base URL of ``python -m affect_jax.serve`` on a free port (--port=0)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "affect_jax.serve",
        f"--workdir={run}",
        "--port=0",
        "--max_batch=8",
        "--max_wait_ms=100",
        f"--max_pending={MAX_PENDING}",
        f"--max_upload_mb={MAX_UPLOAD_MB}",
        f"--max_pixels={MAX_PIXELS}",
        f"--upload_timeout_s={UPLOAD_TIMEOUT_S}",
    ]
    with open(log, "w") as stderr:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        deadline, line = time.time() + 300, ""
        while not line.startswith("Serving on ") and time.time() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            if select.select([process.stdout], [], [], 1.0)[0]:
                line = process.stdout.readline()
        assert line.startswith("Serving on http://127.0.0.1:"), (line, log.read_text()[-3000:])
        yield line.split()[-1].rstrip("/")
        assert process.poll() is None, f"the server died:\n{log.read_text()[-3000:]}"
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def predictor(run):
    return predict.Predictor(run, batch_size=8)


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "astronaut.jpg"
    Image.fromarray(face_images.astronaut()).save(path, quality=92)
    return path


def _post(url, data, name="face.png", content_type="image/png", face=None, **kwargs):
    params = {"face": face} if face else None
    return requests.post(
        f"{url}/predict",
        params=params,
        files={"image": (name, data, content_type)},
        timeout=60,
        **kwargs,
    )


def _stats(url):
    return requests.get(f"{url}/health", timeout=10).json()["stats"]


def _expected(predictor, image):
    out = predictor.predict([image])
    return out["probs"][0], out["valence_arousal"][0]


def _assert_face_matches(face, probs, va, class_names):
    assert list(face["probs"]) == class_names
    np.testing.assert_allclose([face["probs"][c] for c in class_names], probs, atol=TOLERANCE)
    np.testing.assert_allclose([face["valence"], face["arousal"]], va, atol=TOLERANCE)
    assert face["expression"] == class_names[int(np.argmax(probs))]


def test_step_sizes():
    assert scorer_lib.step_sizes(1) == (1,)
    assert scorer_lib.step_sizes(8) == (1, 2, 4, 8)
    assert scorer_lib.step_sizes(12) == (1, 2, 4, 8, 12)


def test_model_health_and_page(server, predictor):
    model = requests.get(f"{server}/model", timeout=10).json()
    assert model["backbone"] == "vgg16" and model["image_size"] == 32
    assert model["classes"] == list(predictor.class_names)
    assert model["checkpoint_step"] == predictor.step == 1
    health = requests.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok"
    assert health["batching"]["max_batch"] == 8
    assert health["limits"] == {
        "max_upload_bytes": MAX_UPLOAD_MB * 2**20,
        "max_pixels": MAX_PIXELS,
        "upload_timeout_s": UPLOAD_TIMEOUT_S,
    }
    page = requests.get(f"{server}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        assert name in page.text
        response = requests.get(f"{server}/{name}", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)


def _cli_faces(predictor, image, face="auto", faces="all", align=False):
    """``Predictor.predict_image``'s rows (the prediction command line's) as the API's faces."""
    out = []
    for row in predictor.predict_image(image, face=face, faces=faces, align=align):
        if row["status"] != predict.STATUS_OK:
            continue
        item = {
            "box": [row[c] for c in predict.FACE_COLUMNS],
            "source": row["face_source"],
            "expression": row["expression"],
            "probs": [row[c] for c in predictor.prob_columns],
            "va": [row["valence"], row["arousal"]],
        }
        if row["face_confidence"] is not None:
            item["confidence"] = row["face_confidence"]
            item["landmarks"] = [[row[f"{n}_x"], row[f"{n}_y"]] for n in predict.LANDMARK_NAMES]
        out.append(item)
    return out


IMAGES = {
    "astronaut": face_images.astronaut,
    "two astronauts": face_images.two_astronauts,
    "tilted": lambda: face_images.rotated_astronaut(25),
    "blank": lambda: np.full((64, 80, 3), 128, np.uint8),
}
# (image, query) -> number of faces in the answer.
CASES = [
    ("astronaut", {"face": "none"}, 1),
    ("astronaut", {"face": "detect"}, 1),
    ("astronaut", {}, 1),  # auto
    ("two astronauts", {}, 2),
    ("two astronauts", {"faces": "largest"}, 1),
    ("tilted", {"align": "true"}, 1),
    ("blank", {}, 1),  # auto: no face found, the whole image
    ("blank", {"face": "detect"}, 0),
]


@pytest.mark.parametrize(("name", "query", "count"), CASES, ids=[f"{n}-{q}" for n, q, _ in CASES])
def test_predict_answers_as_the_command_line(server, predictor, name, query, count):
    data = _encode(IMAGES[name]())
    image = decode_image(data)
    response = requests.post(
        f"{server}/predict",
        params=query,
        timeout=60,
        files={"image": ("face.png", data, "image/png")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["height"], body["width"]) == image.shape[:2]
    options = {"face": "auto", "faces": "all", "align": False}
    options.update(query)
    options["align"] = options["align"] in (True, "true")
    assert body["options"] == options
    assert body["model"]["classes"] == list(predictor.class_names)
    expected = _cli_faces(predictor, image, **options)
    assert len(body["faces"]) == len(expected) == count
    for got, want in zip(body["faces"], expected, strict=True):
        assert got["box"] == want["box"] and got["source"] == want["source"]
        _assert_face_matches(got, want["probs"], want["va"], list(predictor.class_names))
        if "confidence" in want:
            assert got["confidence"] == pytest.approx(want["confidence"])
            assert list(got["landmarks"]) == list(predict.LANDMARK_NAMES)
            np.testing.assert_allclose(
                list(got["landmarks"].values()), want["landmarks"], atol=0.01
            )
        else:
            assert "confidence" not in got and "landmarks" not in got
    if name == "astronaut" and options["face"] != "none":
        [face] = body["faces"]
        assert face["source"] == "detected" and face["confidence"] > 0.9
        assert box_iou(face["box"], face_images.ASTRONAUT_FACE) > 0.7


def test_formats(server):
    image = synthetic.draw_faces(1, 40, 8, seed=1)["image"][0]
    page = requests.get(f"{server}/", timeout=10).text
    offered = re.search(r'type="file" accept="([^"]*)"', page).group(1).split(",")
    for fmt, mime in (
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
        ("GIF", "image/gif"),
        ("TIFF", "image/tiff"),
        ("HEIF", "image/heic"),
        ("AVIF", "image/avif"),
    ):
        assert mime in offered, mime  # the page's file picker lists it
        response = _post(server, _encode(image, fmt), f"f.{fmt.lower()}", mime, face="none")
        assert response.status_code == 200, (fmt, response.text)
        assert response.json()["faces"][0]["box"] == [0, 0, 40, 40]
    # An AVIF whose major brand is the generic one HEIF files use too.
    avif = _encode(image, "AVIF")
    response = _post(server, avif[:8] + b"mif1" + avif[12:], "f.avif", "image/avif", face="none")
    assert response.status_code == 200, response.text
    # A phone photo stored on its side (EXIF orientation 6) is read upright: 60 wide, 40 high.
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    sideways = np.zeros((60, 40, 3), np.uint8) + 128
    response = _post(server, _encode(sideways, "JPEG", exif=exif.tobytes()), face="none")
    assert response.json()["faces"][0]["box"] == [0, 0, 60, 40], response.text
    # An unnamed type (what browsers send for unknown files) is judged by its bytes.
    response = _post(server, _encode(image), "blob", "application/octet-stream", face="none")
    assert response.status_code == 200, response.text


def test_concurrent_requests_all_answered_and_batched(server, predictor):
    faces = synthetic.draw_faces(10, 40, 8, seed=5)["image"]
    files = [_encode(f) for f in faces]
    classes = list(predictor.class_names)
    expected = [_expected(predictor, f) for f in faces]
    before = _stats(server)

    def one(k):
        return k, _post(server, files[k % len(files)], face="none")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(50)))
    for k, response in answers:
        assert response.status_code == 200, response.text
        [face] = response.json()["faces"]
        _assert_face_matches(face, *expected[k % len(files)], classes)
    after = _stats(server)
    calls = after["model_calls"] - before["model_calls"]
    assert after["faces"] - before["faces"] == 50
    assert after["requests"] - before["requests"] == 50
    assert calls < 50 and after["max_faces_per_call"] > 1, after  # shared model calls
    assert after["pending"] == 0


def _multipart(field="image", filename="x.png", content_type="image/png", data=b""):
    boundary = "testboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def _bad_requests(png):
    big = np.random.default_rng(0).integers(0, 256, (800, 800, 3), np.uint8)
    big_png = _encode(big)  # about 1.9 MB: over the 1 MB limit
    assert len(big_png) > MAX_UPLOAD_MB * 2**20
    wide = _encode(np.zeros((1000, 2500, 3), np.uint8))  # small file, 2.5 megapixels

    def chunked_big():  # no Content-Length: the limit is enforced while reading
        body, _ = _multipart(data=big_png)
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    return {
        "not an image": (
            dict(files={"image": ("a.png", b"\x89PNG not really", "image/png")}),
            400,
            "not a JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC or AVIF image",
        ),
        "truncated image": (
            dict(files={"image": ("a.png", png[: len(png) // 2], "image/png")}),
            400,
            "cannot decode the PNG image",
        ),
        "empty body": (
            dict(data=b"", headers={"Content-Type": _multipart()[1]}),
            400,
            "empty request body",
        ),
        "empty file": (dict(files={"image": ("a.png", b"", "image/png")}), 400, "is empty"),
        "missing field": (
            dict(files={"photo": ("a.png", png, "image/png")}),
            400,
            "missing the file field 'image'",
        ),
        "text field": (
            dict(data={"image": "hello"}, files={"x": ("a", b"1")}),
            400,
            "is text, not a file",
        ),
        "wrong request type": (
            dict(data=png, headers={"Content-Type": "image/png"}),
            415,
            "expected multipart/form-data",
        ),
        "no request type": (dict(data=png), 415, "expected multipart/form-data"),
        "wrong part type": (
            dict(files={"image": ("a.txt", png, "text/plain")}),
            415,
            "content type 'text/plain'",
        ),
        "unaccepted format": (
            dict(
                files={
                    "image": ("a.ppm", _encode(np.zeros((8, 8, 3), np.uint8), "PPM"), "image/x-ppm")
                }
            ),
            415,
            "format PPM",
        ),
        "over the size limit": (
            dict(files={"image": ("a.png", big_png, "image/png")}),
            413,
            "over the limit of 1048576 bytes",
        ),
        "over the size limit, chunked": (
            dict(data=chunked_big(), headers={"Content-Type": _multipart()[1]}),
            413,
            "over the limit of 1048576 bytes",
        ),
        "over the pixel limit": (
            dict(files={"image": ("a.png", wide, "image/png")}),
            413,
            "2500x1000 pixels is over the limit of 2000000",
        ),
        "malformed multipart": (
            dict(data=b"--nope\r\n\r\n", headers={"Content-Type": "multipart/form-data"}),
            400,
            "multipart",
        ),
        "unknown face mode": (
            dict(params={"face": "box"}, files={"image": ("a.png", png, "image/png")}),
            400,
            "face='box': expected one of auto, detect, none",
        ),
        "unknown face selection": (
            dict(params={"faces": "first"}, files={"image": ("a.png", png, "image/png")}),
            400,
            "faces='first': expected one of all, largest",
        ),
        "unknown align value": (
            dict(params={"align": "maybe"}, files={"image": ("a.png", png, "image/png")}),
            400,
            "align='maybe': expected true or false",
        ),
    }


def test_bad_inputs_answered_with_json_errors(server):
    png = _encode(synthetic.draw_faces(1, 40, 8, seed=2)["image"][0])
    for name, (kwargs, status, text) in _bad_requests(png).items():
        response = requests.post(f"{server}/predict", timeout=60, **kwargs)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json", name
        assert text in response.json()["error"], (name, response.json())
    for method, path, status in (
        ("GET", "/predict", 405),
        ("GET", "/nothing", 404),
        ("GET", "/../../etc/passwd", 404),
        ("GET", "/static/index.html", 404),
        ("DELETE", "/model", 405),
    ):
        response = requests.request(method, f"{server}{path}", timeout=10)
        assert response.status_code == status, (path, response.text)
        assert "error" in response.json()
    # Still serving, nothing left held.
    assert _post(server, png, face="none").status_code == 200
    assert _stats(server)["pending"] == 0


def _stalled_upload(url):
    """A socket whose POST /predict sent its headers and part of its body, then stopped."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    body, content_type = _multipart(data=b"\x89PNG" + b"0" * 100)
    sock.sendall(
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:60]
    )
    return sock


def _wait_for_pending(url, n):
    deadline = time.time() + 30
    while _stats(url)["pending"] != n:
        assert time.time() < deadline, _stats(url)
        time.sleep(0.05)


def test_full_server_answers_503_then_recovers(server):
    png = _encode(synthetic.draw_faces(1, 40, 8, seed=3)["image"][0])
    rejected = _stats(server)["rejected_busy"]
    sockets = [_stalled_upload(server) for _ in range(MAX_PENDING)]
    try:
        _wait_for_pending(server, MAX_PENDING)
        response = _post(server, png, face="none")
        assert response.status_code == 503, response.text
        assert "busy" in response.json()["error"]
        assert _stats(server)["rejected_busy"] == rejected + 1
    finally:
        for sock in sockets:  # the clients leave mid-upload
            sock.close()
    _wait_for_pending(server, 0)
    assert _post(server, png, face="none").status_code == 200


def test_stalled_upload_answered_408(server):
    with _stalled_upload(server) as sock:
        sock.settimeout(UPLOAD_TIMEOUT_S + 30)
        start = time.time()
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after answering
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "the upload stalled" in answer
    assert time.time() - start >= UPLOAD_TIMEOUT_S - 1
    _wait_for_pending(server, 0)


def test_port_in_use_is_one_clear_error(run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "affect_jax.serve", f"--workdir={run}", f"--port={port}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 1
    assert f"--port={port}: cannot listen there" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is missing (Debian's chromium package; .ci/run installs it with apt-get)",
)
def test_page_in_headless_chromium(server, astronaut, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    data = astronaut.read_bytes()
    api = _post(server, data, "astronaut.jpg", "image/jpeg").json()
    [face] = api["faces"]
    classes = api["model"]["classes"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            expect(page.locator("#model")).to_contain_text("vgg16")

            page.set_input_files("#file", str(astronaut))
            boxes = page.locator("#overlay .face-box")
            expect(boxes).to_have_count(1)
            expect(boxes.first).to_contain_text(face["expression"])
            # The box sits on the image where the API put it.
            placed = page.evaluate("""() => {
                const b = document.querySelector('#overlay .face-box').getBoundingClientRect();
                const i = document.getElementById('photo').getBoundingClientRect();
                return [(b.left - i.left) / i.width, (b.top - i.top) / i.height,
                        b.width / i.width, b.height / i.height];
            }""")
            np.testing.assert_allclose(placed, np.array(face["box"]) / 512, atol=0.01)
            expect(page.locator("#overlay .landmark")).to_have_count(len(face["landmarks"]))
            bars = page.locator("#faces .class-bar")
            expect(bars).to_have_count(len(classes))
            assert bars.evaluate_all("rows => rows.map(r => r.dataset.class)") == classes
            shown = bars.evaluate_all("rows => rows.map(r => Number(r.dataset.p))")
            np.testing.assert_allclose(shown, [face["probs"][c] for c in classes], atol=1e-6)
            widths = bars.evaluate_all(
                "rows => rows.map(r => r.querySelector('.fill').getBoundingClientRect().width)"
            )
            assert max(widths) > 0
            point = page.locator("#points .face-point")
            expect(point).to_have_count(1)
            assert float(point.get_attribute("cx")) == pytest.approx(face["valence"])
            assert float(point.get_attribute("cy")) == pytest.approx(-face["arousal"])
            expect(page.locator("#status")).to_contain_text("1 face")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # A phone-sized screen: everything in one column, nothing wider than the screen.
            page.set_viewport_size({"width": 390, "height": 844})
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=str(tmp_path / "page_phone.png"), full_page=True)

            # Dropping a photo (the blank image: scored whole under face=auto).
            blank = base64.b64encode(_encode(np.full((60, 90, 3), 200, np.uint8))).decode()
            page.evaluate(
                """b64 => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], 'blank.png', {type: 'image/png'}));
                document.getElementById('drop').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""",
                blank,
            )
            expect(page.locator("#status")).to_contain_text("90×60")
            expect(page.locator("#faces .meta")).to_contain_text("whole image")

            # The webcam (Chromium's test-pattern camera): frames scored, a trail drawn.
            page.click("#webcam")
            page.wait_for_function(
                "document.querySelectorAll('#trail .trail-dot').length >= 3", timeout=30_000
            )
            expect(page.locator("#points .face-point")).to_have_count(1)
            page.screenshot(path=str(tmp_path / "page_webcam.png"))
            page.click("#webcam")
            expect(page.locator("#webcam")).to_have_text("Start webcam")
            assert errors == []
        finally:
            browser.close()
    for name in ("page.png", "page_phone.png", "page_webcam.png"):
        assert (tmp_path / name).stat().st_size > 10_000
