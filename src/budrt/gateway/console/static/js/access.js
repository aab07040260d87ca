// Keys & access: API keys, users, teams, roles and the audit log. Everything goes through
// /admin/... with the session's own rights; `can` only decides which controls to show (the API
// decides regardless, and its 403 message lands in the error box). Every string from the API is
// put in as text by `el`, never as HTML.
import { api, busy, can, el, fmt, showError } from "./api.js";

const root = document.getElementById("access");
const me = { keyId: Number(root.dataset.keyId) || null, roles: root.dataset.roles || "" };

const BUILTIN_ROLES = ["admin", "developer", "viewer"];
const RATE_FIELDS = [["rpm", "Requests / minute", "rpm"], ["tpm", "Tokens / minute", "tpm"]];
const BUDGET_FIELDS = [
  ["tokens_per_day", "Tokens / day", "tokens/day"],
  ["tokens_per_month", "Tokens / month", "tokens/month"],
  ["images_per_day", "Images / day", "images/day"],
  ["images_per_month", "Images / month", "images/month"],
];
const LIMIT_FIELDS = [...RATE_FIELDS, ...BUDGET_FIELDS];
const AUDIT_LIMITS = [100, 500, 1000]; // GET /admin/audit?limit= allows up to 1000

// What was last fetched (null: not allowed or not yet loaded).
const state = { keys: null, users: null, teams: null, roles: null, audit: null };

const TABS = [
  { id: "keys", label: "Keys", list: "keys:list", create: "keys:create" },
  { id: "users", label: "Users", list: "users:list", create: "users:create" },
  { id: "teams", label: "Teams", list: "teams:list", create: "teams:create" },
  { id: "roles", label: "Roles", list: "roles:list", create: "roles:create" },
  { id: "audit", label: "Audit log", list: "audit:read" },
].filter((t) => can[t.list] || (t.create && can[t.create]));

// The API's list of each kind, and whether this principal may ask for it.
const SOURCES = {
  keys: { may: can["keys:list"], path: () => "/admin/keys" },
  users: { may: can["users:list"], path: () => "/admin/users" },
  teams: { may: can["teams:list"], path: () => "/admin/teams" },
  roles: { may: can["roles:list"], path: () => "/admin/roles" },
  audit: { may: can["audit:read"], path: () => `/admin/audit?${auditQuery()}` },
};

// -- small helpers --

// A date (with the time in tables where it matters: the audit log); the exact time on hover.
function when(iso, none = "–", time = false) {
  if (!iso) return el("span", { class: "muted" }, none);
  const style = time ? { dateStyle: "medium", timeStyle: "short" } : { dateStyle: "medium" };
  const text = new Date(iso).toLocaleString(undefined, style);
  return el("time", { datetime: iso, title: iso }, text);
}

function field(label, input, wide = false) {
  return el("label", { class: wide ? "field wide" : "field" }, label, input);
}

function numberInput(name, value, placeholder = "unlimited") {
  return el("input", { type: "number", name, min: 1, step: 1, value: value ?? undefined, placeholder });
}

// A positive whole number from a number input, null when empty (= unlimited / not set).
function readInt(input, label) {
  const text = input.value.trim();
  if (!text) return null;
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 1) throw new Error(`${label} must be a whole number from 1 up.`);
  return value;
}

function limitInputs(current = {}) {
  return LIMIT_FIELDS.map(([name, label]) => field(label, numberInput(name, current[name])));
}

// The limit fields set in a create form (absent = unlimited).
function limitsOf(form) {
  const out = {};
  for (const [name, label] of LIMIT_FIELDS) {
    const value = readInt(form.elements[name], label);
    if (value !== null) out[name] = value;
  }
  return out;
}

// rpm/tpm or budgets of a key, user or team as lines; "none" when all are unlimited.
function limitsText(row, fields) {
  const lines = fields.filter(([name]) => row[name] != null).map(([name, , unit]) => el("div", {}, `${fmt(row[name])} ${unit}`));
  return lines.length ? el("div", { class: "limits" }, lines) : el("span", { class: "muted" }, "none");
}

function commaList(text) {
  return text.split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
}

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "muted empty" }, empty);
  const head = el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h))));
  return el("div", { class: "table-wrap" }, el("table", {}, head, el("tbody", {}, rows)));
}

function submitButton(form) {
  return form.querySelector('button[type="submit"]');
}

// Run a form's action from its submit button (disabled meanwhile, errors in the error box).
function onSubmit(form, action) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(submitButton(form), () => action(form));
  });
  return form;
}

function roleNames() {
  return state.roles ? state.roles.map((r) => r.name) : BUILTIN_ROLES;
}

function byId(rows) {
  return new Map((rows || []).map((r) => [r.id, r.name]));
}

// -- loading --

// What Refresh asks the server for: the newest `limit` entries whose actor, action and target
// contain the filters' texts (typing narrows the entries already fetched at once).
function auditQuery() {
  const query = new URLSearchParams({ limit: auditLimit() });
  const f = document.getElementById("audit-filters");
  for (const name of ["actor", "action", "target"]) {
    const text = (f?.elements[name].value || "").trim();
    if (text) query.set(name, text);
  }
  return query.toString();
}

function auditLimit() {
  return document.querySelector('#audit-filters select[name="limit"]')?.value || AUDIT_LIMITS[0];
}

// Fetch the named lists this principal may read, then redraw. One refused list (403) shows its
// message and leaves the others working.
async function load(...names) {
  const wanted = names.filter((n) => SOURCES[n].may);
  const results = await Promise.allSettled(
    wanted.map(async (n) => {
      state[n] = (await api(SOURCES[n].path())).data;
    }),
  );
  const failed = results.find((r) => r.status === "rejected");
  if (failed) showError(failed.reason);
  refreshPickers();
  render();
}

// Redraw the tables (all of them by default: key owners need users and teams, the audit log
// names keys). A list that could not be loaded says so instead of looking empty.
function render(ids = TABS.map((t) => t.id)) {
  for (const id of ids) {
    const target = document.getElementById(`${id}-table`);
    if (!target) continue;
    target.replaceChildren(state[id] === null ? el("p", { class: "muted" }, "Could not load this list.") : RENDER[id]());
  }
}

// Role choices and the user/team suggestions of every form, keeping what is selected.
function refreshPickers() {
  for (const select of root.querySelectorAll("select.role-select")) {
    const chosen = select.value || "developer";
    select.replaceChildren(...roleNames().map((r) => el("option", { value: r, selected: r === chosen }, r)));
    select.value = roleNames().includes(chosen) ? chosen : roleNames()[0];
  }
  for (const box of root.querySelectorAll(".role-choices.create")) {
    const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
    box.replaceChildren(...roleChoices(roleNames(), checked));
  }
  const lists = { "users-datalist": state.users, "teams-datalist": state.teams };
  for (const [id, rows] of Object.entries(lists)) {
    document.getElementById(id)?.replaceChildren(...(rows || []).map((r) => el("option", { value: r.name })));
  }
}

function roleChoices(names, checked) {
  return names.map((r) =>
    el("label", {}, el("input", { type: "checkbox", name: "roles", value: r, checked: checked.has(r) }), r),
  );
}

// -- inline editors (a row under the one being edited) --

function toggleEditor(button, kind, build) {
  const row = button.closest("tr");
  const next = row.nextElementSibling;
  const open = next?.classList.contains("edit-row") ? next : null;
  open?.remove();
  if (open?.dataset.editor === kind) return; // a second click closes it
  const editor = el("tr", { class: "edit-row", dataset: { editor: kind } }, el("td", { colspan: row.children.length }, build()));
  row.after(editor);
  editor.querySelector("input, select")?.focus();
}

// Limits of a key, user or team: prefilled; an emptied field clears that limit (null).
function limitsForm(current, save) {
  const form = el(
    "form",
    { class: "limits-form" },
    el("div", { class: "form-grid" }, limitInputs(current)),
    el(
      "div",
      { class: "row" },
      el("button", { type: "submit" }, "Save limits"),
      el("button", { type: "button", class: "secondary cancel", onclick: () => form.closest("tr").remove() }, "Cancel"),
      el("span", { class: "small muted" }, "Empty means unlimited."),
    ),
  );
  return onSubmit(form, async () => {
    const changes = {};
    for (const [name, label] of LIMIT_FIELDS) {
      const value = readInt(form.elements[name], label);
      if (value !== (current[name] ?? null)) changes[name] = value;
    }
    if (Object.keys(changes).length) await save(changes); // PATCH needs at least one field
    else form.closest("tr").remove();
  });
}

// -- keys --

function keyStatus(k) {
  if (k.revoked_at) return { text: "revoked", cls: "bad" };
  if (k.expires_at && new Date(k.expires_at) <= new Date()) return { text: "expired", cls: "warn" };
  return { text: "active", cls: "good" };
}

function keyOwner(k) {
  const users = byId(state.users);
  const teams = byId(state.teams);
  const parts = [];
  if (k.user_id != null) parts.push(el("div", {}, `user ${users.get(k.user_id) ?? `#${k.user_id}`}`));
  if (k.team_id != null) parts.push(el("div", {}, `team ${teams.get(k.team_id) ?? `#${k.team_id}`}`));
  return parts.length ? parts : el("span", { class: "muted" }, "none");
}

function revokeControls(k) {
  const box = el("span", { class: "revoke-box" });
  const confirm = () => {
    const yes = el("button", { type: "button", class: "danger confirm-revoke" }, "Confirm revoke");
    yes.addEventListener("click", () =>
      busy(yes, async () => {
        await api(`/admin/keys/${k.id}`, { method: "DELETE" });
        await load("keys", "audit");
      }),
    );
    const cancel = el("button", { type: "button", class: "secondary cancel-revoke", onclick: () => box.replaceChildren(start) }, "Cancel");
    const own = k.id === me.keyId ? el("div", { class: "small" }, "This is the key you signed in with: you will be signed out.") : null;
    box.replaceChildren(...[yes, cancel, own].filter(Boolean));
    yes.focus();
  };
  const start = el("button", { type: "button", class: "danger revoke", onclick: confirm }, "Revoke");
  box.append(start);
  return box;
}

function keyActions(k) {
  if (k.revoked_at) return null;
  const edit = can["keys:update"]
    ? el("button", {
        type: "button",
        class: "secondary edit-limits",
        onclick: (e) =>
          toggleEditor(e.currentTarget, "limits", () =>
            limitsForm(k, async (changes) => {
              await api(`/admin/keys/${k.id}`, { method: "PATCH", body: changes });
              await load("keys", "audit");
            }),
          ),
      }, "Edit limits")
    : null;
  return [edit, can["keys:revoke"] ? revokeControls(k) : null];
}

function renderKeys() {
  const showRevoked = document.getElementById("show-revoked")?.checked ?? true;
  // The API lists revoked keys too; newest first, as the one just made is the one looked for.
  const keys = [...state.keys || []].reverse().filter((k) => showRevoked || !k.revoked_at);
  const lastUsed = keys.some((k) => "last_used_at" in k); // shown once the API includes it
  const headers = ["Name", "Prefix", "Role", "Owner", "Models", "Rate limits", "Budgets", "Created",
    lastUsed ? "Last used" : null, "Expires", "Status", ""].filter((h) => h !== null);
  const rows = keys.map((k) => {
    const status = keyStatus(k);
    const mine = k.id === me.keyId ? [" ", el("span", { class: "badge", title: "The key this console session signed in with" }, "this session")] : null;
    const perms = k.permissions ? el("div", { class: "small muted" }, `narrowed to: ${k.permissions.join(", ")}`) : null;
    return el(
      "tr",
      { dataset: { keyId: k.id }, class: k.revoked_at ? "revoked" : undefined },
      el("td", {}, k.name, mine),
      el("td", {}, el("code", {}, `${k.prefix}…`)),
      el("td", {}, k.role, perms),
      el("td", { class: "owner" }, keyOwner(k)),
      el("td", {}, k.models ? k.models.join(", ") : el("span", { class: "muted" }, "all")),
      el("td", {}, limitsText(k, RATE_FIELDS)),
      el("td", {}, limitsText(k, BUDGET_FIELDS)),
      el("td", { class: "when" }, when(k.created_at)),
      lastUsed ? el("td", { class: "when" }, when(k.last_used_at, "never")) : null,
      el("td", { class: "when" }, when(k.expires_at, "never")),
      el("td", {}, el("span", { class: `badge ${status.cls} status` }, status.text)),
      el("td", { class: "actions" }, keyActions(k)),
    );
  });
  return table(headers, rows, showRevoked ? "No keys yet." : "No active keys.");
}

// The new key's secret, once: the API never returns it again.
function showSecret(created) {
  const status = el("span", { class: "small", id: "copy-status", role: "status" });
  const secret = el("code", { id: "new-key-secret", class: "secret" }, created.key);
  const copy = el("button", { type: "button", id: "copy-key-secret" }, "Copy");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(created.key);
      status.textContent = "Copied.";
    } catch {
      // No clipboard access (plain http, permission): select it for Ctrl+C instead.
      const range = document.createRange();
      range.selectNodeContents(secret);
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
      status.textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
    }
  });
  const notice = el(
    "div",
    { class: "notice secret-notice", id: "new-key-notice", role: "status" },
    el("strong", {}, `Key “${created.name}” created.`),
    " Copy it now: it will not be shown again.",
    secret,
    el("div", { class: "row" }, copy,
      el("button", { type: "button", class: "secondary", id: "dismiss-key-secret", onclick: () => notice.remove() }, "Done"),
      status),
  );
  document.getElementById("new-key-notice")?.remove();
  document.getElementById("panel-keys").prepend(notice);
}

function createKeyForm() {
  const form = el(
    "form",
    { id: "create-key", class: "card" },
    el("h2", {}, "Create a key"),
    el(
      "div",
      { class: "form-grid" },
      field("Name", el("input", { name: "name", required: true, maxlength: 200, placeholder: "ci-pipeline" })),
      field("Role", el("select", { name: "role", class: "role-select" })),
      field("User (optional)", el("input", { name: "user", list: "users-datalist", maxlength: 200, placeholder: "owner user" })),
      field("Team (optional)", el("input", { name: "team", list: "teams-datalist", maxlength: 200, placeholder: "owner team" })),
      field("Models (optional)", el("input", { name: "models", placeholder: "all; or model-a, model-b" })),
      field("Expires in days (optional)", numberInput("expires_days", null, "never")),
    ),
    el(
      "details",
      { class: "more" },
      el("summary", {}, "Rate limits, budgets and permissions"),
      el("div", { class: "form-grid" }, limitInputs(),
        field("Permissions (optional, one per line; narrows the role)",
          el("textarea", { name: "permissions", rows: 3, placeholder: "inference:chat@model:smollm2-*" }), true)),
    ),
    el("button", { type: "submit" }, "Create key"),
  );
  return onSubmit(form, async () => {
    const f = form.elements;
    const body = { name: f.name.value.trim(), role: f.role.value, ...limitsOf(form) };
    if (f.user.value.trim()) body.user = f.user.value.trim();
    if (f.team.value.trim()) body.team = f.team.value.trim();
    const models = commaList(f.models.value);
    if (models.length) body.models = models;
    const permissions = f.permissions.value.split("\n").map((s) => s.trim()).filter(Boolean);
    if (permissions.length) body.permissions = permissions;
    const days = readInt(f.expires_days, "Expires in days");
    if (days !== null) body.expires_in_s = days * 86400;
    const created = await api("/admin/keys", { method: "POST", body });
    showSecret(created);
    form.reset();
    f.role.value = "developer"; // the API's default role

    await load("keys", "audit");
  });
}

function keysPanel() {
  const showRevoked = el("input", { type: "checkbox", id: "show-revoked", checked: true, onchange: () => render(["keys"]) });
  const list = can["keys:list"]
    ? [el("div", { class: "toolbar" }, el("h2", {}, "Keys"), el("label", { class: "small" }, showRevoked, " Show revoked keys")),
      el("div", { id: "keys-table" })]
    : [el("p", { class: "muted" }, "This role may create keys but not list them.")];
  return [can["keys:create"] ? createKeyForm() : null, ...list];
}

// -- users --

function rolesEditor(user) {
  const names = [...new Set([...roleNames(), ...user.roles])];
  const form = el(
    "form",
    { class: "roles-form" },
    el("div", { class: "role-choices" }, roleChoices(names, new Set(user.roles))),
    el("div", { class: "row" },
      el("button", { type: "submit" }, "Save roles"),
      el("button", { type: "button", class: "secondary cancel", onclick: () => form.closest("tr").remove() }, "Cancel")),
  );
  return onSubmit(form, async () => {
    const roles = [...form.querySelectorAll('input[name="roles"]:checked')].map((i) => i.value);
    await api(`/admin/users/${encodeURIComponent(user.name)}/roles`, { method: "PUT", body: { roles } });
    await load("users", "audit");
  });
}

function userActions(u) {
  const buttons = [];
  if (can["users:update"] && can["roles:assign"]) {
    buttons.push(el("button", { type: "button", class: "secondary edit-roles",
      onclick: (e) => toggleEditor(e.currentTarget, "roles", () => rolesEditor(u)) }, "Edit roles"));
  }
  if (can["users:update"]) {
    buttons.push(el("button", { type: "button", class: "secondary edit-limits",
      onclick: (e) => toggleEditor(e.currentTarget, "limits", () => limitsForm(u, async (changes) => {
        await api(`/admin/users/${encodeURIComponent(u.name)}`, { method: "PATCH", body: changes });
        await load("users", "audit");
      })) }, "Edit limits"));
  }
  return buttons;
}

function renderUsers() {
  const rows = (state.users || []).map((u) =>
    el(
      "tr",
      { dataset: { user: u.name } },
      el("td", {}, u.name),
      el("td", {}, u.team ?? el("span", { class: "muted" }, "none")),
      el("td", {}, u.roles.length ? u.roles.flatMap((r) => [el("span", { class: "badge" }, r), " "]) : el("span", { class: "muted" }, "none")),
      el("td", {}, limitsText(u, RATE_FIELDS)),
      el("td", {}, limitsText(u, BUDGET_FIELDS)),
      el("td", { class: "when" }, when(u.created_at)),
      el("td", { class: "actions" }, userActions(u)),
    ),
  );
  return table(["Name", "Team", "Roles", "Rate limits", "Budgets", "Created", ""], rows, "No users yet.");
}

function createUserForm() {
  const form = el(
    "form",
    { id: "create-user", class: "card" },
    el("h2", {}, "Create a user"),
    el("div", { class: "form-grid" },
      field("Name", el("input", { name: "name", required: true, maxlength: 200, placeholder: "alice" })),
      field("Team (optional)", el("input", { name: "team", list: "teams-datalist", maxlength: 200 })),
      field("Roles", el("div", { class: "role-choices create" }), true)),
    el("details", { class: "more" }, el("summary", {}, "Rate limits and budgets"),
      el("div", { class: "form-grid" }, limitInputs())),
    el("button", { type: "submit" }, "Create user"),
  );
  return onSubmit(form, async () => {
    const f = form.elements;
    const roles = [...form.querySelectorAll('input[name="roles"]:checked')].map((i) => i.value);
    const body = { name: f.name.value.trim(), roles, ...limitsOf(form) };
    if (f.team.value.trim()) body.team = f.team.value.trim();
    await api("/admin/users", { method: "POST", body });
    form.reset();
    for (const box of form.querySelectorAll('input[name="roles"]')) box.checked = false;
    await load("users", "teams", "audit");
  });
}

// -- teams --

function renderTeams() {
  const members = new Map();
  for (const u of state.users || []) if (u.team) members.set(u.team, (members.get(u.team) || 0) + 1);
  const rows = (state.teams || []).map((t) =>
    el(
      "tr",
      { dataset: { team: t.name } },
      el("td", {}, t.name),
      state.users ? el("td", {}, fmt(members.get(t.name) || 0)) : null,
      el("td", {}, limitsText(t, RATE_FIELDS)),
      el("td", {}, limitsText(t, BUDGET_FIELDS)),
      el("td", { class: "when" }, when(t.created_at)),
      el("td", { class: "actions" }, can["teams:update"]
        ? el("button", { type: "button", class: "secondary edit-limits",
          onclick: (e) => toggleEditor(e.currentTarget, "limits", () => limitsForm(t, async (changes) => {
            await api(`/admin/teams/${encodeURIComponent(t.name)}`, { method: "PATCH", body: changes });
            await load("teams", "audit");
          })) }, "Edit limits")
        : null),
    ),
  );
  const headers = ["Name", state.users ? "Users" : null, "Rate limits (shared)", "Budgets (shared)", "Created", ""];
  return table(headers.filter((h) => h !== null), rows, "No teams yet.");
}

function createTeamForm() {
  const form = el(
    "form",
    { id: "create-team", class: "card" },
    el("h2", {}, "Create a team"),
    el("div", { class: "form-grid" }, field("Name", el("input", { name: "name", required: true, maxlength: 200, placeholder: "research" }))),
    el("details", { class: "more" }, el("summary", {}, "Rate limits and budgets (shared by the team's keys and users)"),
      el("div", { class: "form-grid" }, limitInputs())),
    el("button", { type: "submit" }, "Create team"),
  );
  return onSubmit(form, async () => {
    await api("/admin/teams", { method: "POST", body: { name: form.elements.name.value.trim(), ...limitsOf(form) } });
    form.reset();
    await load("teams", "audit");
  });
}

// -- roles --

function renderRoles() {
  const rows = (state.roles || []).map((r) =>
    el(
      "tr",
      { dataset: { role: r.name } },
      el("td", {}, r.name),
      el("td", {}, el("span", { class: r.builtin ? "badge" : "badge good" }, r.builtin ? "built-in" : "custom")),
      el("td", {}, r.permissions.length ? r.permissions.map((p) => el("code", { class: "perm" }, p)) : el("span", { class: "muted" }, "none")),
    ),
  );
  return table(["Name", "Kind", "Permissions"], rows, "No roles.");
}

function createRoleForm() {
  const form = el(
    "form",
    { id: "create-role", class: "card" },
    el("h2", {}, "Create a role"),
    el("div", { class: "form-grid" },
      field("Name (a-z 0-9 _.-)", el("input", { name: "name", required: true, maxlength: 64, pattern: "[a-z][a-z0-9_.\\-]{0,63}", placeholder: "team-lead" })),
      field("Permissions, one per line (action@resource)", el("textarea", { name: "permissions", rows: 4,
        placeholder: "inference:*@model:*\nusage:read:team\nkeys:create@team:research" }), true)),
    el("button", { type: "submit" }, "Create role"),
  );
  return onSubmit(form, async () => {
    const permissions = form.elements.permissions.value.split("\n").map((s) => s.trim()).filter(Boolean);
    await api("/admin/roles", { method: "POST", body: { name: form.elements.name.value.trim(), permissions } });
    form.reset();
    await load("roles", "audit");
  });
}

// -- audit log --

// "key:3" gains the key's name where the keys are known, which is what a reader looks for.
function described(ref) {
  const m = /^key:(\d+)$/.exec(ref || "");
  const name = m && state.keys ? byId(state.keys).get(Number(m[1])) : null;
  return name == null ? ref : `${ref} (${name})`;
}

function auditFilters() {
  const f = document.getElementById("audit-filters");
  const get = (name) => (f?.elements[name].value || "").trim().toLowerCase();
  return { actor: get("actor"), action: get("action"), target: get("target") };
}

function renderAudit() {
  const entries = state.audit || [];
  const filters = auditFilters();
  const matches = (e) => Object.entries(filters).every(([name, text]) => !text || described(e[name]).toLowerCase().includes(text));
  const shown = entries.filter(matches);
  const actions = document.getElementById("audit-actions");
  actions?.replaceChildren(...[...new Set(entries.map((e) => e.action))].sort().map((a) => el("option", { value: a })));
  const rows = shown.map((e) =>
    el(
      "tr",
      { dataset: { auditId: e.id } },
      el("td", { class: "when" }, when(e.at, "–", true)),
      el("td", {}, described(e.actor)),
      el("td", {}, el("code", {}, e.action)),
      el("td", {}, described(e.target)),
      el("td", {}, e.detail == null ? el("span", { class: "muted" }, "–") : el("pre", { class: "detail" }, JSON.stringify(e.detail, null, 2))),
    ),
  );
  const count = el("p", { class: "small muted", id: "audit-count" },
    `Showing ${shown.length} of the ${entries.length} entries fetched (the newest ${auditLimit()} at most), newest first.`);
  return el("div", {}, count, table(["Time", "Actor", "Action", "Target", "Detail"], rows, "No entries match."));
}

function auditPanel() {
  const refresh = el("button", { type: "submit", class: "secondary" }, "Refresh");
  const form = el(
    "form",
    { id: "audit-filters", class: "card" },
    el("div", { class: "form-grid" },
      field("Actor contains", el("input", { type: "search", name: "actor", placeholder: "key:1" })),
      field("Action contains", el("input", { type: "search", name: "action", list: "audit-actions", placeholder: "keys:create" })),
      field("Target contains", el("input", { type: "search", name: "target", placeholder: "user:alice" })),
      field("Fetch the newest", el("select", { name: "limit" }, AUDIT_LIMITS.map((n) => el("option", { value: n }, `${n} entries`))))),
    el("datalist", { id: "audit-actions" }),
    el("div", { class: "row" }, refresh,
      el("span", { class: "small muted" }, "Typing narrows the entries shown; Refresh asks the server with these filters.")),
  );
  form.addEventListener("input", (e) => { if (e.target.name !== "limit") render(["audit"]); });
  form.elements.limit.addEventListener("change", () => busy(refresh, () => load("audit")));
  onSubmit(form, () => load("audit", "keys"));
  return [form, el("div", { id: "audit-table" })];
}

const RENDER = { keys: renderKeys, users: renderUsers, teams: renderTeams, roles: renderRoles, audit: renderAudit };
const PANELS = {
  keys: keysPanel,
  users: () => [can["users:create"] ? createUserForm() : null, el("div", { id: "users-table" })],
  teams: () => [can["teams:create"] ? createTeamForm() : null, el("div", { id: "teams-table" })],
  roles: () => [can["roles:create"] ? createRoleForm() : null, el("div", { id: "roles-table" })],
  audit: auditPanel,
};

// -- tabs --

function select(id) {
  for (const tab of TABS) {
    const on = tab.id === id;
    document.getElementById(`tab-${tab.id}`).setAttribute("aria-selected", String(on));
    document.getElementById(`panel-${tab.id}`).hidden = !on;
  }
  history.replaceState(null, "", `#${id}`);
}

function noAccess() {
  const roles = me.roles ? ` (${me.roles})` : "";
  return el("p", { class: "notice", id: "no-access" },
    `Your role${roles} cannot manage access: keys, users, teams, roles and the audit log need an administrator's rights. `,
    "Your own usage is on the ", el("a", { href: "/console/usage" }, "Usage"), " page.");
}

function start() {
  if (!TABS.length) {
    root.replaceChildren(noAccess());
    return;
  }
  const tabs = el("div", { class: "tabs", role: "tablist" }, TABS.map((t) =>
    el("button", { type: "button", role: "tab", id: `tab-${t.id}`, "aria-controls": `panel-${t.id}`,
      dataset: { tab: t.id }, onclick: () => select(t.id) }, t.label)));
  const panels = TABS.map((t) =>
    el("section", { id: `panel-${t.id}`, role: "tabpanel", "aria-labelledby": `tab-${t.id}` }, PANELS[t.id]()));
  root.replaceChildren(tabs, ...panels, el("datalist", { id: "users-datalist" }), el("datalist", { id: "teams-datalist" }));
  const wanted = location.hash.slice(1);
  select(TABS.some((t) => t.id === wanted) ? wanted : TABS[0].id);
  refreshPickers();
  load(...Object.keys(SOURCES));
}

start();
