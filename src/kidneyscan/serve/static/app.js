// KidneyScan web page: uploads the chosen files to /api/v1/explain in one request and renders
// one card per file (slice with the crop box, crop with Grad-CAM, probabilities) and a list.
// Plain JavaScript, no libraries, nothing loaded from the internet.
(function () {
  "use strict";
  const body = document.body;
  const authRequired = body.dataset.authRequired === "true";
  const maxFiles = parseInt(body.dataset.maxFiles, 10) || 16;
  const dropzone = document.getElementById("dropzone");
  const input = document.getElementById("file-input");
  const previews = document.getElementById("previews");
  const results = document.getElementById("results");
  const template = document.getElementById("card-template");
  const tokenInput = document.getElementById("token");
  let classes = [];

  if (tokenInput) {
    tokenInput.value = sessionStorage.getItem("kidneyscan-token") || "";
    tokenInput.addEventListener("change", () =>
      sessionStorage.setItem("kidneyscan-token", tokenInput.value.trim()));
  }

  function headers() {
    const h = {};
    if (authRequired && tokenInput && tokenInput.value.trim()) {
      h["Authorization"] = "Bearer " + tokenInput.value.trim();
    }
    return h;
  }

  fetch("api/v1/model", { headers: headers() })
    .then((r) => (r.ok ? r.json() : null))
    .then((card) => { if (card) { classes = card.classes; } })
    .catch(() => {});

  function pct(x) { return (100 * x).toFixed(1) + " %"; }

  function addPreview(file) {
    const fig = document.createElement("figure");
    fig.className = "preview";
    if (/\.(png|jpe?g)$/i.test(file.name) || /^image\/(png|jpeg)$/.test(file.type)) {
      const img = document.createElement("img");
      img.src = URL.createObjectURL(file);
      img.alt = "";
      img.onload = () => URL.revokeObjectURL(img.src);
      img.onerror = () => {
        const ph = document.createElement("div");
        ph.className = "ph";
        ph.textContent = "?";
        img.replaceWith(ph);
      };
      fig.appendChild(img);
    } else {
      const ph = document.createElement("div");
      ph.className = "ph";
      ph.textContent = "DICOM";
      fig.appendChild(ph);
    }
    const cap = document.createElement("figcaption");
    cap.textContent = file.name;
    fig.appendChild(cap);
    previews.appendChild(fig);
  }

  function renderBars(container, probabilities, predicted) {
    container.replaceChildren();
    Object.entries(probabilities).sort((a, b) => b[1] - a[1]).forEach(([name, p]) => {
      const row = document.createElement("div");
      row.className = "bar-row" + (name === predicted ? " top" : "");
      row.innerHTML = '<span class="bar-label"></span><span class="bar"><span class="fill"></span></span><span class="bar-value"></span>';
      row.querySelector(".bar-label").textContent = name;
      row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
      row.querySelector(".bar-value").textContent = pct(p);
      container.appendChild(row);
    });
  }

  function showError(card, message) {
    const err = card.querySelector(".error");
    err.hidden = false;
    err.textContent = message;
    card.classList.add("failed");
    card.querySelector(".card-body").hidden = true;
    card.querySelector(".badges").hidden = true;
  }

  async function post(files, targetClass) {
    // One multipart request; every file keeps its place in data.results (index).
    const form = new FormData();
    files.forEach((f) => form.append("file", f));
    if (targetClass) { form.append("target_class", targetClass); }
    const resp = await fetch("api/v1/explain", { method: "POST", body: form, headers: headers() });
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    return { resp, data };
  }

  function failureText(status, message) {
    return "Not analysed (" + status + "): " + message;
  }

  // Re-explain one file for another class (the class selector of its card).
  async function explainOne(file, card, row, targetClass) {
    card.classList.add("busy");
    let out;
    try {
      out = await post([file], targetClass);
    } catch (e) {
      card.classList.remove("busy");
      showError(card, "The service could not be reached: " + e);
      return;
    }
    card.classList.remove("busy");
    const { resp, data } = out;
    if (!resp.ok || !data) {
      const msg = data && data.error ? data.error.message : "HTTP " + resp.status;
      showError(card, failureText(resp.status, msg));
      return;
    }
    render(card, data.results[0], data, row);
  }

  const ROI_LABELS = { spine: "kidney band (spine found)", body: "whole body (spine not found)", full: "whole image (no body found)" };

  // The uploaded slice with the crop box the model used, drawn on a canvas.
  function drawSlice(canvas, src, r) {
    const img = new Image();
    img.onload = () => {
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const roi = r.roi;
      if (!roi) { canvas.dataset.box = "none"; return; }
      const s = r.explanation.slice_scale;
      const x = roi.left * s, y = roi.top * s;
      const w = (roi.right - roi.left) * s, h = (roi.bottom - roi.top) * s;
      const spine = roi.source === "spine";
      const lw = Math.max(2, Math.round(canvas.width / 160));
      ctx.lineWidth = lw;
      ctx.strokeStyle = spine ? "#00e676" : "#ffab00";
      if (!spine) { ctx.setLineDash([4 * lw, 2 * lw]); }
      ctx.strokeRect(x + lw / 2, y + lw / 2, Math.max(1, w - lw), Math.max(1, h - lw));
      canvas.dataset.box = [Math.round(x), Math.round(y), Math.round(w), Math.round(h)].join(",");
      canvas.dataset.source = roi.source;
    };
    img.src = src;
  }

  function render(card, r, data, row) {
    card.classList.remove("failed");
    card.classList.add("done");
    card.querySelector(".card-body").hidden = false;
    card.querySelector(".badges").hidden = false;
    card.querySelector(".error").hidden = true;
    card.querySelector(".predicted-class").textContent = r.predicted_class;
    card.querySelector(".confidence").textContent = pct(r.confidence);
    card.querySelector(".band-text").textContent = r.confidence_band_text;
    const band = card.querySelector(".band");
    band.className = "band band-" + r.confidence_band;
    band.textContent = r.confidence_band;
    const flag = card.querySelector(".flag");
    flag.hidden = !r.refer_to_radiologist;
    flag.title = "Calibrated confidence below " + Math.round(100 * data.refer_threshold) + " %";
    const ex = r.explanation;
    drawSlice(card.querySelector(".slice"), "data:image/png;base64," + ex.slice_png, r);
    const roiNote = card.querySelector(".roi-note");
    const source = r.roi ? r.roi.source : null;
    card.querySelector(".slice-caption").textContent = "Uploaded slice" +
      (source ? ": box = " + ROI_LABELS[source] : " (no crop step: the model saw all of it)");
    roiNote.hidden = !source || source === "spine";
    if (!roiNote.hidden) {
      roiNote.textContent = source === "body"
        ? "Spine not found: the kidney band could not be placed, so the model saw the whole body (less detail on the kidneys). Treat this result with extra caution."
        : "Neither spine nor body outline found: the model saw the whole image. This may not be an abdominal CT slice.";
    }
    const src = "data:image/png;base64," + ex.image_png;
    const stack = card.querySelector(".stack");
    stack.style.aspectRatio = ex.size[1] + " / " + ex.size[0];
    card.querySelector(".base").src = src;
    const heat = card.querySelector(".heatmap");
    heat.src = "data:image/png;base64," + ex.heatmap_png;
    heat.dataset.target = ex.target_class;
    card.querySelector(".cam-caption").textContent = (source ? "Crop the model saw" : "Model input") +
      " (" + ex.size[1] + " x " + ex.size[0] + " px) + Grad-CAM for " + ex.target_class;
    const slider = card.querySelector(".opacity");
    heat.style.opacity = slider.value / 100;
    const select = card.querySelector(".target");
    if (!select.options.length) {
      (classes.length ? classes : Object.keys(r.probabilities)).forEach((c) => {
        const o = document.createElement("option");
        o.value = c; o.textContent = c;
        select.appendChild(o);
      });
    }
    select.value = ex.target_class;
    renderBars(card.querySelector(".bars"), r.probabilities, r.predicted_class);
    const inp = r.input;
    card.querySelector(".meta").textContent =
      inp.type.toUpperCase() + " " + inp.width + " x " + inp.height + " px \u00b7 model " +
      data.model.name + " \u00b7 " + r.timing_ms.inference.toFixed(0) + " ms inference, " +
      (r.timing_ms.gradcam || 0).toFixed(0) + " ms Grad-CAM";
    const warn = card.querySelector(".warnings");
    warn.replaceChildren();
    (r.warnings || []).forEach((w) => {
      const li = document.createElement("li");
      li.textContent = w;
      warn.appendChild(li);
    });
    if (row) {
      row.className = "ok" + (r.refer_to_radiologist ? " refer" : "");
      row.querySelector(".status").textContent = r.predicted_class + " " + pct(r.confidence) +
        (r.refer_to_radiologist ? " \u00b7 refer" : "") + (source && source !== "spine" ? " \u00b7 spine not found" : "");
    }
  }

  function markFailed(card, row, status, message) {
    showError(card, failureText(status, message));
    if (row) {
      row.className = "failed";
      row.querySelector(".status").textContent = "not analysed (" + status + "): " + message;
    }
  }

  let cardCount = 0;

  function newCard(file, group) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.id = "result-" + (++cardCount);
    card.querySelector(".file-name").textContent = file.name;
    card.querySelector(".opacity").addEventListener("input", (ev) => {
      card.querySelector(".heatmap").style.opacity = ev.target.value / 100;
    });
    group.appendChild(card);
    return card;
  }

  function newRow(file, card, list) {
    const li = document.createElement("li");
    li.className = "pending";
    const a = document.createElement("a");
    a.href = "#" + card.id;
    a.textContent = file.name;
    const st = document.createElement("span");
    st.className = "status";
    st.textContent = "analysing...";
    li.append(a, " \u2014 ", st);
    list.appendChild(li);
    return li;
  }

  async function handle(files) {
    const list = Array.from(files).slice(0, maxFiles);
    if (!list.length) { return; }
    previews.replaceChildren();
    list.forEach(addPreview);
    const group = document.createElement("div");
    group.className = "group";
    const summary = document.createElement("ol");
    summary.className = "batch-list";
    summary.setAttribute("aria-label", "Files of this upload");
    group.appendChild(summary);
    results.prepend(group);
    const cards = list.map((f) => newCard(f, group));
    const rows = list.map((f, i) => newRow(f, cards[i], summary));
    cards.forEach((card, i) => card.querySelector(".target").addEventListener("change", (ev) => {
      explainOne(list[i], card, rows[i], ev.target.value);
    }));
    // All files in one request: the service answers per file, so one bad file does not hide
    // the others.
    cards.forEach((c) => c.classList.add("busy"));
    let out;
    try {
      out = await post(list);
    } catch (e) {
      cards.forEach((c, i) => { c.classList.remove("busy"); markFailed(c, rows[i], 0, "the service could not be reached: " + e); });
      return;
    }
    cards.forEach((c) => c.classList.remove("busy"));
    const { resp, data } = out;
    if (!data || !Array.isArray(data.results)) {
      // A whole-request failure (one file, auth, rate limit, size): every file shares it.
      const msg = data && data.error ? data.error.message : "HTTP " + resp.status;
      cards.forEach((c, i) => markFailed(c, rows[i], resp.status, msg));
      return;
    }
    data.results.forEach((r) => {
      const i = r.index;
      if (r.ok === false) {
        markFailed(cards[i], rows[i], r.error.status, r.error.message);
      } else {
        render(cards[i], r, data, rows[i]);
      }
    });
    const ok = data.results.filter((r) => r.ok !== false).length;
    summary.dataset.ok = String(ok);
    summary.dataset.failed = String(data.results.length - ok);
  }

  input.addEventListener("change", () => handle(input.files));
  ["dragenter", "dragover"].forEach((ev) => dropzone.addEventListener(ev, (e) => {
    e.preventDefault();
    dropzone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((ev) => dropzone.addEventListener(ev, (e) => {
    e.preventDefault();
    dropzone.classList.remove("over");
  }));
  dropzone.addEventListener("drop", (e) => handle(e.dataTransfer.files));
  dropzone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { input.click(); }
  });
})();
