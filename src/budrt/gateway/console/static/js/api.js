// The console's one way to the API: same endpoints as any client, authenticated by the session
// cookie plus the CSRF token of the page. Nothing here builds HTML from strings: `el` makes
// elements and puts every string in as text, so a key named `<img onerror=...>` stays text.

export const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";
export const can = JSON.parse(document.body.dataset.can || "{}");
export const principal = { name: document.body.dataset.principal, kind: document.body.dataset.kind };

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

function headers(json) {
  const h = { "x-csrf-token": csrf, accept: "application/json" };
  if (json) h["content-type"] = "application/json";
  return h;
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (response.status === 401) window.location.assign("/console/login");
  return new ApiError(response.status, body);
}

// JSON in, JSON out; throws ApiError with the API's own message.
export async function api(path, { method = "GET", body, signal } = {}) {
  const response = await fetch(path, {
    method, signal, credentials: "same-origin",
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// POST `body` with stream: true and yield each server-sent event's parsed JSON data.
export async function* sse(path, body, { signal } = {}) {
  const response = await fetch(path, {
    method: "POST", signal, credentials: "same-origin",
    headers: headers(true), body: JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      yield JSON.parse(data);
    }
  }
}

// el("td", {class: "x", onclick: fn}, "text", child) -> <td class="x">text<child/></td>
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function showError(err) {
  const box = document.getElementById("error");
  if (!box) return;
  box.textContent = err ? (err.message || String(err)) : "";
  box.hidden = !err;
}

export const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
export function fmt(value, unit = "") {
  return value === null || value === undefined ? "–" : `${number.format(value)}${unit}`;
}

// Run an async action from a button: disabled while it runs, errors shown in the page's box.
export async function busy(button, action) {
  button.disabled = true;
  showError(null);
  try { return await action(); } catch (err) { showError(err); } finally { button.disabled = false; }
}
