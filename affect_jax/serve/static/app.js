// The page: sends a photo or webcam frames to POST /predict and draws the answer: a box per
// face on the image, a bar per class, a point per face on the valence-arousal plane.
"use strict";

const COLORS = ["#e6194b", "#2f5bd3", "#3cb44b", "#f58231", "#911eb4", "#0a9396", "#c9a227",
                "#f032e6"];
const WEBCAM_FPS = 4;        // frames sent per second at most (one request at a time)
const WEBCAM_MAX_SIDE = 640; // frames are downscaled to this side before sending
const TRAIL_LENGTH = 24;     // webcam frames kept in the history trail
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const state = { classes: [], webcam: null, trail: [], photoUrl: null, photo: null };

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function color(i) { return COLORS[i % COLORS.length]; }
function percent(p) { return `${(100 * p).toFixed(1)}%`; }
function signed(x) { return (x >= 0 ? "+" : "−") + Math.abs(x).toFixed(2); }
function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

async function loadModel() {
  try {
    const response = await fetch("model");
    const m = await response.json();
    state.classes = m.classes;
    $("model").textContent = `${m.backbone} (width ${m.width}) · ${m.classes.length} classes · ` +
      `${m.image_size} px · run ${m.run}, checkpoint ${m.checkpoint_step}`;
  } catch (e) {
    $("model").textContent = `cannot reach the server: ${e.message}`;
  }
}

async function predict(blob, name) {
  const form = new FormData();
  form.append("image", blob, name);
  const face = encodeURIComponent($("face").value);
  const response = await fetch(`predict?face=${face}`, { method: "POST", body: form });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

// -- drawing ----------------------------------------------------------------------------------

function clearResults() {
  $("overlay").replaceChildren();
  $("faces").replaceChildren();
  $("points").replaceChildren();
  $("trail").replaceChildren();
}

function drawBoxes(result) {
  const overlay = $("overlay");
  overlay.replaceChildren();
  result.faces.forEach((face, i) => {
    const [x, y, w, h] = face.box;
    const box = document.createElement("div");
    box.className = "face-box";
    if (y / result.height < 0.08) box.classList.add("low"); // no room for the label above
    Object.assign(box.style, {
      left: `${(100 * x) / result.width}%`, top: `${(100 * y) / result.height}%`,
      width: `${(100 * w) / result.width}%`, height: `${(100 * h) / result.height}%`,
      borderColor: color(i),
    });
    box.dataset.expression = face.expression;
    const label = document.createElement("span");
    label.className = "face-label";
    label.style.background = color(i);
    label.textContent = `${i + 1}: ${face.expression} ${percent(face.probs[face.expression])}`;
    box.append(label);
    overlay.append(box);
    for (const [lx, ly] of Object.values(face.landmarks || {})) {
      const dot = document.createElement("span");
      dot.className = "landmark";
      Object.assign(dot.style, {
        left: `${(100 * lx) / result.width}%`, top: `${(100 * ly) / result.height}%`,
        background: color(i),
      });
      overlay.append(dot);
    }
  });
}

function drawBars(result) {
  const cards = result.faces.map((face, i) => {
    const card = document.createElement("section");
    card.className = "face-card";
    const title = document.createElement("h2");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = color(i);
    title.append(swatch, `Face ${i + 1}: ${face.expression}`);
    const meta = document.createElement("p");
    meta.className = "meta";
    const where = face.source === "whole_image" ? "whole image"
      : face.confidence != null ? `detected (${percent(face.confidence)})` : "detected";
    meta.textContent = `${where} · valence ${signed(face.valence)} · ` +
      `arousal ${signed(face.arousal)}`;
    card.append(title, meta);
    const classes = state.classes.length ? state.classes : Object.keys(face.probs);
    for (const name of classes) {
      const p = face.probs[name];
      const row = document.createElement("div");
      row.className = "class-bar" + (name === face.expression ? " top" : "");
      row.dataset.class = name;
      row.dataset.p = String(p);
      row.innerHTML = '<span class="name"></span><span class="track"><span class="fill">' +
        '</span></span><span class="value"></span>';
      row.querySelector(".name").textContent = name;
      row.querySelector(".value").textContent = percent(p);
      const fill = row.querySelector(".fill");
      fill.style.width = percent(p);
      fill.style.background = color(i);
      card.append(row);
    }
    return card;
  });
  $("faces").replaceChildren(...cards);
}

function svg(tag, attributes) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

function drawPlane(result) {
  const points = result.faces.map((face, i) => {
    const point = svg("circle", {
      class: "face-point", cx: face.valence, cy: -face.arousal, r: 0.05, fill: color(i),
      "data-valence": face.valence, "data-arousal": face.arousal,
    });
    const title = svg("title", {});
    title.textContent = `face ${i + 1}: valence ${signed(face.valence)}, ` +
      `arousal ${signed(face.arousal)}`;
    point.append(title);
    return point;
  });
  $("points").replaceChildren(...points);
  const trail = $("trail");
  trail.replaceChildren();
  if (state.trail.length < 2) return;
  const line = state.trail.map(([v, a]) => `${v},${-a}`).join(" ");
  trail.append(svg("polyline", { class: "trail", points: line, stroke: color(0) }));
  state.trail.forEach(([v, a], k) => {
    trail.append(svg("circle", {
      class: "trail-dot", cx: v, cy: -a, r: 0.012 + (0.02 * k) / state.trail.length,
      fill: color(0),
    }));
  });
}

function render(result, fromWebcam) {
  if (fromWebcam && result.faces.length) {
    state.trail.push([result.faces[0].valence, result.faces[0].arousal]);
    state.trail = state.trail.slice(-TRAIL_LENGTH);
  }
  drawBoxes(result);
  drawBars(result);
  drawPlane(result);
}

function summary(result, started) {
  const n = result.faces.length;
  const ms = Math.round(performance.now() - started);
  if (!n) return `No face found in the ${result.width}×${result.height} image (faces: ` +
    `${result.options.face}) · ${ms} ms`;
  return `${n} face${n > 1 ? "s" : ""} in the ${result.width}×${result.height} image · ${ms} ms`;
}

// -- photo --------------------------------------------------------------------------------------

function showStage(element) {
  $("photo").hidden = element !== "photo";
  $("video").hidden = element !== "video";
  $("placeholder").hidden = true;
  $("drop").classList.add("filled");
}

async function scorePhoto(file) {
  if (!file) return;
  state.photo = file;
  stopWebcam();
  state.trail = [];
  clearResults();
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  $("photo").src = state.photoUrl;
  showStage("photo");
  setStatus(`Scoring ${file.name}…`);
  const started = performance.now();
  try {
    const result = await predict(file, file.name || "photo");
    render(result, false);
    setStatus(summary(result, started));
  } catch (e) {
    setStatus(`${file.name}: ${e.message}`, true);
  }
}

// -- webcam -------------------------------------------------------------------------------------

function webcamAvailable() {
  return Boolean(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
}

async function startWebcam() {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "user", width: { ideal: 640 } }, audio: false,
    });
  } catch (e) {
    setStatus(`Webcam: ${e.message}`, true);
    return;
  }
  const video = $("video");
  video.srcObject = stream;
  await video.play();
  showStage("video");
  clearResults();
  state.trail = [];
  state.webcam = { stream, canvas: document.createElement("canvas") };
  $("webcam").textContent = "Stop webcam";
  setStatus("Webcam on.");
  webcamLoop(state.webcam);
}

function stopWebcam() {
  if (!state.webcam) return;
  state.webcam.stream.getTracks().forEach((track) => track.stop());
  state.webcam = null;
  $("video").srcObject = null;
  $("webcam").textContent = "Start webcam";
}

function frameBlob(video, canvas) {
  const scale = Math.min(1, WEBCAM_MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.85));
}

async function webcamLoop(webcam) {
  const video = $("video");
  let frames = 0;
  while (state.webcam === webcam) {
    const started = performance.now();
    if (video.videoWidth) {
      try {
        const result = await predict(await frameBlob(video, webcam.canvas), "frame.jpg");
        if (state.webcam !== webcam) break;
        render(result, true);
        frames += 1;
        setStatus(`Webcam frame ${frames}: ${summary(result, started)}`);
      } catch (e) {
        if (state.webcam === webcam) setStatus(`Webcam: ${e.message}`, true);
      }
    }
    await sleep(Math.max(0, 1000 / WEBCAM_FPS - (performance.now() - started)));
  }
}

// -- wiring -------------------------------------------------------------------------------------

function setUp() {
  $("file").addEventListener("change", (event) => scorePhoto(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    scorePhoto(event.dataTransfer.files[0]);
  });
  // A photo dropped beside the stage is not opened by the browser in place of the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  const button = $("webcam");
  if (!webcamAvailable()) {
    button.disabled = true;
    button.title = "The browser allows the webcam only on https or localhost pages.";
  }
  button.addEventListener("click", () => (state.webcam ? stopWebcam() : startWebcam()));
  $("face").addEventListener("change", () => {
    if (!state.webcam && state.photo) scorePhoto(state.photo);
  });
  loadModel();
}

setUp();
