// vcid web view: the run list, epoch-indexed charts (uPlot) and live
// updates over server-sent events (/api/v1/events). Everything shown comes
// from /api/v1 as the daemon computed it; nothing is recomputed here.
//
// For tests and scripting, window.vcid exposes the page state and the two
// uPlot instances (charts.vci, charts.metric); chart.data is exactly what is
// drawn: [epochs, one array per (split, layer) stream], null where the
// metric is undefined (a gap), undefined where a stream has no result at
// that epoch (skipped, the line joins its neighbours).
(function () {
  "use strict";

  const CONFIG = JSON.parse(document.getElementById("vcid-config").textContent);
  const METRICS = CONFIG.metrics;
  const COMPANIONS = METRICS.filter((m) => m.name !== "vci");
  const VCI = METRICS.find((m) => m.name === "vci");
  const PALETTE = ["#5794F2", "#73BF69", "#FF9830", "#B877D9", "#F2495C",
    "#E0B400", "#8AB8FF", "#37872D", "#FA6400", "#CA95E5"];
  const CHART_HEIGHT = 260;

  const state = {
    runs: new Map(), // run_id -> run (as /api/v1/runs returns it)
    selected: null, // run_id
    deleted: null, // run_id of the selected run once it was deleted
    history: new Map(), // "split/layer" -> Map(epoch -> result), selected run
    metric: (COMPANIONS.find((m) => m.name === "nc1") || COMPANIONS[0]).name,
    log: null, // null: the metric's default
    filter: "",
    historyRequest: 0,
  };
  const charts = { vci: null, metric: null };
  let hovered = null;
  window.vcid = { state, charts, config: CONFIG };

  const $ = (id) => document.getElementById(id);

  // A DOM element with attributes and children (text is never parsed as HTML).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value == null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-") || key === "title" || key === "role" || key.startsWith("aria-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child == null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmt(v, digits) {
    if (v == null) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
    return v.toFixed(digits == null ? 4 : digits);
  }

  function compact(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e4) return (n / 1e3).toFixed(0) + "k";
    return String(n);
  }

  function ago(ms) {
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function metricInfo(name) {
    return METRICS.find((m) => m.name === name) || VCI;
  }

  function logScale() {
    return state.log == null ? metricInfo(state.metric).log : state.log;
  }

  // ------------------------------------------------------------ fetching

  async function api(path) {
    const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      // The cookie expired or the token changed: back to the login form.
      window.location.reload();
      throw new Error("unauthenticated");
    }
    const body = await response.json();
    if (!response.ok) {
      const error = new Error(body.message || response.statusText);
      error.code = body.code;
      throw error;
    }
    return body;
  }

  async function loadRuns() {
    const body = await api("/api/v1/runs");
    state.runs = new Map(body.runs.map((r) => [r.run_id, r]));
    if (state.selected && !state.runs.has(state.selected)) runGone(state.selected);
    if (!state.selected && !state.deleted) {
      const wanted = hashParams().get("run");
      const pick = wanted && state.runs.has(wanted) ? wanted : (sortedRuns()[0] || {}).run_id;
      if (pick) selectRun(pick);
    }
    renderRuns();
    renderRunHead();
  }

  let runsTimer = null;
  function refreshRunsSoon() {
    if (runsTimer) return;
    runsTimer = setTimeout(() => {
      runsTimer = null;
      loadRuns().catch(showError);
    }, 400);
  }

  async function loadHistory() {
    const id = state.selected;
    if (!id) return;
    const request = ++state.historyRequest;
    const body = await api("/api/v1/runs/" + encodeURIComponent(id) + "/history");
    if (request !== state.historyRequest || id !== state.selected) return;
    state.history = new Map();
    for (const r of body.results) addToHistory(r);
    drawCharts();
  }

  function addToHistory(r) {
    const key = r.split + "/" + r.layer;
    let stream = state.history.get(key);
    if (!stream) {
      stream = new Map();
      state.history.set(key, stream);
    }
    stream.set(r.epoch, r);
  }

  function showError(err) {
    if (err && err.message === "unauthenticated") return;
    setStatus("down", String(err && err.message ? err.message : err));
  }

  // ------------------------------------------------------------ live events

  function setStatus(kind, text) {
    $("status").dataset.state = kind;
    $("status-text").textContent = text || kind;
  }

  let source = null;
  let fallback = null;
  function connect() {
    source = new EventSource("/api/v1/events");
    source.addEventListener("hello", () => {
      // Subscribed: read everything now, so nothing before it is missed.
      clearTimeout(fallback);
      setStatus("live");
      loadRuns().catch(showError);
      if (state.selected) loadHistory().catch(showError);
    });
    source.addEventListener("result", (e) => onResult(JSON.parse(e.data)));
    source.addEventListener("run", (e) => {
      const run = JSON.parse(e.data);
      const known = state.runs.get(run.run_id);
      state.runs.set(run.run_id, Object.assign({ latest: [] }, known || {}, run));
      if (state.deleted === run.run_id) state.deleted = null;
      if (!state.selected && !state.deleted) selectRun(run.run_id);
      renderRuns();
      renderRunHead();
      refreshRunsSoon();
    });
    source.addEventListener("run_deleted", (e) => {
      const id = JSON.parse(e.data).run_id;
      state.runs.delete(id);
      if (id === state.selected) runGone(id);
      renderRuns();
    });
    source.addEventListener("resync", () => {
      loadRuns().catch(showError);
      if (state.selected) loadHistory().catch(showError);
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        setStatus("down", "disconnected");
        // Checks the token (reloads to the login form on 401), then retries.
        setTimeout(() => {
          api("/api/v1/runs").then(connect, () => setTimeout(connect, 3000));
        }, 2000);
      } else {
        setStatus("connecting", "reconnecting");
      }
    };
  }

  function onResult(r) {
    const run = state.runs.get(r.run_id);
    if (run) {
      run.latest = (run.latest || []).filter((l) => l.split !== r.split || l.layer !== r.layer);
      run.latest.push({ split: r.split, layer: r.layer, epoch: r.epoch, vci: r.vci, closed_unix_ms: r.closed_unix_ms });
      run.latest.sort((a, b) => (a.split + "/" + a.layer).localeCompare(b.split + "/" + b.layer));
      run.closed_epochs += 1;
      renderRuns();
    }
    if (r.run_id === state.selected) {
      addToHistory(r);
      drawCharts();
      renderRunHead();
    }
    refreshRunsSoon();
  }

  function runGone(id) {
    state.selected = null;
    state.deleted = id;
    state.history = new Map();
    destroyCharts();
    $("run-view").hidden = true;
    $("empty").hidden = false;
    $("empty").querySelector("h1").textContent = "Run deleted";
    $("empty-text").textContent = "Run \u201c" + id + "\u201d was deleted with its history. Pick another run.";
    writeHash();
  }

  // ------------------------------------------------------------ run list

  function sortedRuns() {
    return [...state.runs.values()].sort((a, b) =>
      b.created_unix_ms - a.created_unix_ms || a.run_id.localeCompare(b.run_id));
  }

  function latestLabel(run, entry) {
    const layers = new Set((run.latest || []).map((l) => l.layer));
    return layers.size > 1 ? entry.split + "/" + entry.layer : entry.split;
  }

  function metadataChips(run) {
    return Object.keys(run.metadata).sort().map((k) =>
      el("span", { class: "chip", title: k + "=" + run.metadata[k] }, k + "=", el("b", { text: run.metadata[k] })));
  }

  function renderRuns() {
    const list = $("runs");
    const filter = state.filter.toLowerCase();
    const runs = sortedRuns().filter((r) => !filter || r.run_id.toLowerCase().includes(filter) ||
      Object.entries(r.metadata).some(([k, v]) => (k + "=" + v).toLowerCase().includes(filter)));
    const items = runs.map((run) => {
      const open = run.open_epochs.length;
      const vci = (run.latest || []).map((l) =>
        el("span", { "data-split": l.split, "data-layer": l.layer, class: "run-latest" },
          latestLabel(run, l) + " ", el("b", { text: fmt(l.vci) })));
      return el("li", {
        class: "run", role: "option", "data-run": run.run_id,
        "aria-selected": run.run_id === state.selected ? "true" : "false",
        onclick: () => selectRun(run.run_id),
      },
      el("div", { class: "run-line" },
        el("span", { class: "run-id", text: run.run_id, title: run.run_id }),
        el("span", { class: "badge " + (run.finished ? "finished" : "live"), "data-finished": String(run.finished) },
          run.finished ? "finished" : "running")),
      el("div", { class: "run-vci", title: "VCI of the latest closed epoch" },
        vci.length ? el("span", { class: "muted" }, "VCI") : el("span", { class: "muted", text: "no closed epoch yet" }), ...vci),
      el("div", { class: "run-facts" },
        el("span", { "data-k": run.num_classes }, "K " + run.num_classes), " \u00b7 ",
        el("span", { "data-d": run.feature_dim }, "d " + run.feature_dim), " \u00b7 ",
        el("span", { "data-closed": run.closed_epochs }, run.closed_epochs + " closed"), " \u00b7 ",
        el("span", { "data-open": open }, open + " open"), " \u00b7 ",
        el("span", { "data-rows": run.rows_ingested, title: run.rows_ingested + " rows" }, compact(run.rows_ingested) + " rows")),
      el("div", { class: "chips" }, ...metadataChips(run)));
    });
    list.replaceChildren(...items);
    $("run-count").textContent = state.runs.size ? String(state.runs.size) : "";
    if (!state.runs.size && !state.deleted) {
      $("empty").hidden = false;
      $("empty").querySelector("h1").textContent = "No runs yet";
    }
  }

  function selectRun(id) {
    if (state.selected === id) return;
    state.selected = id;
    state.deleted = null;
    state.history = new Map();
    destroyCharts();
    $("empty").hidden = true;
    $("run-view").hidden = false;
    writeHash();
    renderRuns();
    renderRunHead();
    loadHistory().catch(showError);
  }

  function renderRunHead() {
    const run = state.runs.get(state.selected);
    if (!run) return;
    $("run-title").textContent = run.run_id;
    const badge = $("run-state");
    badge.className = "badge " + (run.finished ? "finished" : "live");
    badge.textContent = run.finished ? "finished" : "running";
    badge.title = run.finished ? "finished " + new Date(run.finished_unix_ms).toISOString() : "takes pushes";
    $("run-csv").href = "/api/v1/runs/" + encodeURIComponent(run.run_id) + "/history?format=csv";
    $("run-csv").setAttribute("download", run.run_id + "-history.csv");
    $("run-meta").replaceChildren(...metadataChips(run));
    const openText = run.open_epochs.map((o) => o.split + "/" + o.layer + " epoch " + o.epoch + " (" + o.samples + " samples)").join("\n");
    const stat = (label, value, title) => el("div", { title }, el("dt", { text: label }), el("dd", { text: value }));
    $("run-stats").replaceChildren(
      stat("classes K", String(run.num_classes)),
      stat("feature dim d", String(run.feature_dim)),
      stat("rows ingested", compact(run.rows_ingested), run.rows_ingested + " rows"),
      stat("closed epochs", String(run.closed_epochs)),
      stat("open epochs", String(run.open_epochs.length), openText || "none"),
      stat("created", ago(run.created_unix_ms), new Date(run.created_unix_ms).toISOString()),
    );
  }

  // ------------------------------------------------------------ charts

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function streams() {
    return [...state.history.keys()].sort().map((key, i) => ({ key, color: PALETTE[i % PALETTE.length] }));
  }

  // [epochs, ys...]: null = undefined metric (gap), undefined = no result.
  function chartData(metric, log, list) {
    const epochs = new Set();
    for (const s of list) for (const e of state.history.get(s.key).keys()) epochs.add(e);
    const xs = [...epochs].sort((a, b) => a - b);
    const ys = list.map((s) => {
      const stream = state.history.get(s.key);
      return xs.map((e) => {
        const r = stream.get(e);
        if (!r) return undefined;
        const v = r[metric];
        if (v == null || (log && v <= 0)) return null;
        return v;
      });
    });
    return [xs, ...ys];
  }

  function destroyCharts() {
    for (const name of Object.keys(charts)) {
      if (charts[name]) charts[name].destroy();
      charts[name] = null;
    }
    $("chart-vci").replaceChildren();
    $("chart-metric").replaceChildren();
    $("tooltip").hidden = true;
  }

  function epochTicks(u, splits) {
    return splits.map((v) => (Number.isInteger(v) ? String(v) : ""));
  }

  // On a log axis keep the 1, 2, 5 lines of each decade (not all nine).
  function logSplits(u, splits) {
    return splits.map((v) => {
      const m = Math.round(v / Math.pow(10, Math.floor(Math.log10(v) + 1e-9)));
      return m === 1 || m === 2 || m === 5 ? v : null;
    });
  }

  function makeChart(container, metric, log, list, data) {
    const axis = cssVar("--axis");
    const grid = cssVar("--grid");
    const opts = {
      width: Math.max(300, container.clientWidth),
      height: CHART_HEIGHT,
      scales: {
        x: { time: false },
        y: log ? { distr: 3, log: 10 } : { auto: true },
      },
      axes: [
        {
          label: "epoch", stroke: axis, size: 34, labelSize: 20, labelFont: "12px " + cssVar("--sans"),
          font: "11px " + cssVar("--sans"), grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 },
          incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 100000],
          values: epochTicks,
        },
        {
          label: metric.label, stroke: axis, labelSize: 22, labelFont: "12px " + cssVar("--sans"),
          font: "11px " + cssVar("--sans"), size: 58,
          grid: Object.assign({ stroke: grid, width: 1 }, log ? { filter: logSplits } : {}),
          ticks: Object.assign({ stroke: grid, width: 1 }, log ? { filter: logSplits } : {}),
          ...(log ? { filter: logSplits } : {}),
        },
      ],
      series: [{ label: "epoch" }].concat(list.map((s) => ({
        label: s.key,
        stroke: s.color,
        width: 2,
        spanGaps: false,
        points: { size: 5, fill: s.color, stroke: s.color },
      }))),
      cursor: { sync: { key: "vcid" }, y: false, drag: { x: true, y: false }, points: { size: 9 } },
      legend: {
        live: false,
        markers: { width: 0, fill: (u, i) => (i > 0 ? list[i - 1].color : "transparent") },
      },
      hooks: {
        setCursor: [(u) => tooltip(u, metric, log, list)],
        ready: [(u) => {
          u.over.addEventListener("mouseenter", () => { hovered = u; });
          u.over.addEventListener("mouseleave", () => { hovered = null; $("tooltip").hidden = true; });
        }],
      },
    };
    // eslint-disable-next-line no-undef
    const chart = new uPlot(opts, data, container);
    chart.metric = metric.name;
    chart.log = log;
    chart.streams = list.map((s) => s.key);
    return chart;
  }

  function tooltip(u, metric, log, list) {
    if (u !== hovered) return;
    const tip = $("tooltip");
    const idx = u.cursor.idx;
    if (idx == null || u.cursor.left == null || u.cursor.left < 0) {
      tip.hidden = true;
      return;
    }
    const epoch = u.data[0][idx];
    const rows = list.map((s) => {
      const r = state.history.get(s.key).get(epoch);
      const swatch = el("span", { class: "sw" });
      swatch.style.background = s.color;
      const name = el("td", {}, swatch, s.key);
      if (!r) return el("tr", {}, name, el("td", { class: "why", text: "no result this epoch" }));
      const v = r[metric.name];
      if (v == null) {
        const why = (r.notes && r.notes[metric.name]) || "undefined";
        return el("tr", {}, name, el("td", { class: "why", text: "undefined: " + why }));
      }
      const text = String(v) + (log && v <= 0 ? " (not drawn on a log axis)" : "");
      return el("tr", { title: r.samples + " samples" + (r.small_sample ? ", small sample" : "") },
        name, el("td", { class: "v", text }));
    });
    const samples = list.map((s) => state.history.get(s.key).get(epoch)).filter(Boolean);
    const flags = samples.some((r) => r.small_sample) ? " \u00b7 small sample" : "";
    tip.replaceChildren(
      el("h4", { text: metric.label + " \u00b7 epoch " + epoch + flags }),
      el("table", {}, ...rows));
    tip.hidden = false;
    const box = u.over.getBoundingClientRect();
    let x = box.left + u.cursor.left + 16;
    let y = box.top + u.cursor.top + 16;
    if (x + tip.offsetWidth > window.innerWidth - 8) x = box.left + u.cursor.left - tip.offsetWidth - 16;
    if (y + tip.offsetHeight > window.innerHeight - 8) y = box.top + u.cursor.top - tip.offsetHeight - 16;
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  }

  // Creates the charts, or only swaps their data when the streams, metric
  // and scale are unchanged (a new epoch, live).
  function drawChart(name, container, metric, log) {
    const list = streams();
    const data = chartData(metric.name, log, list);
    const keys = list.map((s) => s.key).join("|");
    const chart = charts[name];
    if (chart && chart.metric === metric.name && chart.log === log && chart.streams.join("|") === keys) {
      chart.setData(data);
      return;
    }
    if (chart) chart.destroy();
    container.replaceChildren();
    charts[name] = null;
    if (!list.length) {
      container.append(el("div", { class: "no-data", text: "No closed epoch yet: the chart fills in as epochs close." }));
      return;
    }
    charts[name] = makeChart(container, metric, log, list, data);
  }

  function drawCharts() {
    if (!state.selected) return;
    drawChart("vci", $("chart-vci"), VCI, false);
    const metric = metricInfo(state.metric);
    const log = logScale();
    $("log").checked = log;
    $("metric").value = metric.name;
    $("metric-hint").textContent = metric.log ? "spans orders of magnitude: log scale by default" : "";
    drawChart("metric", $("chart-metric"), metric, log);
  }

  // ------------------------------------------------------------ URL state

  function hashParams() {
    return new URLSearchParams(window.location.hash.slice(1));
  }

  function writeHash() {
    const p = new URLSearchParams();
    if (state.selected) p.set("run", state.selected);
    p.set("metric", state.metric);
    if (state.log != null) p.set("log", state.log ? "1" : "0");
    history.replaceState(null, "", "#" + p.toString());
  }

  // ------------------------------------------------------------ start

  function init() {
    const params = hashParams();
    if (params.get("metric") && COMPANIONS.some((m) => m.name === params.get("metric"))) state.metric = params.get("metric");
    if (params.has("log")) state.log = params.get("log") === "1";
    const select = $("metric");
    select.replaceChildren(...COMPANIONS.map((m) => el("option", { value: m.name, text: m.label })));
    select.value = state.metric;
    select.addEventListener("change", () => {
      state.metric = select.value;
      state.log = null;
      writeHash();
      drawCharts();
    });
    $("log").addEventListener("change", (e) => {
      state.log = e.target.checked;
      writeHash();
      drawCharts();
    });
    $("run-filter").addEventListener("input", (e) => {
      state.filter = e.target.value;
      renderRuns();
    });
    $("logout").hidden = !CONFIG.auth;
    new ResizeObserver(() => {
      for (const [name, id] of [["vci", "chart-vci"], ["metric", "chart-metric"]]) {
        const chart = charts[name];
        if (chart) chart.setSize({ width: Math.max(300, $(id).clientWidth), height: CHART_HEIGHT });
      }
    }).observe(document.querySelector(".main"));
    // Rows and open epochs change with every batch; refresh them now and then.
    setInterval(() => { if (!document.hidden) loadRuns().catch(showError); }, 5000);
    // The first read happens on the event stream's "hello"; without one
    // (a proxy that holds the stream back), read anyway.
    fallback = setTimeout(() => loadRuns().catch(showError), 2000);
    connect();
  }

  init();
})();
