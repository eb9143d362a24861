// The chat page of `ovchat serve`. It talks to the server's own OpenAI API (streamed chat
// completions, /v1/models) and keeps conversations in this browser's localStorage, in the format
// `/save` writes. Replies are rendered by markdown.js, which never turns model text into HTML.
import { render } from "./markdown.js";

const STORE = "ovchat.conversations";
const KEY = "ovchat.api-key"; // sessionStorage: this tab only
const FORMAT = "ovchat-conversation";
const $ = (id) => document.getElementById(id);

const ui = {
  list: $("conversations"), messages: $("messages"), model: $("model"), state: $("model-state"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), system: $("system"), temperature: $("temperature"),
  maxTokens: $("max-tokens"), settings: $("settings"), toggleSettings: $("toggle-settings"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), key: $("key"), keyError: $("key-error"),
};

let conversations = loadConversations();
let current = null; // the open conversation
let models = []; // /v1/models' chat models
let running = null; // {controller} while a reply streams

// -- storage ---------------------------------------------------------------------------------

function loadConversations() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(saved) ? saved.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages)) : [];
  } catch {
    return [];
  }
}

function saveConversations() {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
  } catch (e) {
    showError(`The conversation could not be kept in this browser (${e.name}): delete old conversations to make room.`);
  }
}

function newConversation() {
  if (current && !current.messages.length) return open(current); // already a new one
  const last = current || conversations[0];
  const c = {
    id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2),
    title: "New chat", model: ui.model.value || last?.model || "", system: last?.system || "",
    options: { temperature: last?.options?.temperature ?? 0, max_new_tokens: last?.options?.max_new_tokens ?? 1024 },
    messages: [], updated: Date.now(),
  };
  conversations.unshift(c);
  open(c);
}

// The conversation as `/save` writes it (so `ovchat chat` can /load it).
function exported(c) {
  const messages = (c.system ? [{ role: "system", content: c.system }] : [])
    .concat(c.messages.map((m) => ({ role: m.role, content: m.content })));
  return {
    format: FORMAT, version: 1, model: c.model,
    options: { max_new_tokens: c.options.max_new_tokens, temperature: c.options.temperature, top_p: 1.0, top_k: 0,
               repetition_penalty: 1.0, stop: [], seed: null },
    messages,
  };
}

function download(c) {
  const blob = new Blob([JSON.stringify(exported(c), null, 2) + "\n"], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${c.title.replace(/[^\w .-]+/g, "_").slice(0, 60) || "conversation"}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

// -- the API ---------------------------------------------------------------------------------

class APIFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function askKey(message) {
  ui.keyError.hidden = !message;
  ui.keyError.textContent = message || "";
  ui.key.value = "";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.key.focus();
  return new Promise((resolve) => {
    ui.keyForm.onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, ui.key.value.trim());
      ui.keyDialog.close();
      resolve();
    };
  });
}

async function errorText(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message || (typeof body?.error === "string" ? body.error : message);
  } catch {
    // not JSON: keep the status line
  }
  const hint = { 429: "The server is busy; try again in a moment.", 503: "The model is not ready yet; try again shortly.",
                 507: "The server has no memory left for this model." }[response.status];
  return hint ? `${hint} (${response.status}: ${message})` : `${message} (${response.status})`;
}

// fetch() with the API key; a 401 asks for the key and tries again.
async function api(path, init = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY);
    const headers = { ...(init.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    await askKey(key ? "That key was not accepted." : "");
  }
}

async function refreshModels() {
  let response;
  try {
    response = await api("/v1/models");
  } catch (e) {
    ui.state.textContent = "the server cannot be reached";
    return;
  }
  if (!response.ok) {
    ui.state.textContent = await errorText(response);
    return;
  }
  const body = await response.json();
  models = body.data.filter((m) => (m.ovchat?.kind || "chat") === "chat");
  const chosen = current?.model || ui.model.value;
  ui.model.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (models.some((m) => m.id === chosen)) ui.model.value = chosen;
  if (current && !current.model) current.model = ui.model.value;
  showModelState();
}

function showModelState(loading = false) {
  const m = models.find((x) => x.id === ui.model.value);
  if (!m) {
    ui.state.textContent = models.length ? "" : "no chat model in the store (ovchat pull NAME)";
  } else if (loading) {
    ui.state.textContent = "loading…";
  } else {
    const state = m.ovchat?.state || "unloaded";
    ui.state.textContent = state === "ready" ? "ready" : state === "unloaded" ? "loads on first message" : state;
  }
}

// -- rendering -------------------------------------------------------------------------------

function stats(s) {
  if (!s) return "";
  const parts = [];
  if (s.tokens !== undefined) parts.push(`${s.tokens} tokens`);
  if (s.rate) parts.push(`${s.rate.toFixed(1)} tok/s`);
  if (s.ttft !== undefined) parts.push(`first token ${s.ttft.toFixed(2)} s`);
  if (s.stopped) parts.push("stopped");
  if (s.model) parts.push(s.model);
  return parts.join(" · ");
}

function messageNode(m) {
  const body = document.createElement("div");
  body.className = "body";
  const node = document.createElement("div");
  node.className = `msg ${m.role}`;
  node.append(body);
  fill(node, m);
  return node;
}

function fill(node, m) {
  const body = node.querySelector(".body");
  if (m.role === "assistant") {
    body.replaceChildren();
    if (m.reasoning) {
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = "Reasoning";
      details.append(summary, render(m.reasoning));
      body.append(details);
    }
    body.append(render(m.content));
  } else {
    body.textContent = m.content; // a user's own text, shown as typed
  }
  let line = node.querySelector(".stats");
  const text = stats(m.stats);
  if (text && !line) {
    line = document.createElement("div");
    line.className = "stats";
    node.append(line);
  }
  if (line) line.textContent = text;
}

function showError(text) {
  const node = document.createElement("div");
  node.className = "msg error";
  node.setAttribute("role", "alert");
  node.textContent = text;
  ui.messages.append(node);
  node.scrollIntoView({ block: "end" });
}

function showMessages() {
  ui.messages.replaceChildren(...current.messages.map(messageNode));
  ui.messages.lastChild?.scrollIntoView({ block: "end" });
}

function showList() {
  ui.list.replaceChildren(...conversations.map((c) => {
    const li = document.createElement("li");
    li.className = c === current ? "current" : "";
    const title = document.createElement("button");
    title.type = "button";
    title.className = "title";
    title.textContent = c.title;
    title.title = c.title;
    title.addEventListener("click", () => { if (!running) open(c); });
    const actions = [["✎", "Rename", () => rename(c, li, title)], ["⤓", "Export as JSON", () => download(c)],
                     ["✕", "Delete", () => remove(c)]].map(([label, name, action]) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.title = name;
      b.setAttribute("aria-label", `${name}: ${c.title}`);
      b.className = name.split(" ")[0].toLowerCase();
      b.addEventListener("click", action);
      return b;
    });
    li.append(title, ...actions);
    return li;
  }));
}

function rename(c, li, title) {
  const input = document.createElement("input");
  input.value = c.title;
  input.setAttribute("aria-label", "New name");
  title.replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) {
      c.title = input.value.trim().slice(0, 200);
      saveConversations();
    }
    showList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") { e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

function remove(c) {
  if (running && c === current) return;
  conversations = conversations.filter((x) => x !== c);
  saveConversations();
  if (c === current) {
    if (conversations.length) open(conversations[0]);
    else newConversation();
  } else {
    showList();
  }
}

function open(c) {
  // A conversation left without a message is not worth keeping in the list.
  conversations = conversations.filter((x) => x === c || x.messages.length);
  current = c;
  ui.system.value = c.system || "";
  ui.temperature.value = c.options.temperature;
  ui.maxTokens.value = c.options.max_new_tokens;
  if (c.model && [...ui.model.options].some((o) => o.value === c.model)) ui.model.value = c.model;
  showModelState();
  showMessages();
  showList();
  document.body.classList.remove("sidebar-open");
  ui.prompt.focus();
}

// -- a turn ----------------------------------------------------------------------------------

function readSettings() {
  const temperature = Number(ui.temperature.value);
  const maxTokens = Math.round(Number(ui.maxTokens.value));
  if (!Number.isFinite(temperature) || temperature < 0 || temperature > 2) throw new Error("Temperature must be between 0 and 2.");
  if (!Number.isFinite(maxTokens) || maxTokens < 1) throw new Error("Max tokens must be a whole number of at least 1.");
  current.system = ui.system.value;
  current.options = { temperature, max_new_tokens: maxTokens };
  current.model = ui.model.value;
}

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function sendMessage(text) {
  if (running || !text.trim()) return;
  try {
    readSettings();
  } catch (e) {
    showError(e.message);
    return;
  }
  if (!current.model) {
    showError("Choose a model first (no chat model is listed: pull one with `ovchat pull NAME`).");
    return;
  }
  const c = current;
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.trim().replace(/\s+/g, " ").slice(0, 48);
  c.updated = Date.now();
  conversations = [c, ...conversations.filter((x) => x !== c)];
  saveConversations();
  showList();
  const asked = messageNode(c.messages[c.messages.length - 1]);
  ui.messages.append(asked);
  ui.prompt.value = "";

  const reply = { role: "assistant", content: "", stats: {} };
  const node = messageNode(reply);
  node.classList.add("pending");
  const model = models.find((m) => m.id === c.model);
  const loading = model && model.ovchat?.state !== "ready";
  node.querySelector(".body").textContent = loading ? `Loading ${c.model}…` : "…";
  showModelState(loading);
  ui.messages.append(node);
  node.scrollIntoView({ block: "end" });

  const controller = new AbortController();
  running = { controller };
  ui.send.hidden = true;
  ui.stop.hidden = false;
  const started = performance.now();
  let first = null;
  let usage = null;
  let frame = 0;
  const draw = () => {
    frame = 0;
    fill(node, reply);
    node.scrollIntoView({ block: "end" });
  };
  try {
    const history = c.messages.map((m) => ({ role: m.role, content: m.content }));
    const response = await api("/v1/chat/completions", {
      method: "POST", signal: controller.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: c.model, stream: true, stream_options: { include_usage: true },
        messages: (c.system.trim() ? [{ role: "system", content: c.system }] : []).concat(history),
        temperature: c.options.temperature, max_tokens: c.options.max_new_tokens,
      }),
    });
    if (!response.ok) throw new APIFailure(response.status, await errorText(response));
    for await (const event of events(response)) {
      if (event.error) throw new APIFailure(0, event.error.message || String(event.error));
      if (event.usage) usage = event.usage;
      const delta = event.choices?.[0]?.delta || {};
      if (delta.content || delta.reasoning_content) {
        if (first === null) {
          first = performance.now();
          node.classList.remove("pending");
          showModelState();
        }
        reply.content += delta.content || "";
        if (delta.reasoning_content) reply.reasoning = (reply.reasoning || "") + delta.reasoning_content;
        if (!frame) frame = requestAnimationFrame(draw);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      reply.stats.stopped = true;
    } else {
      reply.failed = e instanceof APIFailure ? e.message : `The server could not be reached (${e.message}).`;
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    running = null;
    ui.send.hidden = false;
    ui.stop.hidden = true;
  }
  const end = performance.now();
  node.classList.remove("pending");
  if (reply.content || reply.reasoning) {
    if (first !== null) reply.stats.ttft = (first - started) / 1000;
    const tokens = usage?.completion_tokens;
    if (tokens !== undefined) reply.stats.tokens = tokens;
    if (tokens > 1 && end > first) reply.stats.rate = (tokens - 1) / ((end - first) / 1000);
    reply.stats.model = c.model;
    c.messages.push(reply);
    fill(node, reply);
  } else {
    // No reply (refused, failed, or stopped before its first word): the question goes back into
    // the box, so the conversation never holds two questions in a row.
    node.remove();
    asked.remove();
    c.messages.pop();
    if (!ui.prompt.value) ui.prompt.value = text;
  }
  c.updated = Date.now();
  saveConversations();
  if (reply.failed) showError(reply.failed);
  if (loading || reply.failed) refreshModels();
  else showModelState();
  ui.prompt.focus();
}

function stop() {
  running?.controller.abort();
}

// -- wiring ----------------------------------------------------------------------------------

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  sendMessage(ui.prompt.value);
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendMessage(ui.prompt.value);
  }
});
ui.stop.addEventListener("click", stop);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && running) {
    e.preventDefault();
    stop();
  }
});
$("new-chat").addEventListener("click", () => { if (!running) newConversation(); });
$("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
$("close-sidebar").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
ui.toggleSettings.addEventListener("click", () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.toggleSettings.setAttribute("aria-expanded", String(!ui.settings.hidden));
});
ui.model.addEventListener("change", () => {
  if (current) {
    current.model = ui.model.value;
    saveConversations();
  }
  showModelState();
});
for (const input of [ui.system, ui.temperature, ui.maxTokens]) {
  input.addEventListener("change", () => {
    try {
      readSettings();
      saveConversations();
    } catch (e) {
      showError(e.message);
    }
  });
}
window.addEventListener("storage", (e) => {
  if (e.key === STORE && !running) {
    conversations = loadConversations();
    showList();
  }
});

refreshModels().then(() => {
  if (conversations.length) open(conversations[0]);
  else newConversation();
});
