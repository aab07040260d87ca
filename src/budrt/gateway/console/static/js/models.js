// Models and where they run. Everyone sees the models they may use (GET /v1/models); with
// replicas:list, each model's replicas come from GET /admin/replicas: health, breaker, requests
// in flight, the model's state on that server, and whatever load figures the API reports.
// Refreshed every 5 s while the tab is visible. With models:manage, Load / Unload / Pin call
// POST /admin/replicas/models/{model}/{action} on every replica of the model, or on one.

import { api, busy, can, el, fmt, showError } from "./api.js";

const REFRESH_MS = 5000;
const root = document.getElementById("models");
const pending = new Set(); // actions in flight ("model" or "model replica"): their buttons stay disabled
const results = new Map(); // model -> {action, at, answer}: the last action's outcome, shown in its card
// model -> Map(replica URL -> the model's card as that replica last answered an action): where
// /admin/replicas has no row for a replica (supervisor-managed ones), the only word on `pinned`.
const answered = new Map();
let timer = null;
let refreshing = false;
let failed = false; // the last refresh failed: its error is in the box until one succeeds

// -- data --

async function fetchState() {
  const [models, replicas] = await Promise.all([
    api("/v1/models"),
    // detail=full: the supervisor's and configured replicas too, each with its server's own view
    // of its models (`live`: state, memory, pinned, queue, KV cache).
    can["replicas:list"] ? api("/admin/replicas?detail=full") : Promise.resolve(null),
  ]);
  return { models: models.data || [], replicas };
}

// One entry per model: what /v1/models says of it, its spread (replicas by zone, warnings) and a
// row per registered replica. A model only /admin/replicas knows (an admin's view) is kept too.
function byModel({ models, replicas }) {
  const out = new Map();
  const entry = (id) => {
    if (!out.has(id)) out.set(id, { id, info: null, spread: null, rows: [], aliases: new Set() });
    return out.get(id);
  };
  for (const info of models) {
    const e = entry(info.id);
    e.info = info;
    for (const alias of info.aliases || []) e.aliases.add(alias);
  }
  for (const spread of replicas?.models || []) entry(spread.model).spread = spread;
  for (const replica of replicas?.data || []) {
    for (const listed of replica.models || []) {
      const e = entry(listed.id);
      const model = { ...listed, ...liveCard(replica, listed), id: listed.id };
      e.rows.push({ replica, model });
      for (const alias of model.aliases || []) e.aliases.add(alias);
    }
  }
  return [...out.values()];
}

// The replica's server's own card of a model (fresher than the gateway's last heartbeat), or {}.
function liveCard(replica, listed) {
  const names = new Set([listed.id, ...(listed.aliases || [])]);
  return (replica.live || []).find((card) => names.has(card.id)) || {};
}

// Load figures a replica may report, on its model entry or on the replica itself (absent: null).
function figures(replica, model) {
  const pick = (name) => model[name] ?? replica[name] ?? null;
  return {
    waiting: pick("waiting"),
    kv: pick("kv_cache_usage"), // fraction of the KV cache in use, 0..1
    memory: pick("memory_bytes"),
    budget: pick("memory_budget_bytes"),
  };
}

// Whether the model is pinned where known: from its replicas' rows, else from the last action's answer.
function pinnedNow(m) {
  let known = m.rows.map((r) => r.model.pinned).filter((p) => typeof p === "boolean");
  if (!known.length) known = [...(answered.get(m.id)?.values() || [])].map((card) => card.pinned === true);
  return known.length > 0 && known.every(Boolean);
}

// -- formatting --

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${fmt(n)} ${units[i]}`;
}

function ago(iso) {
  if (!iso) return "–";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 90 * 60) return `${Math.round(s / 60)} min ago`;
  if (s < 36 * 3600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

// Where the replica comes from: a heartbeat (and how long ago), the supervisor, or the config.
function origin(replica) {
  if (replica.source === "supervisor") return "started by budrt serve";
  if (replica.source === "config") return "configured upstream";
  return `heartbeat ${ago(replica.last_heartbeat)}`;
}

function badge(text, kind, title) {
  return el("span", { class: kind ? `badge ${kind}` : "badge", title }, text);
}

// A bar for a fraction (0..1) with its percentage; warn from 80 %, red from 95 %.
function gauge(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction)) * 100;
  const fill = el("span");
  fill.style.width = `${pct}%`;
  const kind = pct >= 95 ? "bar over" : pct >= 80 ? "bar warn" : "bar";
  return el("div", { class: "gauge" }, el("div", { class: "small" }, label ?? `${fmt(pct)} %`), el("div", { class: kind }, fill));
}

const STATES = {
  resident: ["good", "In memory, serving"],
  loading: ["warn", "Loading into memory"],
  available: [null, "Not in memory: loaded by its next request"],
  failed: ["bad", "Its last load failed"],
};

function stateBadges(model) {
  const out = [];
  if (model.state) {
    const [kind, title] = STATES[model.state] || [null, ""];
    out.push(badge(model.state, kind, title));
  }
  if (model.pinned) out.push(" ", badge("pinned", null, "Never evicted to make room for another model"));
  return out.length ? out : ["–"];
}

// -- actions --

function actionButtons(m, replica) {
  const key = replica ? `${m.id} ${replica}` : m.id;
  const off = pending.has(key) || pending.has(m.id);
  const pinned = replica
    ? m.rows.find((r) => r.replica.url === replica)?.model.pinned === true
    : pinnedNow(m);
  const where = replica ? `on ${replica}` : "on every replica";
  const button = (label, action, title, extra = {}) => el("button", {
    type: "button", class: "secondary", title: `${title} ${where}`, disabled: off,
    dataset: { action, model: m.id },
    onclick: (ev) => act(m.id, action, replica, ev.currentTarget, extra),
  }, label);
  return [
    button("Load", "load", "Load the model"),
    button("Unload", "unload", "Evict the model (refused while it serves requests or is pinned)"),
    pinned
      ? button("Unpin", "pin", "Let the model be evicted again", { pinned: false })
      : button("Pin", "pin", "Keep the model in memory", { pinned: true }),
  ];
}

async function act(model, action, replica, button, extra) {
  const key = replica ? `${model} ${replica}` : model;
  pending.add(key);
  failed = false; // busy() clears the box; the action's own error then stays until the next action
  await busy(button, async () => {
    const body = { ...extra, ...(replica ? { replica } : {}) };
    const path = `/admin/replicas/models/${encodeURIComponent(model)}/${action}`;
    const answer = await api(path, { method: "POST", body });
    const name = action === "pin" ? (extra.pinned ? "pin" : "unpin") : action;
    results.set(model, { action: name, at: new Date(), answer });
    if (!answered.has(model)) answered.set(model, new Map());
    for (const row of answer.replicas || []) if (row.ok && row.model) answered.get(model).set(row.replica, row.model);
    const failures = (answer.replicas || []).filter((r) => !r.ok);
    if (failures.length) {
      const first = failures[0].error?.message || "no answer";
      throw new Error(`${name} ${model}: ${failures.length} of ${answer.replicas.length} replica(s) refused or failed: ${first}`);
    }
  });
  pending.delete(key);
  await refresh();
}

// What each replica answered to the model's last action.
function outcome(m) {
  const last = results.get(m.id);
  if (!last) return null;
  const lines = (last.answer.replicas || []).map((r) => {
    if (r.ok) {
      const card = r.model || {};
      const bits = [card.state, card.pinned ? "pinned" : null, card.memory_bytes ? bytes(card.memory_bytes) : null];
      return el("div", {}, `${r.replica}: ${r.status === 202 ? "accepted" : "done"} (${bits.filter(Boolean).join(", ")})`);
    }
    const why = r.error?.message || "no answer";
    return el("div", { class: "failed" }, `${r.replica}: ${r.status ? `HTTP ${r.status}: ` : ""}${why}`);
  });
  const when = last.at.toLocaleTimeString();
  return el("div", { class: "result muted" }, el("div", {}, `Last action: ${last.action} at ${when}`), lines);
}

// -- rendering --

function spreadBadges(m) {
  const s = m.spread;
  if (!s) return [];
  const n = s.replicas;
  const out = [badge(`${n} available`, n === 0 ? "bad" : n === 1 ? "warn" : "good", "Replicas ready with a closed breaker")];
  const zones = Object.entries(s.zones || {}).filter(([zone]) => zone !== "unknown");
  if (zones.length) out.push(badge(zones.map(([z, c]) => `${z} ×${c}`).join(", "), null, "Available replicas by zone"));
  for (const w of s.warnings || []) if (n > 0) out.push(badge(w, "warn"));
  return out;
}

function replicaTable(m) {
  const rows = m.rows.map(({ replica, model }) => ({ replica, model, f: figures(replica, model) }));
  // Columns for load figures only where some replica reports them.
  const has = (name) => rows.some((r) => r.f[name] !== null);
  const manage = can["models:manage"];
  const head = [
    "Replica", "Zone", "Health", "Breaker", "In flight", "Model",
    has("waiting") && "Queue", has("kv") && "KV cache", has("memory") && "Memory", manage && "",
  ].filter((h) => h !== false);
  const body = rows.map(({ replica, model, f }) => el("tr", {},
    el("td", {},
      el("div", { class: "mono" }, replica.url),
      el("div", { class: "muted small", title: replica.last_heartbeat || "" }, origin(replica))),
    el("td", {}, replica.zone || "–"),
    el("td", {}, model.ready ? badge("ready", "good") : badge("not ready", "bad", "Failing its health check")),
    el("td", {}, model.ejected
      ? badge("open", "bad", "Ejected after failures; tried again after its cool-down")
      : badge("closed", "good", "Taking requests")),
    el("td", { title: "Requests in flight from this gateway" }, fmt(model.outstanding)),
    el("td", {}, stateBadges(model)),
    has("waiting") && el("td", {}, fmt(f.waiting)),
    has("kv") && el("td", {}, f.kv === null ? "–" : gauge(f.kv)),
    has("memory") && el("td", {}, f.budget ? gauge(f.memory / f.budget, `${bytes(f.memory)} of ${bytes(f.budget)}`) : bytes(f.memory)),
    manage && el("td", {}, el("div", { class: "row" }, actionButtons(m, replica.url))),
  ));
  const table = el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, body));
  return el("div", { class: "table-wrap" }, table);
}

// Without replicas:list: the models the caller may use, one row each.
function plainTable(models) {
  // Columns for what /v1/models tells of some model (it may say no more than the id).
  const tasks = models.some((m) => m.info?.task);
  const aliases = models.some((m) => m.aliases.size);
  const head = ["Model", tasks && "Task", aliases && "Aliases", "Owned by"].filter(Boolean);
  const rows = models.map((m) => el("tr", { dataset: { model: m.id } },
    el("td", { class: "mono" }, m.id),
    tasks && el("td", {}, m.info?.task || "–"),
    aliases && el("td", {}, m.aliases.size ? [...m.aliases].join(", ") : "–"),
    el("td", {}, m.info?.owned_by || "–"),
  ));
  return el("section", { class: "card" },
    el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows)),
    el("p", { class: "small" }, el("a", { href: "/console/playground" }, "Try them in the playground")));
}

function modelCard(m) {
  const task = m.info?.task;
  const header = el("header", {},
    el("h2", { class: "mono" }, m.id),
    task ? badge(task) : null,
    spreadBadges(m),
    can["models:manage"] ? el("div", { class: "actions" }, actionButtons(m, null)) : null,
  );
  const aliases = m.aliases.size ? el("div", { class: "aliases muted" }, `Aliases: ${[...m.aliases].join(", ")}`) : null;
  let detail = null;
  if (m.rows.length) detail = replicaTable(m);
  else if (m.spread?.replicas > 0) {
    detail = el("p", { class: "note muted small" },
      `${m.spread.replicas} replica(s) configured or started by the supervisor; `
      + "per-replica details are listed for replicas registered by heartbeat.");
  }
  return el("section", { class: "card model-card", dataset: { model: m.id } }, header, aliases, detail, outcome(m));
}

function render(state) {
  const models = byModel(state);
  const toolbar = el("div", { class: "models-toolbar" },
    el("span", { class: "muted" }, `${models.length} model${models.length === 1 ? "" : "s"}`),
    el("span", { class: "updated muted small" }, `Updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`),
  );
  const note = can["replicas:list"] ? null : el("p", { class: "notice" },
    "These are the models you may use. Replicas, their health and load need the replicas:list permission.");
  let cards;
  if (!models.length) cards = [el("p", { class: "muted" }, "No models are configured or registered.")];
  else cards = can["replicas:list"] ? models.map(modelCard) : [plainTable(models)];
  root.replaceChildren(toolbar, ...(note ? [note] : []), ...cards);
}

// -- refresh loop: every 5 s while the page is visible, never two at once --

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    render(await fetchState());
    if (failed) showError(null);
    failed = false;
  } catch (err) {
    failed = true;
    showError(err);
  } finally {
    refreshing = false;
  }
}

function schedule() {
  clearTimeout(timer);
  timer = document.visibilityState === "visible" ? setTimeout(tick, REFRESH_MS) : null;
}

async function tick() {
  await refresh();
  schedule();
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") tick();
  else clearTimeout(timer);
});
tick();
