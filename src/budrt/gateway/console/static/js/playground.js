// The playground: chat (streamed), embeddings compared by cosine similarity, and image generation
// with progress previews, each sent to /v1/... exactly as any client would (the session stands in
// for the API key). Beside the forms, the curl command and the Python (openai SDK) code that
// reproduce the request, rebuilt as the form changes; they use $BUDRT_API_KEY, never the session.

import { api, can, el, fmt, showError, sse } from "./api.js";

const $ = (id) => document.getElementById(id);
const BASE = `${location.origin}/v1`;
const TABS = ["chat", "embeddings", "images"];
// Which inference action each tab needs; a `can` without the entry says nothing (the API decides).
const ACTIONS = { chat: "inference:chat", embeddings: "inference:embedding", images: "inference:image" };
let active = "chat";

// -- models: which ones chat, embed or draw --

// GET /v1/models names the models; where an entry has no `task`, its name is the best hint.
const GUESSES = [
  ["embedding", /embed|minilm|mpnet|bge|gte|e5-|nomic|sentence/i],
  ["image", /diffusion|sdxl|flux|dall-?e|imagen|kandinsky|image/i],
];

function taskOf(model) {
  if (model.task) return model.task;
  for (const [task, pattern] of GUESSES) if (pattern.test(model.id)) return task;
  return "chat";
}

// The models of `task` first; when the API does not say what a model does, the others follow
// under "Other models", so a model named against the guess can still be picked.
function fillModels(select, models, task) {
  const known = models.every((m) => m.task);
  const fit = models.filter((m) => taskOf(m) === task);
  const rest = known ? [] : models.filter((m) => taskOf(m) !== task);
  const option = (m) => el("option", { value: m.id }, m.id);
  const others = rest.length ? [el("optgroup", { label: "Other models" }, rest.map(option))] : [];
  select.replaceChildren(...fit.map(option), ...others); // replaceChildren would print a null
  select.disabled = fit.length + rest.length === 0;
  return fit.length;
}

const state = { models: [] }; // GET /v1/models' entries

function modelById(id) {
  return state.models.find((m) => m.id === id) || {};
}

async function loadModels() {
  const { data } = await api("/v1/models");
  state.models = data || [];
  const chats = fillModels($("chat-model"), state.models, "chat");
  fillModels($("embed-model"), state.models, "embedding");
  const images = fillModels($("image-model"), state.models, "image");
  $("tab-images").hidden = images === 0;
  if (!chats && !state.models.length) showError(new Error("No model is available to you."));
  imageModelChanged();
}

// -- snippets --

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

function curl(path, body) {
  const stream = body.stream ? "-N " : "";
  return [
    `curl ${stream}${BASE}${path} \\`,
    '  -H "Authorization: Bearer $BUDRT_API_KEY" \\',
    '  -H "Content-Type: application/json" \\',
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

// A JSON value as a Python literal (JSON's string escapes are valid in Python strings).
function py(value, indent = 0) {
  const pad = " ".repeat(indent + 4);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => `${pad}${py(v, indent + 4)},\n`).join("")}${" ".repeat(indent)}]`;
  }
  const entries = Object.entries(value).filter(([, v]) => v !== undefined);
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}: ${py(v, indent)}`).join(", ")}}`;
}

function kwargs(args) {
  return Object.entries(args)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `    ${k}=${py(v, 4)},`)
    .join("\n");
}

function python(imports, call, args, after) {
  return [
    ...imports, "import os", "", "from openai import OpenAI", "",
    `client = OpenAI(base_url=${JSON.stringify(BASE)}, api_key=os.environ["BUDRT_API_KEY"])`, "",
    `${call}(`, kwargs(args), ")", ...after,
  ].join("\n");
}

function showSnippets() {
  const request = { chat: chatSnippet, embeddings: embedSnippet, images: imageSnippet }[active]();
  $("snippet-curl").textContent = request.curl;
  $("snippet-python").textContent = request.python;
}

async function copy(button) {
  const pre = $(button.dataset.copy);
  try {
    await navigator.clipboard.writeText(pre.textContent);
  } catch {
    // No async clipboard (a plain-http origin other than localhost): copy the selection instead.
    const range = document.createRange();
    range.selectNodeContents(pre);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand("copy");
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// -- tabs --

function selectTab(name) {
  active = TABS.includes(name) && !$(`tab-${name}`).hidden ? name : "chat";
  for (const tab of TABS) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === active));
    $(`panel-${tab}`).hidden = tab !== active;
  }
  if (location.hash !== `#${active}`) history.replaceState(null, "", `#${active}`);
  if (can[ACTIONS[active]] === false) showError(new Error(`Your role does not allow ${ACTIONS[active]}.`));
  showSnippets();
}

// -- chat --

const chat = {
  history: [], // the conversation so far: {role, content}
  last: null, // the body of the last request sent, for the snippets once the input is empty
  controller: null,
};

function chatBody(text) {
  const system = $("chat-system").value.trim();
  const messages = [
    ...(system ? [{ role: "system", content: system }] : []),
    ...chat.history,
    { role: "user", content: text },
  ];
  const body = { model: $("chat-model").value, messages };
  const temperature = $("chat-temperature").valueAsNumber;
  const maxTokens = $("chat-max-tokens").valueAsNumber;
  if (Number.isFinite(temperature)) body.temperature = temperature;
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  return { ...body, stream: true, stream_options: { include_usage: true } };
}

function chatSnippet() {
  const text = $("chat-input").value.trim();
  const body = text || !chat.last ? chatBody(text || "Hello!") : chat.last;
  const after = [
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "    if chunk.usage:",
    '        print("\\n", chunk.usage)',
  ];
  const { stream, stream_options: options, ...args } = body;
  const code = python([], "stream = client.chat.completions.create", { ...args, stream, stream_options: options }, after);
  return { curl: curl("/chat/completions", body), python: code };
}

function bubble(role, text) {
  $("chat-log").querySelector(".empty")?.remove();
  const node = el("div", { class: `msg ${role}` }, text);
  $("chat-log").append(node);
  return node;
}

function scrollChat() {
  const log = $("chat-log");
  log.scrollTop = log.scrollHeight;
}

function setStreaming(on) {
  $("chat-send").disabled = on;
  $("chat-stop").hidden = !on;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || chat.controller) return;
  showError(null);
  const body = chatBody(text);
  chat.last = body;
  const asked = bubble("user", text);
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  $("chat-input").value = "";
  $("chat-stats").textContent = "";
  scrollChat();
  chat.controller = new AbortController();
  setStreaming(true);
  const run = { started: performance.now(), first: null, answer: "", usage: null, finish: null, stopped: false };
  try {
    for await (const chunk of sse("/v1/chat/completions", body, { signal: chat.controller.signal })) {
      readChunk(chunk, run, reply);
    }
  } catch (err) {
    if (err.name === "AbortError") run.stopped = true;
    else showError(err);
  } finally {
    chat.controller = null;
    setStreaming(false);
    reply.classList.remove("streaming");
  }
  if (run.answer) {
    chat.history.push({ role: "user", content: text }, { role: "assistant", content: run.answer });
    if (run.stopped) reply.classList.add("stopped");
    $("chat-stats").textContent = chatStats(run);
  } else {
    // Nothing came back: the turn is not part of the conversation, and the text is back to edit.
    asked.remove();
    reply.remove();
    $("chat-input").value = text;
    if (run.stopped) $("chat-stats").textContent = "Stopped before the first token.";
  }
  showSnippets();
}

function readChunk(chunk, run, reply) {
  if (chunk.error) throw new Error(chunk.error.message || "The stream ended with an error.");
  const choice = chunk.choices?.[0];
  const delta = choice?.delta?.content;
  if (delta) {
    run.first ??= performance.now();
    run.answer += delta;
    reply.textContent = run.answer;
    scrollChat();
  }
  if (choice?.finish_reason) run.finish = choice.finish_reason;
  if (chunk.usage) run.usage = chunk.usage;
}

function chatStats(run) {
  const end = performance.now();
  const parts = [];
  if (run.first !== null) parts.push(`TTFT ${fmt(Math.round(run.first - run.started), " ms")}`);
  parts.push(`total ${fmt((end - run.started) / 1000, " s")}`);
  const u = run.usage;
  if (u) {
    parts.push(`${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens`);
    if (run.first !== null && end > run.first && u.completion_tokens > 1) {
      parts.push(`${fmt((u.completion_tokens - 1) / ((end - run.first) / 1000))} tokens/s`);
    }
  }
  if (run.stopped) parts.push("stopped");
  else if (run.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function clearChat() {
  chat.controller?.abort();
  chat.history = [];
  chat.last = null;
  $("chat-log").replaceChildren(el("p", { class: "muted small empty" }, "A new conversation."));
  $("chat-stats").textContent = "";
  showSnippets();
}

// Enter sends, Shift+Enter is a new line (as in most chat boxes).
function chatKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
}

// -- embeddings --

const SAMPLE_TEXTS = [
  "The cat sat on the mat.",
  "A kitten is resting on a rug.",
  "Stock markets fell sharply today.",
];
const MAX_TEXTS = 16;

function embedTexts() {
  return [...document.querySelectorAll(".embed-text")].map((input) => input.value);
}

function renderTextInputs(texts) {
  const rows = texts.map((text, i) => el("div", { class: "embed-row" },
    el("span", { class: "index" }, `${i + 1}`),
    el("input", { class: "embed-text", type: "text", value: text, "aria-label": `Text ${i + 1}` }),
    el("button", {
      type: "button", class: "secondary", title: "Remove this text", disabled: texts.length <= 2,
      onclick: () => { renderTextInputs(embedTexts().filter((_, j) => j !== i)); showSnippets(); },
    }, "×"),
  ));
  $("embed-texts").replaceChildren(...rows);
  $("embed-add").disabled = texts.length >= MAX_TEXTS;
}

function embedBody() {
  return { model: $("embed-model").value, input: embedTexts() };
}

function embedSnippet() {
  const body = embedBody();
  const after = [
    "vectors = [item.embedding for item in response.data]", "", "",
    "def cosine(a, b):",
    "    dot = sum(x * y for x, y in zip(a, b))",
    "    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)", "", "",
    "for a in vectors:",
    "    print([round(cosine(a, b), 3) for b in vectors])",
  ];
  return { curl: curl("/embeddings", body), python: python([], "response = client.embeddings.create", body, after) };
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i += 1) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

function matrixTable(texts, vectors) {
  const head = el("tr", {}, el("th", {}, ""), texts.map((_, j) => el("th", { scope: "col" }, `${j + 1}`)));
  const rows = vectors.map((a, i) => el("tr", {},
    el("th", { scope: "row", title: texts[i] }, `${i + 1}. ${texts[i]}`),
    vectors.map((b) => {
      const value = cosine(a, b);
      const cell = el("td", {}, value.toFixed(3));
      // Shade by similarity: white at 0 or below, the accent's blue at 1.
      cell.style.backgroundColor = `rgba(47, 111, 237, ${(Math.max(0, value) * 0.45).toFixed(3)})`;
      return cell;
    }),
  ));
  return el("table", { id: "embed-matrix", class: "matrix" }, el("thead", {}, head), el("tbody", {}, rows));
}

async function runEmbeddings(event) {
  event.preventDefault();
  const body = embedBody();
  if (body.input.some((t) => !t.trim())) {
    showError(new Error("Fill in every text, or remove the empty ones."));
    return;
  }
  const button = $("embed-run");
  button.disabled = true;
  showError(null);
  const started = performance.now();
  try {
    const answer = await api("/v1/embeddings", { method: "POST", body });
    const vectors = [...answer.data].sort((a, b) => a.index - b.index).map((d) => d.embedding);
    $("embed-result").replaceChildren(
      el("h2", {}, "Cosine similarity"),
      matrixTable(body.input, vectors),
    );
    const dims = vectors[0]?.length ?? 0;
    const tokens = answer.usage?.prompt_tokens;
    $("embed-stats").textContent = [
      `${dims} dimensions`, tokens !== undefined ? `${tokens} tokens` : null,
      fmt(Math.round(performance.now() - started), " ms"),
    ].filter(Boolean).join(" · ");
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// -- images --

const image = { controller: null };
const PARTIAL_IMAGES = 3; // previews while it denoises (the API allows 0-3)

function imageModelChanged() {
  // A model that lists its sizes (`image_sizes`, when the API gives them) offers them here.
  const sizes = modelById($("image-model").value).image_sizes || [];
  $("image-sizes").replaceChildren(...sizes.map((s) => el("option", { value: s })));
  if (sizes.length && !sizes.includes($("image-size").value)) $("image-size").value = sizes[0];
}

function imageBody() {
  const body = { model: $("image-model").value, prompt: $("image-prompt").value.trim() };
  const size = $("image-size").value.trim();
  if (size && size !== "auto") body.size = size;
  return { ...body, stream: true, partial_images: PARTIAL_IMAGES };
}

// budrt's own knobs beyond OpenAI's: the SDK sends them through extra_body.
function imageExtras() {
  const extras = {};
  const steps = $("image-steps").valueAsNumber;
  const seed = $("image-seed").valueAsNumber;
  if (Number.isFinite(steps)) extras.steps = steps;
  if (Number.isFinite(seed)) extras.seed = seed;
  return extras;
}

function imageSnippet() {
  const body = { ...imageBody(), ...imageExtras() };
  const extras = imageExtras();
  const args = { ...imageBody(), extra_body: Object.keys(extras).length ? extras : undefined };
  if (!args.prompt) args.prompt = "…";
  const after = [
    "for event in stream:",
    '    if event.type == "image_generation.partial_image":',
    '        print("preview", event.partial_image_index)',
    '    elif event.type == "image_generation.completed":',
    '        with open(f"image-{event.image_index}.png", "wb") as f:',
    "            f.write(base64.b64decode(event.b64_json))",
  ];
  return { curl: curl("/images/generations", body), python: python(["import base64"], "stream = client.images.generate", args, after) };
}

function picture(b64, format, caption, index = null) {
  const src = `data:image/${format || "png"};base64,${b64}`;
  const img = el("img", { src, alt: caption });
  // Small pictures (the demo model's 64x64) are scaled up without blurring.
  img.addEventListener("load", () => img.classList.toggle("small-image", img.naturalWidth < 256));
  const save = index === null ? null : el("a", { href: src, download: `image-${index}.${format || "png"}` }, "Download");
  return el("figure", {}, img, el("figcaption", {}, caption, save ? " · " : null, save));
}

function setProgress(fraction) {
  const bar = $("image-progress");
  bar.hidden = fraction === null;
  bar.firstElementChild.style.width = `${Math.round((fraction || 0) * 100)}%`;
}

async function runImages(event) {
  event.preventDefault();
  if (image.controller) return;
  const body = { ...imageBody(), ...imageExtras() };
  if (!body.prompt) {
    showError(new Error("Write a prompt first."));
    return;
  }
  showError(null);
  const output = $("image-output");
  output.replaceChildren();
  image.controller = new AbortController();
  $("image-run").disabled = true;
  $("image-stop").hidden = false;
  setProgress(0);
  const started = performance.now();
  let done = 0, usage = null, stopped = false;
  const slots = new Map(); // image_index -> its figure (a preview, then the picture)
  const show = (index, figure) => {
    if (slots.has(index)) slots.get(index).replaceWith(figure);
    else output.append(figure);
    slots.set(index, figure);
  };
  try {
    for await (const ev of sse("/v1/images/generations", body, { signal: image.controller.signal })) {
      if (ev.error) throw new Error(ev.error.message || "The stream ended with an error.");
      if (ev.type === "image_generation.progress") {
        setProgress(ev.step / ev.steps);
        $("image-stats").textContent = `step ${ev.step} of ${ev.steps}`;
      } else if (ev.type === "image_generation.partial_image") {
        show(ev.image_index, picture(ev.b64_json, ev.output_format, `preview ${ev.partial_image_index + 1}`));
      } else if (ev.type === "image_generation.completed") {
        done += 1;
        const caption = `${ev.size || ""} ${ev.output_format || "png"}`.trim();
        show(ev.image_index, picture(ev.b64_json, ev.output_format, caption, ev.image_index));
        if (ev.usage) usage = ev.usage;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else showError(err);
  } finally {
    image.controller = null;
    $("image-run").disabled = false;
    $("image-stop").hidden = true;
    setProgress(null);
  }
  const parts = [`${done} image${done === 1 ? "" : "s"}`, fmt((performance.now() - started) / 1000, " s")];
  if (usage?.input_tokens !== undefined) parts.push(`${usage.input_tokens} prompt tokens`);
  if (stopped) parts.push("stopped");
  $("image-stats").textContent = parts.join(" · ");
}

// -- wiring --

function wire() {
  for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => copy(button));
  }
  // Any edit of any form rebuilds the snippets (cheap: a few strings).
  $("playground").addEventListener("input", showSnippets);
  $("playground").addEventListener("change", showSnippets);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", chatKey);
  $("chat-stop").addEventListener("click", () => chat.controller?.abort());
  $("chat-clear").addEventListener("click", clearChat);
  $("embed-form").addEventListener("submit", runEmbeddings);
  $("embed-add").addEventListener("click", () => {
    renderTextInputs([...embedTexts(), ""]);
    $("embed-texts").lastElementChild?.querySelector("input")?.focus();
    showSnippets();
  });
  $("image-form").addEventListener("submit", runImages);
  $("image-model").addEventListener("change", imageModelChanged);
  $("image-stop").addEventListener("click", () => image.controller?.abort());
}

async function main() {
  wire();
  renderTextInputs(SAMPLE_TEXTS);
  try {
    await loadModels();
  } catch (err) {
    showError(err);
  }
  selectTab(location.hash.slice(1));
}

main();
