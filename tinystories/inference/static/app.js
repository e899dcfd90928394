// TinyStories playground: streams /v1/generate (server-sent events over fetch + ReadableStream).
"use strict";

const $ = (id) => document.getElementById(id);
const STARTERS = [
  "Once upon a time, there was a little dog named",
  "Lily wanted to fly a kite, but",
  "Tom found a shiny red ball in the park.",
  "One day, a tiny bird could not find its mom.",
  "The sun was hot, so Ben and Sue went to the",
  "Max had a big box of toys. He",
];
const SLIDERS = ["temperature", "top_k", "top_p", "max_new_tokens"];
// the features a model trained on requests knows (data/requests.py FEATURES), as the API takes them
const FEATURES = [["dialogue", "Dialogue"], ["badending", "Bad ending"], ["moralvalue", "Moral"],
  ["twist", "Twist"], ["foreshadowing", "Foreshadowing"], ["conflict", "Conflict"]];

let controller = null; // AbortController of the running request
let selected = null;

// The API key, when the server was started with --api-key: asked for once, kept in this browser (localStorage).
const KEY_STORE = "tinystories-api-key";
let keyWaiters = [];

function storedKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch (e) { return ""; }
}

function withKey(headers) {
  const k = storedKey();
  return k ? { ...headers, authorization: "Bearer " + k } : headers;
}

// Show the key form (with why) and resolve once a key is entered.
function askForKey(why) {
  $("key-msg").textContent = why;
  $("key-form").hidden = false;
  $("api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function keyEntered(e) {
  e.preventDefault();
  const k = $("api-key").value.trim();
  if (!k) return;
  try { localStorage.setItem(KEY_STORE, k); } catch (err) { /* kept for this page only */ }
  $("key-form").hidden = true;
  $("api-key").value = "";
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const w of waiters) w();
}

// fetch() an API path with the key; on 401, forget the key, ask for one and try again.
async function api(path, options = {}) {
  for (;;) {
    const r = await fetch(path, { ...options, headers: withKey(options.headers || {}) });
    if (r.status !== 401) return r;
    const had = storedKey();
    try { localStorage.removeItem(KEY_STORE); } catch (e) { /* nothing stored */ }
    setStatus("needs an API key", "error");
    await askForKey(had ? "(that key was not accepted: try again)" : "(ask whoever runs it; this browser remembers it)");
    setStatus("ready");
  }
}

function setStatus(text, cls) {
  const s = $("status");
  s.textContent = text;
  s.className = "status" + (cls ? " " + cls : "");
}

function showSlider(name) {
  const v = Number($(name).value);
  let txt = String(v);
  if (name === "top_k" && v === 0) txt = "off";
  if (name === "top_p" && v >= 1) txt = "off";
  if (name === "temperature") txt = v === 0 ? "greedy" : v.toFixed(2);
  $(name + "-out").textContent = txt;
}

async function loadModel() {
  try {
    const r = await api("/v1/model");
    const m = await r.json();
    const params = m.parameters >= 1e6 ? (m.parameters / 1e6).toFixed(1) + "M" : Math.round(m.parameters / 1e3) + "K";
    const parts = [m.name, params + " parameters", m.architecture.n_layers + " layers × " + m.architecture.dim,
      m.tokenizer.kind + " " + m.tokenizer.vocab_size, "context " + m.context];
    if (m.step) parts.push("step " + m.step.toLocaleString());
    if (m.val_bpb != null) parts.push("val " + m.val_bpb.toFixed(3) + " bpb");
    $("model-info").textContent = parts.join(" · ");
    const len = $("max_new_tokens");
    len.max = String(m.context - 8);
    if (Number(len.value) > m.context - 8) len.value = String(Math.min(200, m.context - 8));
    showSlider("max_new_tokens");
    $("request").hidden = m.text_format !== "instruct"; // only a model trained on requests can follow one
  } catch (e) {
    $("model-info").textContent = "model info unavailable";
  }
}

function fmtProb(p) {
  if (p >= 0.995) return "100%";
  if (p >= 0.1) return (p * 100).toFixed(0) + "%";
  if (p >= 0.001) return (p * 100).toFixed(1) + "%";
  return "<0.1%";
}

// A token as it reads in a list: whitespace-only tokens made visible.
function visible(t) {
  if (t === "\n" || t === "\n\n") return t.length === 1 ? "↵ new line" : "↵↵ new paragraph";
  if (t.trim() === "") return "␣ space";
  return t.replace(/\n/g, "↵");
}

function showWhy(span) {
  const why = $("why");
  if (selected) selected.classList.remove("sel");
  selected = span;
  span.classList.add("sel");
  const top = JSON.parse(span.dataset.top || "[]");
  const id = Number(span.dataset.id);
  $("why-token").textContent = span.textContent.trim() || span.textContent;
  const list = $("why-list");
  list.replaceChildren();
  let inTop = false;
  for (const alt of top) {
    const li = document.createElement("li");
    if (alt.id === id) { li.className = "chosen"; inTop = true; }
    const w = document.createElement("span");
    w.className = "w";
    const bar = document.createElement("i");
    bar.className = "bar";
    bar.style.width = Math.max(2, alt.prob * 100) + "%";
    const label = document.createElement("span");
    label.textContent = visible(alt.token);
    w.append(bar, label);
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = fmtProb(alt.prob);
    li.append(w, p);
    list.append(li);
  }
  if (!inTop && top.length) {
    const li = document.createElement("li");
    li.className = "chosen";
    li.innerHTML = '<span class="w"></span><span class="p">sampled</span>';
    li.firstChild.textContent = visible(span.dataset.token || span.textContent);
    list.append(li);
  }
  why.hidden = false;
  const story = why.parentElement.getBoundingClientRect();
  const r = span.getBoundingClientRect();
  let left = r.left - story.left;
  left = Math.max(8, Math.min(left, story.width - why.offsetWidth - 8));
  why.style.left = left + "px";
  why.style.top = (r.bottom - story.top + 8) + "px";
}

function hideWhy() {
  $("why").hidden = true;
  if (selected) selected.classList.remove("sel");
  selected = null;
}

function params() {
  const tp = Number($("top_p").value);
  return {
    prompt: $("prompt").value,
    temperature: Number($("temperature").value),
    top_k: Number($("top_k").value),
    top_p: tp >= 1 ? 1 : tp,
    max_new_tokens: Number($("max_new_tokens").value),
    stream: true,
    top_alternatives: 5,
    ...request(),
  };
}

// The words and features asked for in the "Ask for a story" box (nothing when the model takes no requests).
function request() {
  if ($("request").hidden) return {};
  const words = ["word1", "word2", "word3"].map((id) => $(id).value.trim()).filter((w) => w);
  const features = [...document.querySelectorAll("#features input:checked")].map((c) => c.value);
  return { words, features };
}

// Parse a server-sent-event stream from a fetch body; calls onEvent(name, data) per event.
async function readSSE(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

async function generate() {
  if (controller) return;
  hideWhy();
  const body = params();
  const out = $("output");
  out.replaceChildren();
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt";
  promptSpan.textContent = body.prompt;
  out.append(promptSpan);
  out.classList.add("streaming");
  $("stat-tokens").textContent = "0";
  $("stat-speed").textContent = "–";
  $("stat-ttft").textContent = "–";
  $("stat-finish").textContent = "";
  $("stat-finish").className = "finish";
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("writing…", "busy");
  controller = new AbortController();
  const t0 = performance.now();
  let first = null, n = 0;
  // the response starts when the request gets a decoding slot: until then, say whether it waits in the queue
  let waiting = setInterval(async () => {
    try {
      const h = await (await fetch("/health")).json();
      if (waiting && h.queued > 0) setStatus("waiting for a free slot (" + h.queued + " in the queue)…", "busy");
    } catch (e) { /* the status stays as it is */ }
  }, 700);
  const stopWaiting = () => { clearInterval(waiting); waiting = null; };
  try {
    const r = await api("/v1/generate", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    stopWaiting();
    setStatus("writing…", "busy");
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      let msg = err.detail || r.statusText;
      if (Array.isArray(msg)) msg = msg.map((d) => d.msg).join("; ");
      if (r.status === 429) msg = "busy, try again in " + (r.headers.get("Retry-After") || "1") + " s";
      throw new Error(msg);
    }
    await readSSE(r.body, (name, ev) => {
      if (name === "start" && ev.prompt != null) promptSpan.textContent = ev.prompt; // with the request's lines
      if (name === "token") {
        if (first === null) { first = performance.now(); $("stat-ttft").textContent = ((first - t0) / 1000).toFixed(2) + " s"; }
        n += ev.id === null ? 0 : 1;
        if (ev.text) {
          const s = document.createElement("span");
          s.className = "tok";
          s.textContent = ev.text;
          s.dataset.id = ev.id;
          s.dataset.token = ev.token;
          if (ev.top) s.dataset.top = JSON.stringify(ev.top);
          out.append(s);
        }
        $("stat-tokens").textContent = String(n);
        const dt = (performance.now() - t0) / 1000;
        if (dt > 0.05) $("stat-speed").textContent = (n / dt).toFixed(0);
      } else if (name === "done" || name === "error") {
        $("stat-tokens").textContent = String(ev.completion_tokens);
        if (ev.timing && ev.timing.tokens_per_s) $("stat-speed").textContent = ev.timing.tokens_per_s.toFixed(0);
        const f = $("stat-finish");
        const label = { stop: "the end", length: "length limit", timeout: "time limit", cancelled: "stopped" };
        f.textContent = ev.error ? "error: " + ev.error : (label[ev.finish_reason] || ev.finish_reason);
        f.className = "finish " + ev.finish_reason;
      }
    });
    setStatus("done");
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("stopped");
      $("stat-finish").textContent = "stopped";
      $("stat-finish").className = "finish cancelled";
    } else {
      setStatus(e.message || String(e), "error");
    }
  } finally {
    stopWaiting();
    out.classList.remove("streaming");
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

function init() {
  for (const s of STARTERS) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.textContent = s.length > 34 ? s.slice(0, 32) + "…" : s;
    b.title = s;
    b.addEventListener("click", () => { $("prompt").value = s; $("prompt").focus(); });
    $("starters").append(b);
  }
  for (const [value, text] of FEATURES) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = value;
    box.id = "feature-" + value;
    label.append(box, " " + text);
    $("features").append(label);
  }
  for (const name of SLIDERS) {
    $(name).addEventListener("input", () => showSlider(name));
    showSlider(name);
  }
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });
  const out = $("output");
  out.addEventListener("click", (e) => {
    const t = e.target.closest(".tok");
    if (t && t.dataset.top) showWhy(t); else hideWhy();
  });
  out.addEventListener("mouseover", (e) => {
    const t = e.target.closest(".tok");
    if (t && t.dataset.top && window.matchMedia("(hover: hover)").matches) showWhy(t);
  });
  $("why-close").addEventListener("click", hideWhy);
  $("key-form").addEventListener("submit", keyEntered);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideWhy(); });
  loadModel();
}

init();
