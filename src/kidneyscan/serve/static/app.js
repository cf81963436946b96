// KidneyScan web page: uploads each chosen file to /api/v1/explain and renders the answer.
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

  async function explain(file, card, targetClass) {
    const form = new FormData();
    form.append("file", file);
    if (targetClass) { form.append("target_class", targetClass); }
    card.classList.add("busy");
    let resp;
    try {
      resp = await fetch("api/v1/explain", { method: "POST", body: form, headers: headers() });
    } catch (e) {
      card.classList.remove("busy");
      showError(card, "The service could not be reached: " + e);
      return;
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    card.classList.remove("busy");
    if (!resp.ok || !data) {
      const msg = data && data.error ? data.error.message : "HTTP " + resp.status;
      showError(card, "Not analysed (" + resp.status + "): " + msg);
      return;
    }
    render(card, data.results[0], data);
  }

  function render(card, r, data) {
    card.classList.add("done");
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
    const src = "data:image/png;base64," + ex.image_png;
    card.querySelector(".original").src = src;
    card.querySelector(".input-caption").textContent =
      "Model input (" + ex.size[0] + " x " + ex.size[1] + " px, after preprocessing)";
    card.querySelector(".base").src = src;
    const heat = card.querySelector(".heatmap");
    heat.src = "data:image/png;base64," + ex.heatmap_png;
    heat.dataset.target = ex.target_class;
    card.querySelector(".cam-caption").textContent = "Grad-CAM: evidence for " + ex.target_class;
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
  }

  function newCard(file, group) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.querySelector(".file-name").textContent = file.name;
    card.querySelector(".opacity").addEventListener("input", (ev) => {
      card.querySelector(".heatmap").style.opacity = ev.target.value / 100;
    });
    card.querySelector(".target").addEventListener("change", (ev) => {
      explain(file, card, ev.target.value);
    });
    group.appendChild(card);
    return card;
  }

  async function handle(files) {
    const list = Array.from(files).slice(0, maxFiles);
    previews.replaceChildren();
    list.forEach(addPreview);
    // One request per file, one after the other: results appear as they come and one bad file
    // does not hide the others.
    const group = document.createElement("div");
    group.className = "group";
    results.prepend(group);
    const cards = list.map((f) => newCard(f, group));
    for (let i = 0; i < list.length; i++) {
      await explain(list[i], cards[i]);
    }
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
