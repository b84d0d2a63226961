// qtool studio: chat, arena and the chat-template editor over qtool serve's OpenAI routes (/v1/...) and the
// page's own routes (/studio/api/...). Plain JS, no build step.
"use strict";

const SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty"];
const state = {
  models: [],             // /studio/api/models
  key: sessionStorage.getItem("qtool-api-key") || "",
  history: [],            // chat turns sent so far (files included), system message apart
  files: [],              // [{name, data (base64), size}] for the next message
  fit: null,              // the last /studio/api/context answer
  abort: null,            // the chat stream's AbortController
  arena: null,            // the last arena run: {prompt, replies}
  templateLoaded: "",
};
const $ = (id) => document.getElementById(id);

function headers(json = true) {
  const h = json ? {"Content-Type": "application/json"} : {};
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {headers: headers(false)}
    : {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({error: {message: `HTTP ${response.status}`}}));
  if (response.status === 401) $("key-box").hidden = false;
  if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
  return data;
}

function banner(text) {
  $("banner").textContent = text || "";
  $("banner").hidden = !text;
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

// ---- models and sampling defaults ----

async function loadModels() {
  try {
    const data = await api("/studio/api/models");
    state.models = data.models;
    state.votesFile = data.votes_file;
    state.policy = data.fit_policy;
    banner("");
  } catch (err) {
    banner("cannot list the models: " + err.message);
    return;
  }
  const select = $("model");
  const previous = select.value;
  select.innerHTML = "";
  for (const m of state.models) select.add(new Option(m.name, m.name));
  if (previous && state.models.some((m) => m.name === previous)) select.value = previous;
  $("arena-models").innerHTML = "";
  for (const m of state.models) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" checked value=""> <span></span>`;
    label.querySelector("input").value = m.name;
    label.querySelector("span").textContent = m.name;
    $("arena-models").append(label);
  }
  modelChanged();
}

function modelChanged() {
  const m = currentModel();
  if (!m) return;
  $("model-info").textContent = `context ${m.context_length ?? "?"} tokens · template: ${m.template_origin}` +
    (m.has_chat_template ? "" : " (none shipped: the Chat template tab can use qtool's pick for this session)");
  // a reply budget that leaves most of a small context to the prompt, until the user sets one
  if (!$("max_tokens").dataset.touched && m.context_length) $("max_tokens").value = Math.min(256, Math.floor(m.context_length / 4));
  const box = $("sampling");
  box.innerHTML = "";
  for (const field of SAMPLING_FIELDS) {
    const value = m.sampling_defaults.values[field];
    const source = m.sampling_defaults.sources[field];
    const label = document.createElement("label");
    label.innerHTML = `<span></span> <input type="number" step="any"> <small class="dim"></small>`;
    label.querySelector("span").textContent = field;
    const input = label.querySelector("input");
    input.id = "s-" + field;
    input.value = value;
    label.querySelector("small").textContent = source;
    label.querySelector("small").className = "source dim";
    label.querySelector("small").dataset.field = field;
    box.append(label);
  }
  loadTemplate();
  refreshFit();
}

function samplingFields() {
  const out = {};
  for (const field of SAMPLING_FIELDS) {
    const input = $("s-" + field);
    if (input && input.value !== "") out[field] = Number(input.value);
  }
  const maxTokens = Number($("max_tokens").value);
  if (maxTokens > 0) out.max_tokens = maxTokens;
  if ($("seed").value !== "") out.seed = Number($("seed").value);
  return out;
}

// ---- streaming a chat completion ----

// Streams /v1/chat/completions; onText(piece) per delta. Resolves {text, ttft, seconds, tokens, finish}.
async function streamChat(model, messages, onText, signal) {
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({model, messages, stream: true, stream_options: {include_usage: true}, ...samplingFields()}),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    if (response.status === 401) $("key-box").hidden = false;
    throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", ttft = null, tokens = null, promptTokens = null, finish = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) { tokens = chunk.usage.completion_tokens; promptTokens = chunk.usage.prompt_tokens; }
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (ttft === null) ttft = (performance.now() - started) / 1000;
            text += piece;
            onText(piece);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  const seconds = (performance.now() - started) / 1000;
  return {text, ttft, seconds, tokens, promptTokens, finish};
}

function speedLine(r) {
  const tps = r.tokens && r.seconds > 0 ? (r.tokens / r.seconds).toFixed(1) : "?";
  const ttft = r.ttft === null ? "?" : r.ttft.toFixed(2) + " s";
  const prompt = r.promptTokens === null || r.promptTokens === undefined ? "" : ` · prompt ${r.promptTokens} tokens`;
  return `${r.tokens ?? "?"} tokens · first token ${ttft} · ${tps} tokens/s · ${r.finish || ""}${prompt}`;
}

// ---- chat ----

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("b");
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  div.append(who, body);
  $("messages").append(div);
  div.scrollIntoView({block: "end"});
  return body;
}

function conversation(userText) {
  const system = $("system").value.trim();
  return [...(system ? [{role: "system", content: system}] : []), ...state.history, {role: "user", content: userText}];
}

async function send() {
  const text = $("chat-input").value;
  if (!text.trim() && !state.files.length) return;
  const model = $("model").value;
  let messages = conversation(text);
  banner("");
  try {
    if (state.files.length || state.history.length) {
      // the files as labelled blocks, the whole cut to the context by the stated policy
      const fit = await api("/studio/api/context", {model, messages, files: state.files.map(({name, data}) => ({name, data})),
                                                    max_tokens: samplingFields().max_tokens || 0});
      messages = fit.messages;
      showFit(fit);
    }
  } catch (err) {
    banner(err.message);
    return;
  }
  const attached = state.files.map((f) => f.name);
  $("chat-input").value = "";
  state.files = [];
  renderFiles();
  addMessage("user", text + (attached.length ? `  [+ ${attached.join(", ")}]` : ""));
  const target = addMessage("assistant", "");
  target.parentElement.classList.add("streaming");
  state.abort = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const result = await streamChat(model, messages, (piece) => { target.textContent += piece; }, state.abort.signal);
    state.history = messages.filter((m) => m.role !== "system").concat([{role: "assistant", content: result.text}]);
    $("chat-stats").textContent = speedLine(result);
  } catch (err) {
    if (err.name !== "AbortError") banner(err.message);
  } finally {
    target.parentElement.classList.remove("streaming");
    $("send").disabled = false;
    $("stop").disabled = true;
    state.abort = null;
    refreshFit();
  }
}

// ---- files as context ----

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

async function addFiles(list) {
  for (const file of list) {
    state.files.push({name: file.name, size: file.size, data: toBase64(await file.arrayBuffer())});
  }
  renderFiles();
  refreshFit();
}

function renderFiles() {
  const ul = $("file-list");
  ul.innerHTML = "";
  state.files.forEach((file, index) => {
    const li = document.createElement("li");
    const fit = state.fit && state.fit.files.find((f) => f.name === file.name);
    li.textContent = `${file.name} (${file.size} bytes${fit ? `, ${fit.tokens} tokens` : ""}) `;
    li.dataset.name = file.name;
    const remove = document.createElement("button");
    remove.textContent = "remove";
    remove.onclick = () => { state.files.splice(index, 1); renderFiles(); refreshFit(); };
    li.append(remove);
    ul.append(li);
  });
}

function showFit(fit) {
  state.fit = fit;
  const m = currentModel();
  $("token-count").textContent = `prompt ${fit.prompt_tokens} tokens` +
    (fit.original_tokens !== fit.prompt_tokens ? ` (${fit.original_tokens} before the cuts)` : "") +
    ` of the ${fit.context_length ?? (m && m.context_length) ?? "?"}-token context, ${fit.reserve_tokens} kept for the reply`;
  $("token-count").dataset.tokens = fit.prompt_tokens;
  $("cuts").innerHTML = "";
  for (const cut of fit.cuts) {
    const li = document.createElement("li");
    li.textContent = cut;
    $("cuts").append(li);
  }
  if (fit.cuts.length) {
    const li = document.createElement("li");
    li.className = "dim";
    li.textContent = "policy: " + fit.policy;
    $("cuts").append(li);
  }
  renderFiles();
}

let fitTimer = null;
function refreshFit() {
  clearTimeout(fitTimer);
  fitTimer = setTimeout(async () => {
    const model = $("model").value;
    if (!model) return;
    if (!state.files.length) {
      state.fit = null;
      $("token-count").textContent = "";
      $("cuts").innerHTML = "";
      return;
    }
    try {
      showFit(await api("/studio/api/context", {model, messages: conversation($("chat-input").value),
        files: state.files.map(({name, data}) => ({name, data})), max_tokens: samplingFields().max_tokens || 0}));
      banner("");
    } catch (err) {
      $("token-count").textContent = "";
      banner(err.message);
    }
  }, 250);
}

// ---- arena ----

async function runArena() {
  const names = [...document.querySelectorAll("#arena-models input:checked")].map((i) => i.value);
  const prompt = $("arena-prompt").value;
  if (names.length < 2) { banner("choose two or more models for the arena"); return; }
  if (!prompt.trim()) { banner("write a prompt for the arena"); return; }
  banner("");
  const system = $("system").value.trim();
  const messages = [...(system ? [{role: "system", content: system}] : []), {role: "user", content: prompt}];
  const grid = $("arena-grid");
  grid.innerHTML = "";
  $("arena-vote").hidden = true;
  $("vote-status").textContent = "";
  $("arena-run").disabled = true;
  const runs = names.map(async (name) => {
    const column = document.createElement("div");
    column.className = "arena-col streaming";
    column.dataset.model = name;
    column.innerHTML = `<h3></h3><div class="content"></div><div class="stats dim"></div>`;
    column.querySelector("h3").textContent = name;
    grid.append(column);
    const body = column.querySelector(".content");
    try {
      const r = await streamChat(name, messages, (piece) => { body.textContent += piece; });
      column.querySelector(".stats").textContent = speedLine(r);
      column.dataset.tokens = r.tokens;
      return [name, {text: r.text, tokens: r.tokens, ttft_s: r.ttft, seconds: r.seconds}];
    } catch (err) {
      column.querySelector(".stats").textContent = "error: " + err.message;
      return [name, {error: err.message}];
    } finally {
      column.classList.remove("streaming");
    }
  });
  const replies = Object.fromEntries(await Promise.all(runs));
  $("arena-run").disabled = false;
  state.arena = {prompt, models: names, replies};
  const vote = $("arena-vote");
  vote.innerHTML = "<span>Which is better?</span>";
  for (const choice of [...names, "tie", "both bad"]) {
    const button = document.createElement("button");
    button.textContent = choice;
    button.dataset.vote = choice;
    button.onclick = () => castVote(choice);
    vote.append(button);
  }
  vote.hidden = false;
}

async function castVote(winner) {
  try {
    const result = await api("/studio/api/arena/vote", {...state.arena, winner});
    $("vote-status").textContent = `vote for ${winner} saved to ${result.saved}`;
    $("arena-vote").hidden = true;
  } catch (err) {
    banner(err.message);
  }
}

// ---- chat template ----

async function loadTemplate() {
  const model = $("model").value;
  if (!model) return;
  try {
    const data = await api("/studio/api/template?model=" + encodeURIComponent(model));
    $("template-origin").textContent = data.reason;
    $("template-origin").dataset.origin = data.origin;
    $("template-editor").value = data.template;
    state.templateLoaded = data.template;
    $("template-save").disabled = !data.can_save;
    $("template-save").title = data.can_save ? "" : "the model was not loaded from a directory: use it for this session";
    showRender(data.render);
  } catch (err) {
    banner(err.message);
  }
}

function showRender(render) {
  const error = $("template-error");
  if (render.error) {
    error.textContent = (render.line ? `line ${render.line}: ` : "") + render.error;
    error.hidden = false;
    $("template-render").classList.add("stale");
  } else {
    error.hidden = true;
    $("template-render").textContent = render.text;
    $("template-render").classList.remove("stale");
  }
}

let renderTimer = null;
function templateEdited() {
  clearTimeout(renderTimer);
  renderTimer = setTimeout(async () => {
    try {
      showRender(await api("/studio/api/template/render", {model: $("model").value, template: $("template-editor").value}));
    } catch (err) {
      banner(err.message);
    }
  }, 200);
}

async function saveTemplate(scope) {
  try {
    const result = await api("/studio/api/template/save", {model: $("model").value, template: $("template-editor").value, scope});
    $("template-status").textContent = scope === "session" ? "in use until the server stops (not saved)" : "saved to " + result.saved;
    await loadModels();
  } catch (err) {
    $("template-status").textContent = "";
    banner(err.message);
  }
}

// ---- wiring ----

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== "tab-" + name;
}

function wire() {
  for (const tab of document.querySelectorAll(".tab")) tab.onclick = () => showTab(tab.dataset.tab);
  $("model").onchange = modelChanged;
  $("send").onclick = send;
  $("stop").onclick = () => state.abort && state.abort.abort();
  $("reset").onclick = () => { state.history = []; $("messages").innerHTML = ""; $("chat-stats").textContent = ""; refreshFit(); };
  $("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  $("chat-input").addEventListener("input", () => { if (state.files.length) refreshFit(); });
  $("system").addEventListener("input", () => { if (state.files.length) refreshFit(); });
  $("max_tokens").addEventListener("input", () => { $("max_tokens").dataset.touched = "1"; if (state.files.length) refreshFit(); });
  $("file-input").onchange = (e) => { addFiles([...e.target.files]); e.target.value = ""; };
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles([...e.dataTransfer.files]); });
  $("arena-run").onclick = runArena;
  $("template-editor").addEventListener("input", templateEdited);
  $("template-session").onclick = () => saveTemplate("session");
  $("template-save").onclick = () => saveTemplate("model");
  $("template-revert").onclick = () => { $("template-editor").value = state.templateLoaded; templateEdited(); };
  $("key-save").onclick = () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("qtool-api-key", state.key);
    loadModels();
  };
}

wire();
loadModels();
