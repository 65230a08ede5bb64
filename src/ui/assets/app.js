// cifar-df dashboard: runs, live curves, test results, confusion, SQL. Settings live in
// the URL's hash, so a reload (or a shared link) shows the same view.
"use strict";

const METRICS = ["acc", "loss", "precision", "recall", "f1", "acc_mean", "loss_mean",
  "precision_mean", "recall_mean", "f1_mean", "acc_window", "loss_window",
  "precision_window", "recall_window", "f1_window", "images_per_s"];
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const $ = (id) => document.getElementById(id);

const state = { filter: "", runs: [], metric: "acc", x: "batch", smooth: 0, cm: "", cell: "",
  sql: $("sql").value };
let knownRuns = [];
let runsKey = null;
let resultsKey = null;
let chart = null;
let chartKey = null;
let chartDrift = [];

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.has("filter")) state.filter = h.get("filter");
  if (h.has("runs")) state.runs = h.get("runs").split(",").filter((r) => r);
  if (METRICS.includes(h.get("metric"))) state.metric = h.get("metric");
  if (["batch", "images", "time"].includes(h.get("x"))) state.x = h.get("x");
  if (h.has("smooth")) state.smooth = Math.min(0.99, Math.max(0, +h.get("smooth") || 0));
  if (h.has("cm")) state.cm = h.get("cm");
  if (/^\d+,\d+$/.test(h.get("cell") || "")) state.cell = h.get("cell");
  if (h.has("sql")) state.sql = h.get("sql");
}

function writeHash() {
  const h = new URLSearchParams();
  if (state.filter) h.set("filter", state.filter);
  if (state.runs.length) h.set("runs", state.runs.join(","));
  h.set("metric", state.metric);
  h.set("x", state.x);
  if (state.smooth) h.set("smooth", state.smooth);
  if (state.cm) h.set("cm", state.cm);
  if (state.cell) h.set("cell", state.cell);
  h.set("sql", state.sql);
  history.replaceState(null, "", "#" + h.toString());
}

async function getJson(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({ error: "not JSON (HTTP " + r.status + ")" }));
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}

const fmtTime = (ms) => (ms ? new Date(ms).toLocaleString() : "");
const fmtNum = (v, d = 4) => (v === null || v === undefined ? "" : (+v).toFixed(d));

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

async function loadRuns() {
  let body;
  try {
    body = await getJson("/api/runs?filter=" + encodeURIComponent(state.filter));
    $("filter-error").textContent = "";
  } catch (e) {
    $("filter-error").textContent = e.message;
    return;
  }
  knownRuns = body.runs;
  $("runs-note").textContent = body.note || "";
  // Runs chosen before: kept; with none chosen, the newest.
  const names = knownRuns.map((r) => r.run);
  if (!state.runs.length && names.length) state.runs = [names[0]];
  // Unchanged (the same runs, state and choice): the table is left as it is.
  const key = JSON.stringify([body.runs, state.runs]);
  if (key === runsKey) return;
  runsKey = key;
  const tbody = $("runs").tBodies[0];
  tbody.replaceChildren();
  for (const r of knownRuns) {
    const tr = document.createElement("tr");
    tr.dataset.run = r.run;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = state.runs.includes(r.run);
    box.addEventListener("change", () => {
      state.runs = box.checked ? [...state.runs, r.run] : state.runs.filter((x) => x !== r.run);
      writeHash();
      loadCurves();
    });
    const c = el("td"); c.append(box); tr.append(c);
    tr.append(el("td", r.run), el("td", r.status, "status-" + r.status), el("td", r.model),
      el("td", r.images, "num"), el("td", fmtNum(r.test_acc), "num"),
      el("td", fmtTime(r.start_ms)), el("td", fmtTime(r.end_ms)));
    if (r.error) tr.title = r.error;
    tbody.append(tr);
  }
  const sel = $("confusion-run");
  const keep = state.cm || sel.value;
  sel.replaceChildren(...names.map((n) => el("option", n)));
  if (names.includes(keep)) sel.value = keep;
  else if (names.length) sel.value = names[0];
}

function smooth(ys, a) {
  if (!a) return ys;
  let s = null;
  return ys.map((v) => {
    if (v === null) return null;
    s = s === null ? v : a * s + (1 - a) * v;
    return s;
  });
}

let curvesSeq = 0;
let curvesSql = "";
async function loadCurves(range) {
  const runs = state.runs.filter((r) => knownRuns.some((k) => k.run === r));
  const seq = ++curvesSeq;
  const width = Math.max(400, Math.min(1400, window.innerWidth - 60));
  curvesSql = "select * from metrics where run in (" +
    runs.map((r) => "'" + r.replace(/'/g, "''") + "'").join(",") + ") order by run, batch";
  if (!runs.length) {
    $("curves-note").textContent = "Choose runs above to draw their curves.";
    if (chart) { chart.destroy(); chart = null; }
    return;
  }
  let q = "/api/curves?run=" + encodeURIComponent(runs.join(",")) + "&metric=" + state.metric +
    "&x=" + state.x + "&points=" + width;
  if (range) q += "&from=" + range[0] + "&to=" + range[1];
  let body;
  try {
    body = await getJson(q);
  } catch (e) {
    $("curves-note").textContent = e.message;
    return;
  }
  if (seq !== curvesSeq) return; // a newer request is on its way
  // One x axis for all runs: the union of their x values.
  const xs = Array.from(new Set(body.curves.flatMap((c) => c.x))).sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const data = [xs];
  const series = [{ label: state.x }];
  body.curves.forEach((c, i) => {
    const ys = new Array(xs.length).fill(null);
    const sm = smooth(c.y, state.smooth);
    c.x.forEach((x, k) => { ys[index.get(x)] = sm[k]; });
    data.push(ys);
    series.push({ label: c.run, stroke: COLOURS[i % COLOURS.length],
      width: 1.5, spanGaps: true, points: { show: false } });
  });
  const drift = body.curves.flatMap((c) => c.drift);
  chartDrift = drift;
  $("curves-note").textContent = body.curves.map((c) => c.run + ": " + c.total + " batches").join(" · ") +
    (drift.length ? " · drift alarms: " + drift.length + " (dashed lines)" : "");
  const opts = {
    width, height: 320, series,
    scales: { x: { time: state.x === "time" } },
    axes: [{}, { label: state.metric }],
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.strokeStyle = "#c00";
        ctx.setLineDash([4, 4]);
        for (const d of chartDrift) {
          const px = u.valToPos(state.x === "time" ? d / 1000 : d, "x", true);
          ctx.beginPath(); ctx.moveTo(px, u.bbox.top); ctx.lineTo(px, u.bbox.top + u.bbox.height); ctx.stroke();
        }
        ctx.restore();
      }],
      setSelect: [(u) => {
        if (u.select.width < 5) return;
        const a = u.posToVal(u.select.left, "x"), b = u.posToVal(u.select.left + u.select.width, "x");
        const k = state.x === "time" ? 1000 : 1;
        loadCurves([a * k, b * k]);
      }],
    },
  };
  if (state.x === "time") data[0] = data[0].map((v) => v / 1000);
  // The same runs, metric, axis and zoom as drawn: new points only (no new chart).
  const key = JSON.stringify([runs, state.metric, state.x, range || null, width]);
  if (chart && key === chartKey) {
    chart.setData(data);
  } else {
    if (chart) chart.destroy();
    chart = new uPlot(opts, data, $("chart"));
    chartKey = key;
  }
  chart.root.dataset.points = String(xs.length);
}

async function loadResults() {
  let body;
  try {
    body = await getJson("/api/results?filter=" + encodeURIComponent(state.filter));
  } catch (e) {
    $("results-note").textContent = e.message;
    return;
  }
  const key = JSON.stringify(body.results);
  if (key === resultsKey) return;
  resultsKey = key;
  const tbody = $("results").tBodies[0];
  tbody.replaceChildren();
  for (const r of body.results) {
    const tr = document.createElement("tr");
    const bar = el("span", undefined, "bar");
    bar.style.width = Math.round(200 * (r.acc || 0)) + "px";
    const b = el("td"); b.append(bar);
    tr.append(el("td", r.run), el("td", r.images, "num"), el("td", fmtNum(r.acc), "num"), b,
      el("td", fmtNum(r.loss), "num"), el("td", fmtNum(r.f1), "num"));
    tbody.append(tr);
  }
  $("results-note").textContent = body.results.length ? "" : "No test results yet.";
}

let confusion = null;
async function loadConfusion() {
  const run = $("confusion-run").value;
  const canvas = $("confusion");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  confusion = null;
  if (!run) return;
  let body;
  try {
    body = await getJson("/api/confusion?run=" + encodeURIComponent(run));
  } catch (e) {
    $("cell").textContent = e.message;
    return;
  }
  const k = body.counts.length;
  if (!k) { $("cell").textContent = "No test predictions for " + run + "."; return; }
  confusion = body;
  const cell = canvas.width / k;
  for (let a = 0; a < k; a++) {
    const total = body.counts[a].reduce((s, v) => s + v, 0) || 1;
    for (let p = 0; p < k; p++) {
      const f = body.counts[a][p] / total;
      ctx.fillStyle = `rgb(${255 - Math.round(200 * f)},${255 - Math.round(120 * f)},255)`;
      ctx.fillRect(p * cell, a * cell, Math.ceil(cell), Math.ceil(cell));
      if (cell >= 24 && body.counts[a][p]) {
        ctx.fillStyle = "#000";
        ctx.font = Math.min(12, cell / 3) + "px sans-serif";
        ctx.fillText(String(body.counts[a][p]), p * cell + 3, a * cell + cell / 2 + 4);
      }
    }
  }
  canvas.dataset.classes = String(k);
  $("cell").textContent = "rows: actual, columns: predicted (" + k + " classes). Click a cell." +
    (body.note ? " " + body.note + "." : "");
}

// Hovering a cell names it (the heatmap has no room for the class names of many classes).
// The heatmap cell under the mouse: [actual, predicted], or null.
function cellAt(ev) {
  if (!confusion) return null;
  const k = confusion.counts.length, r = ev.target.getBoundingClientRect();
  const p = Math.floor((ev.clientX - r.left) / (r.width / k));
  const a = Math.floor((ev.clientY - r.top) / (r.height / k));
  return a < 0 || p < 0 || a >= k || p >= k ? null : [a, p];
}
const className = (i) => confusion.classes[i] || String(i);

$("confusion").addEventListener("mousemove", (ev) => {
  const c = cellAt(ev);
  if (!c) return;
  const [a, p] = c;
  ev.target.title = `actual ${className(a)}, predicted ${className(p)}: ${confusion.counts[a][p]}`;
});

$("confusion").addEventListener("click", (ev) => {
  const c = cellAt(ev);
  if (!c) return;
  const [a, p] = c;
  $("cell").textContent = `actual ${className(a)}, predicted ${className(p)}: ${confusion.counts[a][p]} images`;
  state.cell = a + "," + p;
  loadGallery();
  state.sql = `select batch, "row", label, predicted, p_max from predictions where run = '${confusion.run.replace(/'/g, "''")}' and split = 'test' and label = ${a} and predicted = ${p} order by p_max desc`;
  $("sql").value = state.sql;
  writeHash();
  runSql();
});

// The gallery: the test images the chosen run gets wrong (or one confusion cell's), most
// confident first, with their true and predicted class.
let gallerySeq = 0;
async function loadGallery() {
  const run = $("confusion-run").value;
  const seq = ++gallerySeq;
  $("gallery-all").hidden = !state.cell;
  if (!run) { $("gallery").replaceChildren(); $("gallery-note").textContent = ""; return; }
  let q = "/api/gallery?run=" + encodeURIComponent(run) + "&limit=60";
  const [a, p] = state.cell ? state.cell.split(",") : [];
  if (state.cell) q += "&label=" + a + "&predicted=" + p;
  let body;
  try {
    body = await getJson(q);
  } catch (e) {
    $("gallery-note").textContent = e.message;
    return;
  }
  if (seq !== gallerySeq) return;
  const what = !state.cell ? "wrong" : a === p ? "right in one class" : "in one confusion cell";
  $("gallery-title").textContent = (a === p && state.cell ? "Right on test" : "Wrong on test") +
    " · " + run;
  $("gallery-note").textContent = body.matching + " images " + what +
    (body.images.length < body.matching ? ", the " + body.images.length + " most confident shown" : "") +
    (body.images_note ? " · " + body.images_note : "");
  const figs = body.images.map((g) => {
    const f = el("figure");
    f.dataset.index = g.index;
    if (g.src) {
      const img = document.createElement("img");
      img.src = g.src;
      img.alt = g.label_name + " taken for " + g.predicted_name;
      f.append(img);
    }
    const cap = el("figcaption", g.label_name + " → " + g.predicted_name);
    f.title = "image " + g.index + ": " + g.label_name + ", predicted " + g.predicted_name +
      " (p " + fmtNum(g.p_max, 3) + ")";
    f.append(cap, el("div", "p " + fmtNum(g.p_max, 2), "note"));
    return f;
  });
  $("gallery").replaceChildren(...figs);
}

// SQL goes by POST as JSON (a page of another site cannot send that without asking), and
// only when a person presses Run: SQL in the page's address fills the box, never runs.
function sqlRequest(sql) {
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ q: sql }) };
}

async function downloadCsv(sql, errorBox) {
  const r = await fetch("/api/sql.csv", sqlRequest(sql));
  if (!r.ok) {
    const body = await r.json().catch(() => ({ error: "HTTP " + r.status }));
    $(errorBox).textContent = body.error || ("HTTP " + r.status);
    return;
  }
  $(errorBox).textContent = "";
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = "query.csv";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function runSql() {
  state.sql = $("sql").value;
  writeHash();
  $("sql-note").textContent = "";
  let body;
  try {
    body = await getJson("/api/sql", sqlRequest(state.sql));
    $("sql-error").textContent = "";
  } catch (e) {
    $("sql-error").textContent = e.message;
    $("sql-result").replaceChildren();
    return;
  }
  const table = document.createElement("table");
  table.id = "sql-table";
  const head = document.createElement("tr");
  body.columns.forEach((c) => head.append(el("th", c)));
  table.append(head);
  for (const row of body.rows) {
    const tr = document.createElement("tr");
    row.forEach((v) => tr.append(el("td", v === null ? "" : String(v))));
    table.append(tr);
  }
  const note = el("div", body.total + " rows" + (body.truncated ? " (first " + body.rows.length + " shown; the CSV has all)" : ""), "note");
  $("sql-result").replaceChildren(note, table);
}

let refreshTimer = null;
let shownKey = null;
function refresh() {
  // Coalesce bursts of change events into one refresh.
  if (refreshTimer) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    await loadRuns();
    await loadCurves();
    await loadResults();
    // The confusion matrix and gallery change when their run's test pass does: while
    // another run trains they are not asked for again.
    const run = $("confusion-run").value;
    const r = knownRuns.find((k) => k.run === run);
    const key = r ? [run, r.status, r.end_ms, r.test_acc].join("|") : "";
    if (key !== shownKey) {
      shownKey = key;
      await loadConfusion();
      await loadGallery();
    }
  }, 200);
}

function init() {
  readHash();
  $("metric").replaceChildren(...METRICS.map((m) => el("option", m)));
  $("metric").value = state.metric;
  $("xaxis").value = state.x;
  $("smooth").value = state.smooth;
  $("smooth-v").textContent = state.smooth;
  $("filter").value = state.filter;
  $("sql").value = state.sql;
  $("filter").addEventListener("input", () => { state.filter = $("filter").value; writeHash(); refresh(); });
  $("metric").addEventListener("change", () => { state.metric = $("metric").value; writeHash(); loadCurves(); });
  $("xaxis").addEventListener("change", () => { state.x = $("xaxis").value; writeHash(); loadCurves(); });
  $("smooth").addEventListener("input", () => {
    state.smooth = +$("smooth").value; $("smooth-v").textContent = state.smooth; writeHash(); loadCurves();
  });
  $("confusion-run").addEventListener("change", () => {
    state.cm = $("confusion-run").value; state.cell = ""; writeHash(); loadConfusion(); loadGallery();
  });
  $("gallery-all").addEventListener("click", (ev) => {
    ev.preventDefault(); state.cell = ""; writeHash(); loadGallery();
  });
  $("sql-run").addEventListener("click", runSql);
  $("sql-csv").addEventListener("click", () => { state.sql = $("sql").value; writeHash(); downloadCsv(state.sql, "sql-error"); });
  $("curves-csv").addEventListener("click", () => { if (curvesSql) downloadCsv(curvesSql, "curves-note"); });
  $("sql-note").textContent = "press Run to run the query";
  writeHash();
  refresh();
  const events = new EventSource("/api/events");
  events.addEventListener("change", (e) => {
    $("live").textContent = "live (update " + e.data + ")";
    refresh();
  });
  events.onerror = () => { $("live").textContent = "reconnecting…"; };
}

init();
