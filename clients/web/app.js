// The upload page: sends the photo as b64 JPEG to the TF Serving REST API of the same server
// (POST /v1/models/<model>:predict, columnar "inputs") and shows what the ensemble answered.
"use strict";

const body = document.body;
const MODEL = body.dataset.model;
const API = body.dataset.api;               // e.g. "/v1/models/car_ensemble"
const MAX_BYTES = Number(body.dataset.maxBytes);
const TOP_K = Number(body.dataset.topK);
const $ = (id) => document.getElementById(id);

function megabytes(n) { return (n / (1024 * 1024)).toFixed(1) + " MB"; }
function percent(p) { return (100 * p).toFixed(1) + " %"; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("busy").hidden = true;
}

function clearState() {
  $("note").hidden = true;
  $("error").hidden = true;
  $("result").hidden = true;
  $("busy").hidden = true;
}

// Each choice of photo gets a number; an answer that arrives after a newer choice is dropped, so what the
// page shows always belongs to the photo in the preview.
let latestUpload = 0;
let previewUrl = null;

function showPreview(file) {
  const preview = $("preview");
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = file ? URL.createObjectURL(file) : null;
  preview.hidden = !previewUrl;
  if (previewUrl) preview.src = previewUrl;
  else preview.removeAttribute("src");
}

async function checkModel() {
  try {
    const response = await fetch(API);
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    const versions = (data.model_version_status || []).map((s) => {
      const why = s.status && s.status.error_message ? ` (${s.status.error_message})` : "";
      return `v${s.version} ${s.state}${why}`;
    });
    $("model-status").textContent = `${MODEL}: ${versions.join(", ") || "no version"}`;
  } catch (err) {
    $("model-status").textContent = `${MODEL}: status unknown (${err.message})`;
  }
}

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function render(outputs, latencyMs) {
  // An ensemble's config may leave outputs out: what it did not answer is left blank, never guessed.
  const row = (name) => (outputs[name] ? outputs[name][0] : undefined);
  const labels = row("top_k_labels") || (row("label") === undefined ? [] : [row("label")]);
  const all = row("probabilities");
  const probs = row("top_k_probabilities") || (all ? [Math.max(...all)] : []);  // the top label's is the largest
  const shown = (p) => (typeof p === "number" ? percent(p) : "");
  const top = $("top");
  top.replaceChildren();
  labels.slice(0, TOP_K).forEach((label, i) => {
    const li = document.createElement("li");
    li.className = "prediction";
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${typeof probs[i] === "number" ? Math.round(100 * probs[i]) : 0}%`;
    const value = document.createElement("span");
    value.className = "probability";
    value.textContent = shown(probs[i]);
    li.append(name, value, bar);
    top.append(li);
  });

  const tbody = $("members").querySelector("tbody");
  tbody.replaceChildren();
  const names = row("member_names") || [];
  names.forEach((member, j) => {
    const answered = row("member_answered") ? row("member_answered")[j] : true;
    const column = (name) => (row(name) ? row(name)[j] : undefined);
    const memberProbs = column("member_probabilities");
    const version = column("member_versions");
    const latency = column("member_latency_ms");
    const cells = [
      member,
      answered ? (version === undefined ? "" : `v${version}`) : "-",
      answered ? (column("member_labels") ?? "") : "no answer",
      answered ? (memberProbs ? shown(Math.max(...memberProbs)) : "") : "-",
      latency === undefined ? "" : `${Math.round(latency)} ms`,
    ];
    const tr = document.createElement("tr");
    tr.className = answered ? "member" : "member missing";
    cells.forEach((text) => {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    });
    tbody.append(tr);
  });
  $("members").hidden = names.length === 0;
  $("degraded").hidden = !(row("degraded"));
  $("summary").textContent = `${MODEL} answered in ${Math.round(latencyMs)} ms (round trip from this page)`;
  $("result").hidden = false;
}

// The page classifies one photo at a time: of several files dropped at once, the first image (else the first
// file, which is then refused by name), and a note says which.
function chooseOne(files) {
  const all = Array.from(files || []);
  const photo = all.find((f) => f.type.startsWith("image/")) || all[0];
  const note = all.length > 1 ? `${all.length} files dropped: classifying ${photo.name} (one photo at a time)` : "";
  return { photo, note };
}

async function classify(file, note = "") {
  const upload = ++latestUpload;
  clearState();
  if (!file) return;
  $("note").textContent = note;
  $("note").hidden = !note;
  const refuse = (message) => { showPreview(null); showError(message); };
  if (file.size === 0) return refuse(`${file.name} is empty (0 bytes): choose a photo.`);
  if (file.size > MAX_BYTES) {
    return refuse(`${file.name} is ${megabytes(file.size)}, larger than the ${megabytes(MAX_BYTES)} limit: ` +
                  "choose a smaller photo.");
  }
  if (file.type && !file.type.startsWith("image/")) {
    return refuse(`${file.name} is not an image (${file.type}): choose a JPEG, PNG, GIF, BMP or WebP photo.`);
  }
  showPreview(file);
  $("busy").hidden = false;
  try {
    const b64 = await readAsBase64(file);
    if (upload !== latestUpload) return;
    const started = performance.now();
    const response = await fetch(`${API}:predict`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ signature_name: "serving_default", inputs: { image_bytes: [{ b64 }] } }),
    });
    const latency = performance.now() - started;
    let data;
    try { data = await response.json(); } catch (e) { data = { error: `HTTP ${response.status}` }; }
    if (upload !== latestUpload) return;  // a newer photo was chosen meanwhile: its answer is the one to show
    $("busy").hidden = true;
    if (!response.ok || data.error) {
      const reason = data.error || response.statusText;
      if (response.status === 400) return showError(`${file.name} was refused: ${reason}`);
      if (response.status === 413) return showError(`${file.name} is too large for the server: ${reason}`);
      return showError(`The server could not classify ${file.name} (HTTP ${response.status}): ${reason}`);
    }
    render(data.outputs, latency);
  } catch (err) {
    if (upload === latestUpload) showError(`Could not reach the server: ${err.message}`);
  }
}

$("limit").textContent = megabytes(MAX_BYTES);
$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  e.target.value = "";  // so that choosing the same photo again classifies it again
  classify(file);
});
const drop = $("drop");
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
  e.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (e) => {
  e.preventDefault();
  drop.classList.remove("over");
}));
drop.addEventListener("drop", (e) => {
  const { photo, note } = chooseOne(e.dataTransfer.files);
  classify(photo, note);
});
checkModel();
