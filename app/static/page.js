// ResMem-Net page: scores photos through the service's own API (POST /score, POST /heatmap).
// URLs are relative, so the page also works behind a proxy that serves it under a path prefix.
// No libraries and no external requests. Every text that came from a user or the server is set
// with textContent, never as HTML. Where the service needs an API key (a 401), the page asks for
// one, keeps it in sessionStorage (this tab only) and sends it as `Authorization: Bearer KEY`.
// The score profile selector lists /readyz's profiles (default first); changing it rescores
// every photo with the new profile.
"use strict";

(() => {
  const SCORE_AT_ONCE = 3;   // concurrent /score requests (the server batches them)
  const HEATMAPS_AT_ONCE = 1; // the server computes few heatmaps at a time (503 heatmap_busy beyond)
  const MAX_RETRIES = 5;      // automatic retries of a 503 answer before giving up
  const HEATMAP_URL = "heatmap?format=map&colormap=inferno";
  const KEY_STORE = "resmemnet.apiKey"; // sessionStorage: gone when the tab closes

  const WARNING_TEXT = {
    flat: "Flat or nearly flat image: the model cannot judge it, so the score means little.",
    noise: "Looks like random noise: the score means little.",
    text: "Mostly text: the model was made for photos, so the score means little.",
    low_resolution: "Very low resolution (under 64 px of detail): what the model relies on is missing.",
    upscaled: "Upscaled from a very small image: what the model relies on is missing.",
    multi_frame: "Animated or multi-page file: only the first frame (or page) was scored.",
    truncated_end: "This JPEG lacks its end marker (cut short at the very end); its image data was complete and was scored.",
  };
  const REASON_TEXT = {
    not_an_image: "This file is not an image the service can read.",
    corrupt: "This image is damaged or cut short and cannot be decoded.",
    empty: "This file is empty (0 bytes).",
    upload_too_large: "This file is larger than the service accepts.",
    too_many_pixels: "This image has more pixels than the service accepts.",
    non_finite: "This image holds invalid (NaN or infinite) pixel values.",
    multiple_files: "The service takes one file per request here.",
    unexpected_field: "The service refused a field of the request.",
    invalid_request: "The service refused the request.",
    bad_request: "The service could not read the upload.",
    deadline_exceeded: "The service took too long to answer; it may be busy.",
    queue_full: "The service is busy.",
    heatmap_busy: "The service is busy with other heatmaps.",
    not_ready: "The model is not ready yet.",
    shutting_down: "The service is shutting down.",
    network: "The service could not be reached. Is it still running?",
    unauthorized: "The service needs a valid API key.",
    internal: "The service hit an unexpected error (it was logged on the server).",
  };

  const $ = (selector, root = document) => root.querySelector(selector);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const items = [];
  let nextId = 1;
  let sortOrder = "none"; // "desc", "asc" or "none" (upload order)

  // -- service status ----------------------------------------------------------------------
  let ready = false;
  let polling = false;
  const readyWaiters = [];

  function setStatus(state, text) {
    const el = $("#service-status");
    el.dataset.state = state;
    el.textContent = text;
  }

  async function pollReady() {
    if (polling) return;
    polling = true;
    for (;;) {
      try {
        const r = await fetch("readyz", { cache: "no-store", headers: { Accept: "application/json" } });
        const body = await r.json().catch(() => ({}));
        if (r.ok) {
          const m = body.model || {};
          setStatus("ready", `Ready: model ${m.name} ${m.version} on ${m.device}.`);
          $("#model-line").textContent = `Model ${m.name} ${m.version}, running on ${m.device}.`;
          setProfiles(Array.isArray(body.profiles) ? body.profiles : []);
          ready = true;
          readyWaiters.splice(0).forEach((resolve) => resolve());
          break;
        }
        const phase = (body.error && body.error.message) || `HTTP ${r.status}`;
        setStatus("waiting", `Not ready yet: ${phase}. Photos you add now are scored as soon as it is.`);
      } catch (e) {
        setStatus("down", "Cannot reach the service. Is it still running? Trying again…");
      }
      await sleep(2000);
    }
    polling = false;
  }

  // -- score profiles ----------------------------------------------------------------------
  let profiles = [];

  function currentProfile() {
    return $("#profile").value || "default";
  }

  /** Fill the selector from /readyz's profiles (default first), keeping the choice if it is still there. */
  function setProfiles(list) {
    profiles = list.filter((p) => p && typeof p.name === "string");
    profiles.sort((a, b) => (a.name !== "default") - (b.name !== "default"));
    const select = $("#profile");
    const chosen = select.value;
    select.replaceChildren(...profiles.map((p) => {
      const option = document.createElement("option");
      option.value = p.name;
      option.textContent = p.alias_of ? `${p.name} (same as ${p.alias_of})` : p.name;
      return option;
    }));
    if (profiles.some((p) => p.name === chosen)) select.value = chosen;
    $("#profile-box").hidden = profiles.length < 2;
    showProfileHint();
  }

  function showProfileHint() {
    const p = profiles.find((q) => q.name === currentProfile());
    $("#profile-hint").textContent = p ? (p.description || "") : "";
  }

  function changeProfile() {
    showProfileHint();
    for (const item of items) {
      item.profile = currentProfile();
      processItem(item);
    }
  }

  function withProfile(url, profile) { // default: the plain URL (the service's default too)
    if (profile === "default") return url;
    return `${url}${url.includes("?") ? "&" : "?"}profile=${encodeURIComponent(profile)}`;
  }

  function whenReady() {
    return ready ? Promise.resolve() : new Promise((resolve) => readyWaiters.push(resolve));
  }

  // -- the API key -------------------------------------------------------------------------
  let apiKey = "";
  try { apiKey = sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { /* storage blocked: ask each time */ }
  const keyWaiters = [];

  function authHeaders() {
    return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  }

  /** Show the key form (once, however many requests were refused) and wait for a key. */
  function askForKey(sentKey, message) {
    if (sentKey && sentKey === apiKey) {
      apiKey = "";
      try { sessionStorage.removeItem(KEY_STORE); } catch (e) { /* nothing stored */ }
    }
    if (apiKey) return Promise.resolve(); // a new key came while this request was out: use it
    const form = $("#key-form");
    $("#key-message").textContent = sentKey
      ? `That API key was not accepted (${message}). Enter another one.`
      : "This service needs an API key. Enter yours to score photos.";
    if (form.hidden) {
      form.hidden = false;
      $("#api-key").focus();
    }
    return new Promise((resolve) => keyWaiters.push(resolve));
  }

  function useKey(event) {
    event.preventDefault();
    const input = $("#api-key");
    const key = input.value.trim();
    if (!key) return;
    apiKey = key;
    try { sessionStorage.setItem(KEY_STORE, key); } catch (e) { /* kept in memory only */ }
    input.value = "";
    $("#key-form").hidden = true;
    keyWaiters.splice(0).forEach((resolve) => resolve());
  }

  // -- requests ----------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, reason, message) {
      super(message);
      this.status = status;
      this.reason = reason;
    }
    get retryable() { return this.status === 0 || this.status >= 500; }
  }

  /** A small queue running at most `limit` tasks at once. */
  function limiter(limit) {
    let running = 0;
    const waiting = [];
    const next = () => {
      while (running < limit && waiting.length) {
        const [task, resolve, reject] = waiting.shift();
        running += 1;
        task().then(resolve, reject).finally(() => { running -= 1; next(); });
      }
    };
    return (task) => new Promise((resolve, reject) => { waiting.push([task, resolve, reject]); next(); });
  }
  const scoreSlot = limiter(SCORE_AT_ONCE);
  const heatmapSlot = limiter(HEATMAPS_AT_ONCE);

  /** POST one file as multipart field `file`; 503 answers are retried after Retry-After. */
  async function postFile(url, file, onBusy, onKey) {
    for (let attempt = 1; ; attempt += 1) {
      await whenReady();
      const form = new FormData();
      form.append("file", file, file.name);
      const sentKey = apiKey;
      let r;
      try {
        r = await fetch(url, { method: "POST", body: form, headers: authHeaders() });
      } catch (e) {
        throw new ApiError(0, "network", "no answer from the service");
      }
      if (r.ok) return r;
      const body = await r.json().catch(() => null);
      const err = (body && body.error) || {};
      const reason = err.reason || `http_${r.status}`;
      const message = err.message || r.statusText || `HTTP ${r.status}`;
      if (r.status === 401) {
        if (onKey) onKey();
        await askForKey(sentKey, message);
        attempt -= 1; // a refused key is no busy server: it does not use up a retry
        continue;
      }
      if (r.status === 503 && attempt <= MAX_RETRIES) {
        const wait = Math.min(30, Math.max(1, parseFloat(r.headers.get("Retry-After")) || 1));
        onBusy(reason, message, wait, attempt);
        if (reason === "not_ready") { ready = false; pollReady(); }
        await sleep(wait * 1000);
        continue;
      }
      throw new ApiError(r.status, reason, message);
    }
  }

  // -- one photo ---------------------------------------------------------------------------
  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    $("#results").hidden = false;
    for (const file of files) {
      const item = { id: nextId++, file, name: file.name, profile: currentProfile(), run: 0,
                     score: null, percentile: null, warnings: [],
                     width: null, height: null, reason: "", error: "", status: "queued", retries: 0 };
      item.card = makeCard(item);
      item.row = makeRow(item);
      items.push(item);
      $("#cards").append(item.card);
      $("#table tbody").append(item.row);
      processItem(item);
    }
    applySort();
  }

  function makeCard(item) {
    const card = $("#card-template").content.firstElementChild.cloneNode(true);
    card.id = `photo-${item.id}`;
    $(".card-title", card).textContent = item.name;
    const url = URL.createObjectURL(item.file);
    item.urls = [url];
    const photo = $(".photo", card);
    const base = $(".base", card);
    photo.alt = item.name;
    photo.addEventListener("error", () => {
      $(".photo-fig", card).classList.add("no-preview");
      $(".photo-caption", card).textContent = "No preview: this browser cannot show this file";
      $(".stack", card).classList.add("heat-only");
    });
    photo.src = url;
    base.src = url;
    const heat = $(".heat", card);
    heat.alt = `Grad-RAM heatmap of ${item.name}`;
    const alpha = $(".alpha", card);
    const setAlpha = () => {
      heat.style.opacity = String(alpha.value / 100);
      $(".alpha-value", card).textContent = `${alpha.value}%`;
    };
    alpha.addEventListener("input", setAlpha);
    alpha.setAttribute("aria-label", `Heatmap opacity for ${item.name}`);
    setAlpha();
    $(".retry", card).addEventListener("click", () => item.retry && item.retry());
    return card;
  }

  function makeRow(item) {
    const row = document.createElement("tr");
    row.dataset.id = String(item.id);
    const link = document.createElement("a");
    link.href = `#photo-${item.id}`;
    link.textContent = item.name;
    const cells = ["col-name", "col-score num", "col-pct num", "col-warn", "col-size num", "col-status"].map((cls) => {
      const td = document.createElement("td");
      td.className = cls;
      row.append(td);
      return td;
    });
    cells[0].append(link);
    return row;
  }

  function setProgress(item, status, text) {
    item.status = status;
    item.card.dataset.state = status;
    $(".progress", item.card).textContent = text;
    renderRow(item);
  }

  const onBusyFor = (item) => (reason, message, wait, attempt) => {
    item.retries += 1;
    item.card.dataset.retries = String(item.retries);
    const why = REASON_TEXT[reason] || message;
    setProgress(item, item.status, `${why} Trying again in ${wait} s (attempt ${attempt} of ${MAX_RETRIES})…`);
  };

  const onKeyFor = (item) => () => setProgress(item, item.status, "Waiting for an API key…");

  async function processItem(item) {
    const run = ++item.run; // a newer run (another profile) supersedes this one
    $(".error", item.card).hidden = true;
    setProgress(item, "scoring", "Scoring…");
    try {
      const url = withProfile("score", item.profile);
      const r = await scoreSlot(() => postFile(url, item.file, onBusyFor(item), onKeyFor(item)));
      const body = await r.json();
      if (run !== item.run) return;
      item.score = body.score;
      item.percentile = typeof body.percentile === "number" ? body.percentile : null;
      item.warnings = Array.isArray(body.warnings) ? body.warnings.map(String) : [];
      item.width = body.width;
      item.height = body.height;
      showScore(item);
    } catch (e) {
      if (run === item.run) showError(item, e, () => processItem(item));
      return;
    }
    await loadHeatmap(item, run);
  }

  async function loadHeatmap(item, run = item.run) {
    $(".error", item.card).hidden = true;
    setProgress(item, "heatmap", "Computing the heatmap…");
    try {
      const url0 = withProfile(HEATMAP_URL, item.profile);
      const r = await heatmapSlot(() => postFile(url0, item.file, onBusyFor(item), onKeyFor(item)));
      if (run !== item.run) return;
      const url = URL.createObjectURL(await r.blob());
      item.urls.push(url);
      const heat = $(".heat", item.card);
      await new Promise((resolve, reject) => {
        heat.onload = resolve;
        heat.onerror = () => reject(new ApiError(0, "bad_heatmap", "the heatmap image could not be shown"));
        heat.src = url;
      });
      setProgress(item, "done", "");
    } catch (e) {
      if (run !== item.run) return;
      // The score stands; only the heatmap is missing.
      item.status = "done";
      item.card.dataset.state = "done";
      $(".progress", item.card).textContent = "";
      showErrorBox(item, `The heatmap could not be computed. ${REASON_TEXT[e.reason] || ""}`, e, () => loadHeatmap(item));
      renderRow(item);
    }
  }

  function showScore(item) {
    $(".score", item.card).textContent = item.score.toFixed(3);
    $(".score-label", item.card).textContent = item.profile === "default" ? "Score" : `Score (${item.profile})`;
    item.card.dataset.profile = item.profile;
    if (item.width && !$(".photo-fig", item.card).classList.contains("no-preview")) {
      $(".photo-caption", item.card).textContent = `Photo, ${item.width}×${item.height} px`;
    }
    item.card.dataset.score = String(item.score);
    const pct = $(".percentile", item.card);
    if (item.percentile !== null) {
      pct.textContent = `· ${ordinal(item.percentile)} percentile`;
      pct.title = `higher than ${item.percentile.toFixed(1)}% of a reference set of diverse photos`;
    } else {
      pct.textContent = "";
    }
    const list = $(".warnings", item.card);
    list.replaceChildren(...item.warnings.map((code) => {
      const li = document.createElement("li");
      li.dataset.code = code;
      li.textContent = `⚠ ${WARNING_TEXT[code] || code}`;
      return li;
    }));
    applySort();
  }

  function showError(item, error, retry) {
    item.reason = error.reason || "error";
    item.error = error.message || "";
    setProgress(item, "error", "");
    const text = REASON_TEXT[item.reason] || "The photo could not be scored.";
    showErrorBox(item, `Could not score ${item.name}: ${text}`, error, retry);
    applySort();
  }

  function showErrorBox(item, text, error, retry) {
    const box = $(".error", item.card);
    $(".error-text", box).textContent = text;
    const status = error.status ? `HTTP ${error.status}, ` : "";
    $(".error-detail", box).textContent = `${status}${error.reason}: ${error.message}`;
    const button = $(".retry", box);
    button.hidden = !(error.retryable || error.reason === "bad_heatmap");
    item.retry = retry;
    box.hidden = false;
  }

  function renderRow(item) {
    const [name, score, pct, warnings, size, status] = item.row.children;
    void name;
    score.textContent = item.score === null ? "" : item.score.toFixed(3);
    pct.textContent = item.percentile === null ? "" : item.percentile.toFixed(1);
    warnings.textContent = item.warnings.join(", ");
    size.textContent = item.width ? `${item.width}×${item.height}` : "";
    const labels = { queued: "waiting", scoring: "scoring…", heatmap: "heatmap…", done: "done" };
    status.textContent = item.status === "error" ? `error: ${item.reason}` : (labels[item.status] || item.status);
    item.row.classList.toggle("failed", item.status === "error");
  }

  function ordinal(value) {
    const n = Math.max(0, Math.min(100, Math.round(value)));
    const tens = n % 100;
    const suffix = tens >= 11 && tens <= 13 ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th");
    return `${n}${suffix}`;
  }

  // -- table: sort, CSV, clear -------------------------------------------------------------
  function ordered() {
    if (sortOrder === "none") return items.slice();
    const sign = sortOrder === "desc" ? -1 : 1;
    // Photos without a score (failed, or not scored yet) go last, in upload order.
    return items.slice().sort((a, b) => {
      if (a.score === null || b.score === null) return (a.score === null) - (b.score === null) || a.id - b.id;
      return sign * (a.score - b.score) || a.id - b.id;
    });
  }

  function applySort() {
    const list = ordered();
    $("#table tbody").append(...list.map((item) => item.row));
    $("#cards").append(...list.map((item) => item.card));
    const labels = { none: "Sort by score", desc: "Sorted: highest score first", asc: "Sorted: lowest score first" };
    $("#sort").textContent = labels[sortOrder];
    $("#score-col").setAttribute("aria-sort", { none: "none", desc: "descending", asc: "ascending" }[sortOrder]);
  }

  function csvField(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function toCsv() {
    const header = ["filename", "profile", "score", "percentile", "warnings", "width", "height", "error", "reason"];
    const lines = [header.join(",")];
    for (const item of ordered()) {
      lines.push([item.name, item.profile, item.score === null ? "" : item.score.toFixed(6),
                  item.percentile === null ? "" : item.percentile.toFixed(1), item.warnings.join(";"),
                  item.width ?? "", item.height ?? "", item.error, item.status === "error" ? item.reason : ""]
        .map(csvField).join(","));
    }
    return lines.join("\n") + "\n";
  }

  function download() {
    const url = URL.createObjectURL(new Blob([toCsv()], { type: "text/csv" }));
    const a = document.createElement("a");
    a.href = url;
    a.download = "resmemnet-scores.csv";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function clearAll() {
    for (const item of items) item.urls.forEach((url) => URL.revokeObjectURL(url));
    items.length = 0;
    $("#cards").replaceChildren();
    $("#table tbody").replaceChildren();
    $("#results").hidden = true;
    $("#files").focus();
  }

  // -- wiring ------------------------------------------------------------------------------
  function init() {
    const input = $("#files");
    input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
    const drop = $("#drop");
    // Dropping a file anywhere else would make the browser open it instead of the page.
    ["dragover", "drop"].forEach((type) => document.addEventListener(type, (e) => e.preventDefault()));
    drop.addEventListener("dragenter", () => drop.classList.add("dragging"));
    drop.addEventListener("dragleave", (e) => { if (!drop.contains(e.relatedTarget)) drop.classList.remove("dragging"); });
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("dragging");
      addFiles(e.dataTransfer && e.dataTransfer.files);
    });
    $("#sort").addEventListener("click", () => {
      sortOrder = sortOrder === "desc" ? "asc" : "desc";
      applySort();
    });
    $("#download").addEventListener("click", download);
    $("#clear").addEventListener("click", clearAll);
    $("#key-form").addEventListener("submit", useKey);
    $("#profile").addEventListener("change", changeProfile);
    window.resmemnet = { toCsv }; // for scripts and tests: the CSV the button downloads
    pollReady();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
