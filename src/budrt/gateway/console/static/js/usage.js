// Usage: the last 30 UTC days per model, user, team or key (GET /admin/usage/series, one bucket
// a day), totals per group (GET /admin/usage for callers who read a team's or everyone's usage,
// GET /v1/usage for the others), budget bars for the keys, users and teams the caller may list,
// and the daily series as a CSV download.

import { api, can, el, principal, showError } from "./api.js";
import { buckets, color, destroyChart, drawChart } from "./charts.js";

const DAY = 86400;
const DAYS = 30;
const MAX_GROUPS = 8; // the busiest groups get their own colour; the rest stack as "other"
const OTHER_COLOR = "#adb5bd";
const readsReports = Boolean(can["usage:read:all"] || can["usage:read:team"]);
const GROUP_NAMES = { model: "Model", user: "User", team: "Team", key: "Key" };
const BUDGETS = [
  ["tokens_per_day", "Tokens per day", "day", "total_tokens"],
  ["tokens_per_month", "Tokens per month", "month", "total_tokens"],
  ["images_per_day", "Images per day", "day", "images"],
  ["images_per_month", "Images per month", "month", "images"],
];

const root = document.getElementById("usage");
const $ = (selector) => root.querySelector(selector);
const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const percent = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

const state = { groupBy: "model", points: [], start: 0, end: 0 };
let directory = { keys: null, users: null, teams: null }; // what the caller may list, else null

// 30 whole UTC days ending with today's.
function window30() {
  const end = (Math.floor(Date.now() / 1000 / DAY) + 1) * DAY;
  return { start: end - DAYS * DAY, end };
}

const iso = (seconds) => new Date(seconds * 1000).toISOString();

// -- names --

// A listing the caller may not read (403) is simply absent: the API decides, not this page.
async function listing(path, allowed) {
  if (!allowed) return null;
  try {
    return (await api(path)).data;
  } catch (err) {
    if (err.status === 403) return null;
    throw err;
  }
}

async function loadDirectory() {
  // A team reader usually lists its team's keys and members through scoped grants
  // (keys:list@team:x), which `can` (checked on "*") does not show.
  const [keys, users, teams] = await Promise.all([
    listing("/admin/keys", can["keys:list"] || can["usage:read:team"]),
    listing("/admin/users", can["users:list"] || can["usage:read:team"]),
    listing("/admin/teams", can["teams:list"]),
  ]);
  directory = { keys, users, teams };
}

function groupLabel(groupBy, value) {
  if (value === null || value === undefined) return groupBy === "key" ? "(no key)" : `(no ${groupBy})`;
  if (groupBy !== "key") return String(value);
  const key = directory.keys?.find((k) => k.id === value);
  if (key) return `${key.name} (#${value})`;
  if (principal.kind === "key" && !readsReports) return `${principal.name} (#${value})`; // its own
  return `key #${value}`;
}

// -- loading --

async function loadUsage() {
  const { start, end } = window30();
  const groupBy = state.groupBy;
  const range = { start: iso(start), end: iso(end) };
  const seriesQuery = new URLSearchParams({ group_by: groupBy, bucket_s: String(DAY), ...range });
  const [series, report] = await Promise.all([
    api(`/admin/usage/series?${seriesQuery}`),
    totalsReport(groupBy, range),
  ]);
  if (groupBy !== state.groupBy) return; // the selector moved on meanwhile
  Object.assign(state, { points: series.data, start, end });
  renderCharts();
  renderTotals(report);
  $("#export-csv").disabled = state.points.length === 0;
}

// Rows keyed by the group's value, or null to sum the series instead (own usage per user etc.).
async function totalsReport(groupBy, range) {
  if (readsReports) {
    const query = new URLSearchParams({ group_by: groupBy, ...range });
    return (await api(`/admin/usage?${query}`)).data;
  }
  if (groupBy === "model") {
    const rows = (await api(`/v1/usage?${new URLSearchParams(range)}`)).data;
    return rows.map((r) => ({ ...r, [groupBy]: r.model }));
  }
  return null;
}

// -- charts --

// Groups by tokens then requests over the window, busiest first.
function rankGroups(points) {
  const totals = new Map();
  for (const p of points) {
    const t = totals.get(p.group) ?? [0, 0];
    totals.set(p.group, [t[0] + p.prompt_tokens + p.completion_tokens, t[1] + p.requests]);
  }
  return [...totals.entries()].sort((a, b) => b[1][0] - a[1][0] || b[1][1] - a[1][1]).map(([g]) => g);
}

function dailySeries(points, groups, xs, value) {
  const shown = groups.slice(0, MAX_GROUPS);
  const index = new Map(shown.map((g, i) => [g, i]));
  const rest = groups.length - shown.length;
  const rows = [...shown.map(() => xs.map(() => 0)), ...(rest > 0 ? [xs.map(() => 0)] : [])];
  for (const p of points) {
    const i = Math.round((p.t - state.start) / DAY);
    if (i < 0 || i >= xs.length) continue;
    rows[index.get(p.group) ?? shown.length][i] += value(p);
  }
  const series = shown.map((g, k) => ({ label: groupLabel(state.groupBy, g), values: rows[k], color: color(k) }));
  if (rest > 0) series.push({ label: `other (${rest})`, values: rows[shown.length], color: OTHER_COLOR });
  return series;
}

function renderCharts() {
  const empty = state.points.length === 0;
  $("#empty").hidden = !empty;
  $("#charts").hidden = empty;
  const tokens = $('.chart[data-metric="tokens"]');
  const requests = $('.chart[data-metric="requests"]');
  if (empty) {
    destroyChart(tokens);
    destroyChart(requests);
    return;
  }
  const groups = rankGroups(state.points);
  const xs = buckets(state.start, state.end, DAY);
  const common = { x: xs, step: DAY, bars: true, stacked: true, utc: true };
  drawChart(tokens, {
    ...common,
    series: dailySeries(state.points, groups, xs, (p) => p.prompt_tokens + p.completion_tokens),
    unit: " tokens",
  });
  drawChart(requests, { ...common, series: dailySeries(state.points, groups, xs, (p) => p.requests), unit: " req" });
}

// -- totals table --

const COUNTS = ["requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "images", "cache_hits"];

// The report's rows with the series' error counts added, or the series summed when there is
// no report (cache hits are then unknown).
function totalsRows(report) {
  const fromSeries = new Map();
  for (const p of state.points) {
    const key = String(p.group);
    const row = fromSeries.get(key) ?? { group: p.group, requests: 0, errors: 0, prompt_tokens: 0,
      completion_tokens: 0, total_tokens: 0, images: 0, cache_hits: null };
    row.requests += p.requests;
    row.errors += p.errors;
    row.prompt_tokens += p.prompt_tokens;
    row.completion_tokens += p.completion_tokens;
    row.total_tokens += p.prompt_tokens + p.completion_tokens;
    row.images += p.images;
    fromSeries.set(key, row);
  }
  const rows = report === null ? [...fromSeries.values()]
    : report.map((r) => ({ ...r, group: r[state.groupBy], errors: fromSeries.get(String(r[state.groupBy]))?.errors ?? 0 }));
  return rows.sort((a, b) => b.total_tokens - a.total_tokens || b.requests - a.requests);
}

function renderTotals(report) {
  const name = GROUP_NAMES[state.groupBy];
  $("#totals-title").textContent = `Totals per ${name.toLowerCase()}, last ${DAYS} days`;
  $('#totals th[data-col="group"]').textContent = name;
  const rows = totalsRows(report);
  const cell = (v) => el("td", { class: "num" }, v === null || v === undefined ? "–" : number.format(v));
  $("#totals tbody").replaceChildren(
    ...(rows.length ? rows.map((r) => el("tr", {}, el("td", { class: "name" }, groupLabel(state.groupBy, r.group)),
      ...COUNTS.map((c) => cell(r[c]))))
      : [el("tr", {}, el("td", { colspan: COUNTS.length + 1, class: "muted" }, "No usage in this window."))]),
  );
  const sum = (c) => (rows.some((r) => r[c] === null) ? null : rows.reduce((n, r) => n + (r[c] ?? 0), 0));
  $("#totals tfoot").replaceChildren(
    ...(rows.length > 1 ? [el("tr", {}, el("td", {}, "Total"), ...COUNTS.map((c) => cell(sum(c))))] : []),
  );
}

// -- budgets --

// Keys, users and teams that have at least one budget, as {kind, id, label, limits}.
function budgeted() {
  const now = Date.now();
  const live = (k) => !k.revoked_at && !(k.expires_at && Date.parse(k.expires_at) <= now);
  const has = (row) => BUDGETS.some(([field]) => row[field] != null);
  return [
    ...(directory.teams ?? []).filter(has).map((t) => ({ kind: "team", id: t.name, label: t.name, row: t })),
    ...(directory.users ?? []).filter(has).map((u) => ({ kind: "user", id: u.name, label: u.name, row: u })),
    ...(directory.keys ?? []).filter((k) => live(k) && has(k))
      .map((k) => ({ kind: "key", id: k.id, label: `${k.name} (#${k.id})`, row: k })),
  ];
}

function periodStart(period) {
  const now = new Date();
  const day = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate());
  const month = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1);
  return new Date(period === "day" ? day : month).toISOString();
}

// Usage per kind and period: one /admin/usage call for each (kind, period) a budget needs.
async function periodUsage(entities) {
  const needed = new Set();
  for (const e of entities) {
    for (const [field, , period] of BUDGETS) if (e.row[field] != null) needed.add(`${e.kind}:${period}`);
  }
  const used = new Map(); // "kind:period" -> Map(group value -> report row)
  await Promise.all([...needed].map(async (what) => {
    const [kind, period] = what.split(":");
    const query = new URLSearchParams({ group_by: kind, start: periodStart(period) });
    const report = await api(`/admin/usage?${query}`);
    used.set(what, new Map(report.data.map((r) => [String(r[kind]), r])));
  }));
  return used;
}

function budgetBar(used, limit) {
  const share = limit > 0 ? used / limit : 1;
  const over = used >= limit;
  const fill = el("span");
  fill.style.width = `${Math.min(100, share * 100)}%`; // CSSOM: allowed by the page's CSP
  return el("div", {
    class: over ? "bar over" : "bar", role: "progressbar", "aria-valuemin": 0,
    "aria-valuemax": limit, "aria-valuenow": used, title: `${percent.format(share * 100)}% used`,
  }, fill);
}

async function loadBudgets() {
  const section = $("#budgets");
  const listed = directory.keys || directory.users || directory.teams;
  if (!readsReports || !listed) return; // it could not tell whose budgets or how much is used
  const entities = budgeted();
  section.hidden = false;
  $("#no-budgets").hidden = entities.length > 0;
  $("#budget-table").hidden = entities.length === 0;
  if (!entities.length) return;
  const used = await periodUsage(entities);
  const rows = [];
  for (const e of entities) {
    for (const [field, title, period, column] of BUDGETS) {
      const limit = e.row[field];
      if (limit == null) continue;
      const spent = used.get(`${e.kind}:${period}`)?.get(String(e.id))?.[column] ?? 0;
      rows.push(el("tr", { dataset: { kind: e.kind, budget: field } },
        el("td", { class: "name" }, el("span", { class: "badge" }, e.kind), " ", e.label),
        el("td", {}, title),
        el("td", {}, budgetBar(spent, limit)),
        el("td", { class: "num used" }, `${number.format(spent)} / ${number.format(limit)}`,
          el("span", { class: "muted small" }, ` (${percent.format((100 * spent) / limit)}%)`)),
      ));
    }
  }
  $("#budget-table tbody").replaceChildren(...rows);
}

// -- CSV --

const CSV_FIELDS = ["requests", "errors", "prompt_tokens", "completion_tokens", "images",
  "latency_ms_p50", "latency_ms_p95", "ttft_ms_p50", "ttft_ms_p95"];

// RFC 4180 quoting, and a leading quote on text a spreadsheet would run as a formula.
export function csvCell(value) {
  if (value === null || value === undefined) return "";
  let text = String(value);
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function csv() {
  const groupBy = state.groupBy;
  const head = ["date", groupBy, ...(groupBy === "key" ? ["key_name"] : []), ...CSV_FIELDS.slice(0, 4),
    "total_tokens", ...CSV_FIELDS.slice(4)];
  const lines = [head];
  for (const p of state.points) {
    const keyName = groupBy === "key" ? [directory.keys?.find((k) => k.id === p.group)?.name ?? ""] : [];
    lines.push([
      new Date(p.t * 1000).toISOString().slice(0, 10), p.group, ...keyName,
      ...CSV_FIELDS.slice(0, 4).map((f) => p[f]), p.prompt_tokens + p.completion_tokens,
      ...CSV_FIELDS.slice(4).map((f) => p[f]),
    ]);
  }
  return lines.map((line) => line.map(csvCell).join(",")).join("\r\n") + "\r\n";
}

function download() {
  const blob = new Blob([csv()], { type: "text/csv;charset=utf-8" });
  const url = URL.createObjectURL(blob);
  const day = iso(state.end - DAY).slice(0, 10);
  const link = el("a", { href: url, download: `budrt-usage-by-${state.groupBy}-${day}.csv`, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000); // after the download has started
}

// -- wiring --

async function refresh() {
  showError(null);
  try {
    await loadUsage();
  } catch (err) {
    showError(err);
  }
}

$("#group-by").addEventListener("change", (event) => {
  state.groupBy = event.target.value;
  refresh();
});
$("#export-csv").addEventListener("click", download);

(async () => {
  state.groupBy = $("#group-by").value;
  try {
    await loadDirectory(); // names of keys first, so the charts' labels have them
  } catch (err) {
    showError(err);
  }
  await refresh();
  loadBudgets().catch(showError);
})();
