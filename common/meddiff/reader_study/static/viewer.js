// Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
// The reader-study viewer: two planes of one volume, window presets, Likert questions, real/synthetic.
"use strict";

const BOX = 360;  // px, the square each plane is fitted into
// RAS+ axis -> in-plane (column, row) axes and whether each is flipped on screen (radiological view:
// patient's right on the left, anterior and superior at the top).
const PLANES = {
  0: { col: 1, row: 2, flipCol: true, flipRow: true },   // sagittal: anterior left, superior up
  1: { col: 0, row: 2, flipCol: true, flipRow: true },   // coronal: right on the left, superior up
  2: { col: 0, row: 1, flipCol: true, flipRow: true },   // axial: right on the left, anterior up
};

const state = {
  study: null, reader: null, order: [], done: new Set(), index: 0,
  caseId: null, meta: null, volume: null, slices: [0, 0], preset: 0, lut: null,
  activeMs: 0, shownAt: null, busy: false,
};
window.readerStudy = state;  // for scripted tests

const $ = (sel, root = document) => root.querySelector(sel);

function setStatus(text) { $("#status").textContent = text || ""; }
function setState(name) {
  document.body.dataset.state = name;
  $("#login-panel").hidden = name !== "login";
  $("#case-panel").hidden = !(name === "rating" || name === "loading");
  $("#done-panel").hidden = name !== "done";
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const resp = await fetch(path, opts);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.error || `${path}: HTTP ${resp.status}`);
  return data;
}

// ---------------------------------------------------------------- time on case (visible time only)
function startClock() { state.activeMs = 0; state.shownAt = document.hidden ? null : performance.now(); }
function secondsOnCase() {
  let ms = state.activeMs;
  if (state.shownAt !== null) ms += performance.now() - state.shownAt;
  return ms / 1000;
}
document.addEventListener("visibilitychange", () => {
  if (document.hidden && state.shownAt !== null) { state.activeMs += performance.now() - state.shownAt; state.shownAt = null; }
  else if (!document.hidden && state.shownAt === null && state.caseId) { state.shownAt = performance.now(); }
});

// ---------------------------------------------------------------- rendering
function windowBounds() {
  const p = state.study.presets[state.preset];
  const m = state.meta;
  if (p.width === "full") return [m.offset, m.offset + 65535 * m.scale];
  const w = p.width === null ? m.auto_window.width : p.width;
  const l = p.level === null ? m.auto_window.level : p.level;
  return [l - w / 2, l + w / 2];
}

function buildLut() {
  const [lo, hi] = windowBounds();
  const m = state.meta, lut = new Uint8ClampedArray(65536), span = Math.max(hi - lo, 1e-12);
  for (let q = 0; q < 65536; q++) lut[q] = ((m.offset + m.scale * q - lo) / span) * 255;
  state.lut = lut;
  const p = state.study.presets[state.preset];
  $("#window-label").textContent = `${p.name}: window ${(hi - lo).toPrecision(4)}, level ${((hi + lo) / 2).toPrecision(4)}`;
}

function render(v) {
  const axis = state.study.planes[v].axis, pl = PLANES[axis], shape = state.meta.shape;
  const [nx, ny, nz] = shape, strides = [ny * nz, nz, 1];
  const ncol = shape[pl.col], nrow = shape[pl.row], k = state.slices[v];
  const canvas = $(`#viewer-${v} canvas`), ctx = canvas.getContext("2d");
  const img = ctx.createImageData(ncol, nrow), px = img.data, vol = state.volume, lut = state.lut;
  const base = k * strides[axis];
  for (let r = 0; r < nrow; r++) {
    const ri = pl.flipRow ? nrow - 1 - r : r;
    for (let c = 0; c < ncol; c++) {
      const ci = pl.flipCol ? ncol - 1 - c : c;
      const g = lut[vol[base + ci * strides[pl.col] + ri * strides[pl.row]]];
      const o = 4 * (r * ncol + c);
      px[o] = px[o + 1] = px[o + 2] = g; px[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  if (v === 1) {  // where the acquisition slice cuts the reformat
    const acq = state.study.planes[0].axis, s = state.slices[0];
    ctx.fillStyle = "rgba(255, 210, 0, 0.35)";
    if (acq === pl.row) ctx.fillRect(0, pl.flipRow ? nrow - 1 - s : s, ncol, 1);
    if (acq === pl.col) ctx.fillRect(pl.flipCol ? ncol - 1 - s : s, 0, 1, nrow);
  }
  canvas.dataset.slice = String(k);
  $(`#viewer-${v} .slice-label`).textContent = `slice ${k + 1} / ${shape[axis]}`;
  $(`#viewer-${v} .slice-slider`).value = String(k);
}
function renderAll() { render(0); render(1); }

function setupPlane(v) {
  const axis = state.study.planes[v].axis, pl = PLANES[axis], shape = state.meta.shape, sp = state.study.spacing;
  const canvas = $(`#viewer-${v} canvas`);
  canvas.width = shape[pl.col]; canvas.height = shape[pl.row];
  const w = shape[pl.col] * sp[pl.col], h = shape[pl.row] * sp[pl.row], f = BOX / Math.max(w, h);
  canvas.style.width = `${Math.round(w * f)}px`; canvas.style.height = `${Math.round(h * f)}px`;
  $(`#viewer-${v} .plane-name`).textContent = state.study.planes[v].name;
  const slider = $(`#viewer-${v} .slice-slider`);
  slider.max = String(shape[axis] - 1);
  state.slices[v] = Math.floor(shape[axis] / 2);
}

function scroll(v, delta) {
  const n = state.meta.shape[state.study.planes[v].axis];
  const k = Math.min(n - 1, Math.max(0, state.slices[v] + delta));
  if (k === state.slices[v]) return;
  state.slices[v] = k;
  if (v === 0) renderAll(); else render(1);
}

function selectPreset(i) {
  state.preset = i;
  document.querySelectorAll("#presets button").forEach((b, j) => b.classList.toggle("active", j === i));
  buildLut();
  renderAll();
}

// ---------------------------------------------------------------- the form
function buildForm() {
  const box = $("#questions");
  box.innerHTML = "";
  for (const q of state.study.questions) {
    const fs = document.createElement("fieldset");
    fs.className = "question";
    fs.dataset.question = q.id;
    const legend = document.createElement("legend");
    legend.textContent = q.text;
    fs.appendChild(legend);
    const row = document.createElement("div");
    row.className = "likert";
    for (let s = 1; s <= 5; s++) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio"; input.name = `q-${q.id}`; input.value = String(s);
      label.appendChild(input);
      label.appendChild(document.createTextNode(String(s)));
      row.appendChild(label);
    }
    fs.appendChild(row);
    const anchors = document.createElement("div");
    anchors.className = "anchors";
    for (const i of [0, 4]) {
      const span = document.createElement("span");
      span.textContent = q.anchors[i].replace(/^\d\s*/, "");
      anchors.appendChild(span);
    }
    fs.appendChild(anchors);
    box.appendChild(fs);
  }
  const presets = $("#presets");
  presets.innerHTML = "";
  state.study.presets.forEach((p, i) => {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = p.name; b.dataset.preset = p.name;
    b.addEventListener("click", () => selectPreset(i));
    presets.appendChild(b);
  });
}

function collect() {
  const scores = {};
  for (const q of state.study.questions) {
    const checked = document.querySelector(`input[name="q-${q.id}"]:checked`);
    if (!checked) return null;
    scores[q.id] = Number(checked.value);
  }
  const answer = document.querySelector('input[name="answer"]:checked');
  return answer ? { scores, answer: answer.value } : null;
}

function updateSubmit() { $("#submit").disabled = state.busy || collect() === null; }

// ---------------------------------------------------------------- cases
async function showCase() {
  while (state.index < state.order.length && state.done.has(state.order[state.index])) state.index++;
  if (state.index >= state.order.length) {
    state.caseId = null;
    $("#progress").textContent = `${state.order.length} of ${state.order.length} rated`;
    $("#done-text").textContent = `All ${state.order.length} cases rated. Thank you!`;
    setState("done");
    return;
  }
  setState("loading");
  const caseId = state.order[state.index];
  $("#progress").textContent = `Case ${state.index + 1} of ${state.order.length}`;
  $("#rating-form").reset();
  updateSubmit();
  const meta = await api(`/cases/${caseId}/meta.json`);
  const resp = await fetch(`/cases/${caseId}/volume.u16.gz`);
  if (!resp.ok) throw new Error(`case ${caseId}: HTTP ${resp.status}`);
  const volume = new Uint16Array(await resp.arrayBuffer());
  if (volume.length !== meta.shape[0] * meta.shape[1] * meta.shape[2]) throw new Error(`case ${caseId}: truncated volume`);
  Object.assign(state, { caseId, meta, volume });
  setupPlane(0); setupPlane(1);
  selectPreset(0);
  setState("rating");
  startClock();
}

async function submit(ev) {
  ev.preventDefault();
  const answers = collect();
  if (!answers || state.busy) return;
  state.busy = true; updateSubmit();
  try {
    await api("/api/rate", { reader: state.reader, case: state.caseId, seconds: secondsOnCase(), ...answers });
    state.done.add(state.caseId);
    setStatus("");
    await showCase();
  } catch (e) {
    setStatus(`Not saved: ${e.message}. Your answers are still here; try again.`);
  } finally {
    state.busy = false; updateSubmit();
  }
}

async function login() {
  const id = $("#reader-id").value.trim();
  try {
    const info = await api("/api/login", { reader: id });
    Object.assign(state, { reader: info.reader, order: info.order, done: new Set(info.done), index: 0 });
    $("#reader-label").textContent = `reader ${info.reader}`;
    setStatus("");
    await showCase();
  } catch (e) {
    setStatus(e.message);
  }
}

async function init() {
  try {
    state.study = await api("/api/study");
  } catch (e) { setStatus(e.message); return; }
  document.title = $("#title").textContent = state.study.title;
  buildForm();
  $("#start").addEventListener("click", login);
  $("#reader-id").addEventListener("keydown", (e) => { if (e.key === "Enter") login(); });
  $("#rating-form").addEventListener("change", updateSubmit);
  $("#rating-form").addEventListener("submit", submit);
  for (const v of [0, 1]) {
    $(`#viewer-${v} canvas`).addEventListener("wheel", (e) => { e.preventDefault(); scroll(v, e.deltaY > 0 ? 1 : -1); });
    $(`#viewer-${v} .slice-slider`).addEventListener("input", (e) => { scroll(v, Number(e.target.value) - state.slices[v]); });
  }
  document.addEventListener("keydown", (e) => {
    if (document.body.dataset.state !== "rating" || e.target.tagName === "INPUT" && e.target.type !== "radio") return;
    if (e.key === "ArrowUp") { e.preventDefault(); scroll(0, 1); }
    if (e.key === "ArrowDown") { e.preventDefault(); scroll(0, -1); }
  });
  setState("login");
}

init();
