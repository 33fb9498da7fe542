/* epvs-bids participant report: interactive viewer (NiiVue) and cluster-by-cluster review.
 *
 * Works from a file:// page: NiiVue is a classic script (<out>/viewer/niivue-<version>.umd.js) and the
 * unit's images come from a classic script setting window.EPVS_VIEWER_DATA (base64 .nii.gz volumes).
 * Decisions are kept in localStorage under meta.storage_key and exported as the Edits JSON
 * (format "epvs-bids-edits", version 1; docs/review.md).
 */
(function () {
  "use strict";

  const meta = JSON.parse(document.getElementById("epvs-review-meta").textContent);
  const REASONS = meta.reasons;
  const byId = (id) => document.getElementById(id);
  const table = byId("review-table");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const rowOf = new Map(rows.map((r) => [Number(r.dataset.cluster), r]));
  const state = loadState();
  let current = null; // cluster id of the selected row
  let addMode = false;
  let nv = null; // the NiiVue instance once the images are loaded
  let layer = {}; // volume name -> index in nv.volumes

  // ------------------------------------------------------------------ state kept in the browser
  function loadState() {
    try {
      const saved = JSON.parse(window.localStorage.getItem(meta.storage_key));
      if (saved && typeof saved.decisions === "object" && Array.isArray(saved.added)) return saved;
    } catch (err) {
      /* nothing saved yet, or storage unavailable */
    }
    return { decisions: {}, added: [], rater: "" };
  }

  function saveState() {
    try {
      window.localStorage.setItem(meta.storage_key, JSON.stringify(state));
    } catch (err) {
      say("Decisions could not be saved in this browser (storage unavailable): export before closing.");
    }
  }

  function say(text) {
    byId("review-message").textContent = text;
  }

  // ------------------------------------------------------------------ table: decisions, sort, filter
  function decisionText(d) {
    if (!d) return "";
    return d.decision === "reject" ? "reject: " + d.reason : d.decision;
  }

  function paintRow(cluster) {
    const row = rowOf.get(cluster);
    if (!row) return;
    const d = state.decisions[cluster];
    row.querySelector(".decision").textContent = decisionText(d);
    row.dataset.decision = d ? d.decision : "";
  }

  function paintProgress() {
    const n = Object.keys(state.decisions).length;
    byId("review-progress").textContent = n + " of " + meta.n_clusters + " reviewed";
    byId("review-progress-bar").value = n;
    const list = byId("review-added");
    list.replaceChildren();
    state.added.forEach((p, i) => {
      const item = document.createElement("li");
      item.textContent = "voxel [" + p.voxel.join(", ") + "], mm [" + p.mm.map((v) => v.toFixed(1)).join(", ") + "] ";
      const go = document.createElement("button");
      go.type = "button";
      go.textContent = "show";
      go.addEventListener("click", () => moveTo(p.mm));
      const drop = document.createElement("button");
      drop.type = "button";
      drop.textContent = "remove";
      drop.addEventListener("click", () => {
        state.added.splice(i, 1);
        saveState();
        paintProgress();
      });
      item.append(go, " ", drop);
      list.append(item);
    });
    byId("review-added-count").textContent = String(state.added.length);
    paintAdded();
  }

  // Added points are drawn in green on NiiVue's drawing layer (a bitmap on the reference's RAS voxel grid).
  function paintAdded() {
    if (!nv || !nv.back) return;
    if (!nv.drawBitmap) nv.createEmptyDrawing();
    const d = nv.back.dimsRAS;
    nv.drawBitmap.fill(0);
    for (const p of state.added) {
      const f = nv.mm2frac(p.mm, 0, true);
      const v = [0, 1, 2].map((a) => Math.min(d[a + 1] - 1, Math.max(0, Math.floor(f[a] * d[a + 1]))));
      nv.drawBitmap[v[0] + v[1] * d[1] + v[2] * d[1] * d[2]] = 2;
    }
    nv.refreshDrawing(true);
  }

  function visibleRows() {
    return Array.from(body.rows).filter((r) => !r.hidden);
  }

  function applyFilters() {
    const region = byId("filter-region").value;
    const minVolume = parseFloat(byId("filter-volume").value) || 0;
    const minScore = parseFloat(byId("filter-score").value) || 0;
    const shape = byId("filter-shape").value;
    const todo = byId("filter-todo").checked;
    let shown = 0;
    for (const row of rows) {
      const d = row.dataset;
      const elongation = parseFloat(d.elongation);
      const ok =
        (region === "" || d.region === region) &&
        !(parseFloat(d.volume) < minVolume) &&
        !(parseFloat(d.score) < minScore) &&
        (shape === "" || (shape === "elongated" ? elongation >= 2 : elongation < 2)) &&
        (!todo || !state.decisions[Number(d.cluster)]);
      row.hidden = !ok;
      shown += ok ? 1 : 0;
    }
    byId("review-shown").textContent = shown + " shown";
  }

  function sortBy(th) {
    const key = th.dataset.sort;
    const numeric = th.dataset.type === "number";
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const value = (row) => {
      const cell = row.cells[th.cellIndex].textContent;
      if (!numeric) return cell;
      const v = parseFloat(key in row.dataset ? row.dataset[key] : cell);
      return Number.isNaN(v) ? -Infinity : v;
    };
    const sorted = rows.slice().sort((a, b) => {
      const va = value(a);
      const vb = value(b);
      const c = numeric ? va - vb : String(va).localeCompare(String(vb));
      return ascending ? c : -c;
    });
    body.append(...sorted);
  }

  // ------------------------------------------------------------------ selection and decisions
  function select(cluster) {
    const row = rowOf.get(cluster);
    if (!row) return;
    if (current !== null && rowOf.get(current)) rowOf.get(current).classList.remove("current");
    current = cluster;
    row.classList.add("current");
    row.scrollIntoView({ block: "nearest" });
    const d = row.dataset;
    byId("review-current").textContent =
      "cluster " + cluster + " (" + d.region + ", " + (parseFloat(d.volume) || 0).toFixed(1) + " mm³)";
    if (d.x !== "") moveTo([parseFloat(d.x), parseFloat(d.y), parseFloat(d.z)]);
  }

  function step(delta) {
    const shown = visibleRows();
    if (!shown.length) return;
    const at = shown.findIndex((r) => Number(r.dataset.cluster) === current);
    const next = at < 0 ? (delta > 0 ? 0 : shown.length - 1) : Math.min(Math.max(at + delta, 0), shown.length - 1);
    select(Number(shown[next].dataset.cluster));
  }

  function mark(decision, reason) {
    if (current === null) {
      say("Select a cluster first (click a row, or press n).");
      return;
    }
    if (decision === null) delete state.decisions[current];
    else state.decisions[current] = decision === "reject" ? { decision, reason } : { decision };
    saveState();
    paintRow(current);
    paintProgress();
    say("cluster " + current + ": " + (decision === null ? "decision cleared" : decisionText(state.decisions[current])));
    if (decision === null) return;
    const shown = visibleRows(); // the next row is taken before the filter may hide the one just decided
    const at = shown.findIndex((r) => Number(r.dataset.cluster) === current);
    const next = at >= 0 && at + 1 < shown.length ? Number(shown[at + 1].dataset.cluster) : null;
    applyFilters();
    if (next !== null) select(next);
  }

  // ------------------------------------------------------------------ added (missed) ePVS
  function apply(m, v) {
    return [0, 1, 2].map((r) => m[r][0] * v[0] + m[r][1] * v[1] + m[r][2] * v[2] + m[r][3]);
  }

  function addPoint(mm) {
    const data = window.EPVS_VIEWER_DATA;
    const voxel = apply(data.inverse_affine, mm).map(Math.round);
    if (voxel.some((v, i) => v < 0 || v >= data.shape[i])) {
      say("That point is outside the image: not added.");
      return;
    }
    const centre = apply(data.affine, voxel).map((v) => Math.round(v * 1000) / 1000);
    if (state.added.some((p) => p.voxel.every((v, i) => v === voxel[i]))) {
      say("Voxel [" + voxel.join(", ") + "] is already added.");
      return;
    }
    state.added.push({ voxel, mm: centre });
    saveState();
    paintProgress();
    say("Added a missed ePVS at voxel [" + voxel.join(", ") + "].");
  }

  function setAddMode(on) {
    addMode = on;
    byId("review-mode").textContent = on ? "ADD MODE: click a missed ePVS (Esc or m to leave)" : "review mode";
    byId("review-mode").classList.toggle("adding", on);
  }

  // ------------------------------------------------------------------ export
  function edits() {
    const rater = byId("review-rater").value.trim();
    const decisions = Object.keys(state.decisions)
      .map(Number)
      .sort((a, b) => a - b)
      .map((cluster) => {
        const d = state.decisions[cluster];
        return d.decision === "reject" ? { cluster, decision: "reject", reason: d.reason } : { cluster, decision: d.decision };
      });
    return {
      format: "epvs-bids-edits",
      format_version: 1,
      rater,
      date: new Date().toISOString().replace(/\.\d{3}Z$/, "Z"),
      software: meta.software,
      model: meta.model,
      unit: meta.unit,
      mask: meta.mask,
      clusters: meta.clusters,
      n_clusters: meta.n_clusters,
      n_reviewed: decisions.length,
      decisions,
      added: state.added.map((p) => ({ voxel: p.voxel, mm: p.mm })),
    };
  }

  function exportReview() {
    const record = edits();
    const tag = record.rater.replace(/[^A-Za-z0-9]/g, "");
    if (!tag) {
      say("Type your name or initials (letters or digits) in the Rater field before exporting.");
      byId("review-rater").focus();
      return;
    }
    const blob = new Blob([JSON.stringify(record, null, 2) + "\n"], { type: "application/json" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = meta.key + "_rater-" + tag + "_edits.json";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
    say("Exported " + record.n_reviewed + " decisions and " + record.added.length + " added points to " + link.download + ".");
  }

  // ------------------------------------------------------------------ viewer
  // NiiVue draws an oblique image on the nearest orthogonal grid: its default "mm" are that grid's, while the cluster
  // table and the Edits JSON use scanner mm (the image's affine). isForceSliceMM = true converts with the affine.
  function scannerMM() {
    return Array.from(nv.frac2mm(nv.scene.crosshairPos, 0, true)).slice(0, 3);
  }

  function showPosition(mm) {
    byId("viewer-position").textContent = "x " + mm[0].toFixed(1) + ", y " + mm[1].toFixed(1) + ", z " + mm[2].toFixed(1) + " mm";
  }

  function moveTo(mm) {
    showPosition(mm);
    if (!nv) return;
    nv.scene.crosshairPos = nv.mm2frac(mm, 0, true);
    centreOn(Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3));
    nv.drawScene();
    nv.createOnLocationChange();
  }

  // NiiVue draws a 2D point p (its display mm) at zoom * p + pan (mm, plus a constant that puts the volume's centre m in the
  // middle at zoom 1 and pan 0), so pan = m - zoom * p puts p in the middle; at zoom 1 the whole brain is shown.
  function centreOn(mm) {
    const zoom = nv.scene.pan2Dxyzmm[3];
    if (zoom <= 1) {
      nv.scene.pan2Dxyzmm = [0, 0, 0, zoom];
      return;
    }
    const m = nv.frac2mm([0.5, 0.5, 0.5]);
    nv.scene.pan2Dxyzmm = [0, 1, 2].map((a) => m[a] - zoom * mm[a]).concat([zoom]);
  }

  function labelColours(n) {
    const palette = [
      [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
      [227, 119, 194], [188, 189, 34], [23, 190, 207], [174, 199, 232], [255, 187, 120], [152, 223, 138],
    ];
    const lut = { R: [0], G: [0], B: [0], A: [0], I: [0] };
    for (let i = 1; i <= n; i++) {
      const c = palette[(i - 1) % palette.length];
      lut.R.push(c[0]);
      lut.G.push(c[1]);
      lut.B.push(c[2]);
      lut.A.push(255);
      lut.I.push(i);
    }
    return lut;
  }

  function overlayOpacity(name) {
    const box = byId("show-" + name);
    return box && box.checked ? parseFloat(byId("overlay-opacity").value) : 0;
  }

  // Every NiiVue call that changes a layer recomposes all layers over the whole volume (slow with software WebGL),
  // so layer settings are written first and applied by one updateGLVolume per animation frame.
  function applyLayerSettings() {
    for (const name of ["clusters", "probability", "regions", "brain"]) {
      if (name in layer) nv.volumes[layer[name]].opacity = overlayOpacity(name);
    }
    const threshold = parseFloat(byId("prob-threshold").value);
    byId("prob-threshold-value").textContent = threshold.toFixed(2);
    const prob = nv.volumes[layer.probability];
    prob.cal_min = Math.max(1, threshold * 255);
    prob.cal_max = 255;
    const ref = nv.volumes[layer.reference];
    const lo = parseFloat(byId("window-low").value);
    const hi = Math.max(parseFloat(byId("window-high").value), lo + 1);
    ref.cal_min = lo;
    ref.cal_max = hi;
    const w = window.EPVS_VIEWER_DATA.window;
    byId("window-value").textContent =
      (w[0] + (lo / 255) * (w[1] - w[0])).toFixed(0) + " to " + (w[0] + (hi / 255) * (w[1] - w[0])).toFixed(0);
  }

  let refreshPending = false;
  function refreshOverlays() {
    if (!nv || refreshPending) return;
    refreshPending = true;
    requestAnimationFrame(() => {
      refreshPending = false;
      applyLayerSettings();
      nv.updateGLVolume();
    });
  }

  function setZoom() {
    const zoom = parseFloat(byId("viewer-zoom").value);
    byId("viewer-zoom-value").textContent = zoom.toFixed(1) + "×";
    if (!nv) return;
    nv.scene.pan2Dxyzmm[3] = zoom;
    centreOn(Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3));
    nv.drawScene();
  }

  async function startViewer() {
    const data = window.EPVS_VIEWER_DATA;
    if (!meta.data) {
      byId("viewer-status").textContent = "The viewer's images could not be prepared: " + meta.viewer_problem;
      return;
    }
    if (!data || data.key !== meta.key) {
      byId("viewer-status").textContent =
        "The viewer's images were not found: keep " + meta.data + " and " + meta.library +
        " beside this report (copy the whole output folder).";
      return;
    }
    if (!window.niivue) {
      byId("viewer-status").textContent = "The viewer library " + meta.library + " was not found beside this report.";
      return;
    }
    const canvas = byId("viewer-canvas");
    if (!canvas.getContext("webgl2")) {
      byId("viewer-status").textContent = "This browser has no WebGL2: the viewer cannot start (the table still works).";
      return;
    }
    const viewer = new niivue.Niivue({
      backColor: [0, 0, 0, 1], show3Dcrosshair: false, isColorbar: false, crosshairWidth: 0.3, crosshairGap: 8,
      crosshairColor: [0.2, 0.9, 1, 0.8], viewModeHotKey: "", clipPlaneHotKey: "", loadingText: "",
      isRadiologicalConvention: false, isNearestInterpolation: true, multiplanarShowRender: 0, // no 3D panel: slow without a GPU; "3D" in View
    });
    await viewer.attachToCanvas(canvas);
    const images = [];
    const load = async (name, colormap, extra) => {
      const image = await niivue.NVImage.loadFromBase64({ base64: data.volumes[name], name: name + ".nii.gz", colormap, ...extra });
      layer[name] = images.length;
      images.push(image);
      return image;
    };
    await load("reference", "gray", { cal_min: 0, cal_max: 255 });
    await load("brain", "blue", { cal_min: 0.5, cal_max: 1, opacity: 0 });
    if (data.volumes.regions) {
      const regions = await load("regions", "gray", { opacity: 0 });
      regions.setColormapLabel(labelColours(Math.max(1, Math.round(regions.global_max || 255))));
    }
    await load("probability", "warm", { cal_min: 128, cal_max: 255, opacity: 0 });
    await load("clusters", "red", { cal_min: 0.5, cal_max: 1, opacity: 0 });
    nv = viewer;
    viewer.volumes = images.slice(); // all layers at once, composed by one update (addVolume updates each time)
    applyLayerSettings();
    viewer.setVolume(images[0], 0);
    viewer.setSliceType(viewer.sliceTypeMultiplanar);
    viewer.onLocationChange = () => showPosition(scannerMM());
    let pressed = false;
    canvas.addEventListener("pointerdown", () => {
      pressed = addMode;
    });
    canvas.addEventListener("pointerup", () => {
      if (!pressed) return;
      pressed = false;
      setTimeout(() => addPoint(scannerMM()), 0);
    });
    window.epvsViewer = viewer; // for tests and the browser console
    paintAdded();
    setZoom();
    byId("viewer-status").textContent = "";
    document.body.dataset.viewer = "ready";
    if (current !== null) select(current);
  }

  // ------------------------------------------------------------------ wiring
  function onKey(event) {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA")) {
      if (event.key === "Escape") target.blur();
      return;
    }
    const key = event.key;
    const digit = "123456".indexOf(key);
    let handled = true;
    if (key === "n" || key === "j") step(1);
    else if (key === "p" || key === "k") step(-1);
    else if (key === "a") mark("accept");
    else if (key === "u") mark("unsure");
    else if (key === "r") mark("reject", byId("review-reason").value);
    else if (digit >= 0) mark("reject", REASONS[digit]);
    else if (key === "0" || key === "Backspace" || key === "Delete") mark(null);
    else if (key === "m") setAddMode(!addMode);
    else if (key === "Escape") setAddMode(false);
    else handled = false;
    if (handled) event.preventDefault();
  }

  function wire() {
    for (const th of table.tHead.rows[0].cells) {
      if (!th.dataset.sort) continue;
      const button = th.querySelector("button");
      button.addEventListener("click", () => sortBy(th));
    }
    body.addEventListener("click", (event) => {
      const row = event.target.closest("tr");
      if (row) select(Number(row.dataset.cluster));
    });
    body.addEventListener("keydown", (event) => {
      const row = event.target.closest("tr");
      if (row && event.key === "Enter") select(Number(row.dataset.cluster));
    });
    for (const id of ["filter-region", "filter-volume", "filter-score", "filter-shape", "filter-todo"]) {
      byId(id).addEventListener("input", applyFilters);
    }
    for (const id of ["show-clusters", "show-probability", "show-regions", "show-brain", "prob-threshold",
                      "overlay-opacity", "window-low", "window-high"]) {
      const el = byId(id);
      if (el) el.addEventListener("input", refreshOverlays);
    }
    byId("viewer-zoom").addEventListener("input", setZoom);
    byId("viewer-plane").addEventListener("input", () => {
      if (nv) nv.setSliceType(Number(byId("viewer-plane").value));
    });
    byId("review-add").addEventListener("click", () => setAddMode(!addMode));
    byId("review-export").addEventListener("click", exportReview);
    byId("review-rater").value = state.rater || "";
    byId("review-rater").addEventListener("input", () => {
      state.rater = byId("review-rater").value;
      saveState();
    });
    byId("review-clear").addEventListener("click", () => {
      if (!window.confirm("Forget every decision and added point of this report in this browser?")) return;
      state.decisions = {};
      state.added = [];
      saveState();
      rows.forEach((r) => paintRow(Number(r.dataset.cluster)));
      paintProgress();
    });
    document.addEventListener("keydown", onKey);
  }

  wire();
  rows.forEach((r) => paintRow(Number(r.dataset.cluster)));
  paintProgress();
  applyFilters();
  startViewer().catch((err) => {
    byId("viewer-status").textContent = "The viewer could not start: " + err;
  });
  window.epvsReview = { edits, state, select, meta };
})();
