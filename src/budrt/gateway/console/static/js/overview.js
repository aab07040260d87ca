// Overview: traffic per model over the last hour (per minute) or day (per 15 minutes), from
// GET /admin/usage/series?group_by=model — which answers with whatever usage the caller may
// read (all, its team's, or its own). Refreshes every 12 s while the tab is visible.

import { api, showError } from "./api.js";
import { buckets, color, destroyChart, drawChart } from "./charts.js";

const WINDOWS = {
  hour: { span: 3600, step: 60 },
  day: { span: 86400, step: 900 },
};
const REFRESH_MS = 12_000;
const MAX_MODELS = 10; // more lines than this are unreadable; the busiest are shown

const root = document.getElementById("overview");
const $ = (selector) => root.querySelector(selector);
const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });

let current = "hour";
let inflight = null; // the AbortController of the request under way

// The window's buckets end with the one now is in, so the newest minute shows as it fills.
function range(win) {
  const { span, step } = WINDOWS[win];
  const end = (Math.floor(Date.now() / 1000 / step) + 1) * step;
  return { start: end - span, end, step };
}

async function load() {
  const { start, end, step } = range(current);
  inflight?.abort();
  const controller = (inflight = new AbortController());
  const query = new URLSearchParams({
    group_by: "model",
    bucket_s: String(step),
    start: new Date(start * 1000).toISOString(),
    end: new Date(end * 1000).toISOString(),
  });
  try {
    const series = await api(`/admin/usage/series?${query}`, { signal: controller.signal });
    if (controller !== inflight) return; // a newer load (window switch) owns the page now
    showError(null);
    render(series.data, start, end, step);
    $("#updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    if (err.name !== "AbortError") showError(err);
  } finally {
    if (controller === inflight) {
      inflight = null;
      $("#loading").hidden = true;
    }
  }
}

// Models by requests in the window, busiest first: a model keeps its colour across charts.
function rankModels(points) {
  const totals = new Map();
  for (const p of points) totals.set(p.group, (totals.get(p.group) ?? 0) + p.requests);
  return [...totals.entries()].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])))
    .map(([model]) => model);
}

// One array per model over every bucket; `empty` fills the buckets the model had no request in.
function perModel(points, models, xs, start, step, value, empty) {
  const index = new Map(models.map((m, i) => [m, i]));
  const out = models.map(() => xs.map(() => empty));
  for (const p of points) {
    const m = index.get(p.group);
    const i = Math.round((p.t - start) / step);
    if (m !== undefined && i >= 0 && i < xs.length) out[m][i] = value(p);
  }
  return out;
}

const label = (model) => (model == null ? "(no model)" : String(model));

function render(points, start, end, step) {
  headline(points, end - start);
  const empty = points.length === 0;
  $("#empty").hidden = !empty;
  $("#charts").hidden = empty;
  const charts = root.querySelectorAll(".chart[data-metric]");
  if (empty) {
    charts.forEach(destroyChart);
    return;
  }
  const ranked = rankModels(points);
  const models = ranked.slice(0, MAX_MODELS);
  const xs = buckets(start, end, step);
  const lines = (value, empty) => perModel(points, models, xs, start, step, value, empty)
    .map((values, i) => ({ label: label(models[i]), values, color: color(i) }));
  // Rates are zero where a model had no request; ratios and percentiles have no value there.
  const rates = {
    requests: lines((p) => p.requests / step, 0),
    tokens: lines((p) => (p.prompt_tokens + p.completion_tokens) / step, 0),
    images: lines((p) => (p.images * 60) / step, 0),
    errors: lines((p) => (100 * p.errors) / p.requests, null),
  };
  const common = { x: xs, step };
  draw("requests", { ...common, series: rates.requests, unit: " req/s" });
  draw("tokens", { ...common, series: rates.tokens, unit: " tok/s" });
  draw("images", { ...common, series: rates.images, unit: " img/min" });
  draw("errors", { ...common, series: rates.errors, unit: "%", axisSuffix: "%" });
  draw("latency", { ...common, series: percentiles(lines, "latency_ms"), unit: " ms" });
  draw("ttft", { ...common, series: percentiles(lines, "ttft_ms"), unit: " ms" });
  const hidden = ranked.length - models.length;
  $('[data-stat="models_note"]').textContent = hidden > 0 ? `${hidden} quieter not charted` : "";
}

// p95 solid and p50 dashed, in the model's colour; models without a value (no time to first
// token for embeddings) are left out of the legend.
function percentiles(lines, field) {
  const p95 = lines((p) => p[`${field}_p95`], null);
  const p50 = lines((p) => p[`${field}_p50`], null);
  return p95.flatMap((s, i) => [
    { ...s, label: `${s.label} p95` },
    { ...p50[i], label: `${p50[i].label} p50`, dash: [5, 4] },
  ]).filter((s) => s.values.some((v) => v != null));
}

function draw(metric, spec) {
  drawChart(root.querySelector(`.chart[data-metric="${metric}"]`), spec);
}

function headline(points, span) {
  const sum = (f) => points.reduce((n, p) => n + f(p), 0);
  const requests = sum((p) => p.requests);
  const tokens = sum((p) => p.prompt_tokens + p.completion_tokens);
  const images = sum((p) => p.images);
  const errors = sum((p) => p.errors);
  const stat = (name, text) => { $(`[data-stat="${name}"]`).textContent = text; };
  stat("requests", compact.format(requests));
  stat("requests_rate", `${number.format(requests / span)} req/s average`);
  stat("tokens", compact.format(tokens));
  stat("tokens_rate", `${number.format(tokens / span)} tok/s average`);
  stat("images", compact.format(images));
  stat("images_rate", `${number.format((images * 60) / span)} img/min average`);
  stat("error_rate", requests ? `${number.format((100 * errors) / requests)}%` : "–");
  stat("errors", `${compact.format(errors)} failed (status ≥ 400)`);
  stat("models", String(new Set(points.map((p) => p.group)).size));
}

function select(win) {
  if (!(win in WINDOWS) || win === current) return;
  current = win;
  for (const tab of root.querySelectorAll("[data-window]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.window === win));
  }
  load();
}

for (const tab of root.querySelectorAll("[data-window]")) {
  tab.addEventListener("click", () => select(tab.dataset.window));
}
// Poll only while someone can see the page; catch up at once when it is shown again.
setInterval(() => { if (!document.hidden && !inflight) load(); }, REFRESH_MS);
document.addEventListener("visibilitychange", () => { if (!document.hidden) load(); });
load();
