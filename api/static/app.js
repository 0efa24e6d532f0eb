// The search page: plain JavaScript over the REST API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { current: null, objectUrls: [] };

function apiKey() { return sessionStorage.getItem("f2b-api-key") || ""; }

function headers(extra = {}) {
  const h = { ...extra };
  if (apiKey()) h["X-API-Key"] = apiKey();
  return h;
}

// Fetch JSON; a problem object (RFC 9457) becomes an Error whose message is its detail.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) throw await problem(response);
  return response.status === 204 ? null : response.json();
}

async function problem(response) {
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.detail) detail = body.detail;
  } catch (_) { /* not JSON */ }
  if (response.status === 401 || response.status === 403) {
    document.querySelector(".more").open = true;
    detail += " (enter the API key below)";
  }
  const error = new Error(detail);
  error.status = response.status;
  return error;
}

function say(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function basename(path) { return String(path).split(/[\\/]/).pop(); }

// Thumbnails load as plain <img src> unless a key is set (then fetched with the key header).
function setImage(img, url) {
  if (!apiKey()) { img.src = url; return; }
  fetch(url, { headers: headers() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
    .then((blob) => { const u = URL.createObjectURL(blob); state.objectUrls.push(u); img.src = u; })
    .catch(() => { img.alt += " (thumbnail unavailable)"; });
}

// What the page calls a match. Text searches are verified by default: the server asks the model whether
// each of the top hits shows the query, from its stored tokens, and a hit counts when that probability
// ("relevance") reaches DEFAULT_MIN_RELEVANCE (0.5: the model says yes more than no); `?min_relevance=0.7`
// sets another cutoff, `?verify=0` turns verification off. Without relevance (example-image searches, a
// collection that cannot answer, or `?floor=0.3` given) the cosine score is judged against a floor: a rough
// default for the shipped models.
const DEFAULT_FLOOR = 0.2;
const DEFAULT_MIN_RELEVANCE = 0.5;
const MAX_VERIFY = 100;

function pageNumber(name, fallback) {
  const given = new URLSearchParams(location.search).get(name);
  const value = given === null || given.trim() === "" ? NaN : Number(given);
  return Number.isFinite(value) ? value : fallback;
}

function scoreFloor() { return pageNumber("floor", DEFAULT_FLOOR); }

// Whether text searches verify when the address does not say (?verify=N): a model declares whether re-ranking
// by its relevance was measured to help its search (`relevance_ranks_well`; the demo model: not yet). Known
// once the model has loaded (`verify_by_default` of /v1/collection; true for a model that declares nothing);
// searches wait for that. Until the server has said it, searches rank by the embedding alone.
let verifyByDefault = false;
let modelSettled = false;

// How many hits a text search verifies: the page's k (at most MAX_VERIFY), none with ?verify=0 or ?floor=, none
// by default where the model says its relevance does not help.
function verifyCount(k) {
  const params = new URLSearchParams(location.search);
  if (params.has("floor")) return 0;
  if (!params.has("verify") && !verifyByDefault) return 0;
  return Math.max(0, Math.min(MAX_VERIFY, Math.round(pageNumber("verify", k))));
}

// The rule results are judged by: relevance when the server verified them, else the cosine floor.
function matchRule(results) {
  if (results.length && results[0].relevance !== undefined) {
    const cut = pageNumber("min_relevance", DEFAULT_MIN_RELEVANCE);
    return { what: "relevance", cut, value: (h) => h.relevance, weak: (h) => h.relevance === null || h.relevance < cut };
  }
  const cut = scoreFloor();
  return { what: "score", cut, value: (h) => h.score, weak: (h) => h.score < cut };
}

function summary(results, label, rule) {
  const n = results.length;
  if (!n) return `No results ${label}.`;
  const plural = `${n} result${n === 1 ? "" : "s"} ${label}`;
  const good = results.filter((h) => !rule.weak(h)).length;
  if (!good) {
    const best = Math.max(...results.map((h) => rule.value(h) ?? 0));
    const why = rule.what === "relevance" ? "the model says none of them shows it (best relevance" : "the best score";
    return `${plural}, but no good match: ${why}, ${best.toFixed(3)}, is below ` +
      `${rule.cut.toFixed(2)}${rule.what === "relevance" ? ")" : ""}. The nearest images are shown dimmed.`;
  }
  return good === n ? `${plural}.` : `${plural}: ${good} above ${rule.what} ${rule.cut.toFixed(2)}, the rest dimmed.`;
}

function render(results, label) {
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
  const list = $("results");
  list.replaceChildren();
  const rule = matchRule(results);
  let dividerShown = false;
  for (const hit of results) {
    const weak = rule.weak(hit);
    if (weak && !dividerShown && hit !== results[0]) {
      const divider = document.createElement("li");
      divider.className = "divider";
      divider.textContent = `Weaker matches (${rule.what} below ${rule.cut.toFixed(2)})`;
      list.append(divider);
    }
    dividerShown = dividerShown || weak;
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = weak ? "hit weak" : "hit";
    button.dataset.id = hit.id;
    const name = basename(hit.path);
    const score = hit.score.toFixed(3);
    const checked = typeof hit.relevance === "number" ? ` · p ${hit.relevance.toFixed(2)}` : "";
    const note = weak ? ", below the match floor" : "";
    const said = checked ? `, relevance ${hit.relevance.toFixed(2)}` : "";
    button.setAttribute("aria-label", `${name}, score ${score}${said}${note}. Open to ask a question`);
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = name;
    img.width = 160;
    img.height = 160;
    setImage(img, hit.thumbnail_url);
    const caption = document.createElement("span");
    caption.className = "caption";
    const nameEl = document.createElement("span");
    nameEl.className = "name";
    nameEl.textContent = name;
    const scoreEl = document.createElement("span");
    scoreEl.className = "score";
    scoreEl.textContent = score;
    caption.append(nameEl, scoreEl);
    if (checked) {
      const relevanceEl = document.createElement("span");
      relevanceEl.className = "relevance";
      relevanceEl.title = "the model's probability that this image shows the query";
      relevanceEl.textContent = checked;
      caption.append(relevanceEl);
    }
    button.append(img, caption);
    button.addEventListener("click", () => openDetail(hit));
    li.append(button);
    list.append(li);
  }
  say(summary(results, label, rule));
}

async function runSearch(body, label) {
  const button = $("search-button");
  button.disabled = true;
  say("Searching…");
  try {
    const post = (b) => api("/v1/search", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(b),
    });
    let data;
    try {
      data = await post(body);
    } catch (error) {  // a collection that cannot answer refuses verification: search without it
      if (!body.verify || error.status !== 400) throw error;
      const { verify, ...plain } = body;
      data = await post(plain);
    }
    render(data.results, label);
    showWarning(data.warning);
  } catch (error) {
    say(error.message, true);
  } finally {
    button.disabled = false;
  }
}

// The server's warning that the results cannot be trusted (the demo model on images outside its world).
function showWarning(text) {
  const banner = $("demo-warning");
  banner.textContent = text ? `Warning: ${text}` : "";
  banner.hidden = !text;
}

function k() { return Number($("k").value) || 24; }

async function textSearch(query) {
  if (!modelSettled) say("Waiting for the model to load…");
  await modelKnown;
  const verify = verifyCount(k());
  runSearch(verify ? { query, k: k(), verify } : { query, k: k() }, `for “${query}”`);
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  const url = new URL(location.href);
  url.searchParams.set("q", query);
  history.replaceState(null, "", url);
  textSearch(query);
});

$("example-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  form.append("k", String(k()));
  say(`Searching by example ${file.name}…`);
  try {
    const data = await api("/v1/search/image", { method: "POST", body: form });
    render(data.results, `like ${file.name}`);
    showWarning(data.warning);
  } catch (error) {
    say(error.message, true);
  }
});

$("add-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  say(`Adding ${file.name}…`);
  try {
    const data = await api("/v1/images", { method: "POST", body: form });
    say(`Added ${file.name} as image ${data.image.id}.`);
    loadInfo();
  } catch (error) {
    say(error.message, true);
  }
  event.target.value = "";
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("f2b-api-key", $("api-key").value);
  say("API key saved for this tab.");
  loadInfo();
});

function openDetail(hit) {
  state.current = hit;
  $("detail-title").textContent = `Image ${hit.id} · score ${hit.score.toFixed(3)}`;
  const img = $("detail-image");
  img.alt = basename(hit.path);
  setImage(img, `${hit.thumbnail_url}?size=512`);
  $("detail-path").textContent = hit.path;
  const meta = $("detail-meta");
  meta.replaceChildren();
  for (const [key, value] of Object.entries(hit.metadata || {})) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    meta.append(dt, dd);
  }
  $("answer").textContent = "";
  $("detail").showModal();
  $("question").focus();
}

$("more-like").addEventListener("click", () => {
  const hit = state.current;
  if (!hit) return;
  $("detail").close();
  runSearch({ like: hit.id, k: k() }, `like image ${hit.id}`);
});

// Read server-sent events from a fetch body (EventSource cannot POST or send the key header).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const hit = state.current;
  const question = $("question").value.trim();
  if (!hit || !question) return;
  const out = $("answer");
  const button = $("ask-button");
  out.textContent = "";
  out.classList.add("streaming");
  button.disabled = true;
  try {
    const response = await fetch(`/v1/images/${hit.id}/ask`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ question, max_new_tokens: 48, stream: true }),
    });
    if (!response.ok) throw await problem(response);
    for await (const { event: kind, data } of sseEvents(response)) {
      if (kind === "token") out.textContent += data.text;
      else if (kind === "done") out.textContent = data.answer || "(no answer)";
      else if (kind === "error") throw new Error(data.detail);
    }
  } catch (error) {
    out.textContent = `Error: ${error.message}`;
  } finally {
    out.classList.remove("streaming");
    button.disabled = false;
  }
});

async function loadInfo() {
  try {
    const info = await api("/v1/collection");
    const perImage = info.bytes_per_image ? ` · ${Math.round(info.bytes_per_image).toLocaleString()} B/image` : "";
    const el = $("collection-info");
    el.textContent =
      `${Number(info.indexed).toLocaleString()} images · model ${basename(info.model)} · ${info.strategy}${perImage}`;
    el.title = `collection ${info.collection || info.path} · model ${info.model}`;
    showWarning(info.warning);
    if (info.verify_by_default !== undefined) verifyByDefault = info.verify_by_default === true;
  } catch (error) {
    $("collection-info").textContent = `Collection: ${error.message}`;
  }
}

async function watchModel() {
  const badge = $("model-status");
  for (;;) {
    let status = "unreachable";
    try {
      const response = await fetch("/readyz");
      status = (await response.json()).status;
    } catch (_) { /* server restarting */ }
    badge.textContent = status === "ready" ? "model ready" : `model ${status}…`;
    badge.className = `badge ${status}`;
    if (status === "ready" || status === "failed") return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

loadInfo();
const modelKnown = watchModel().then(loadInfo).then(() => { modelSettled = true; });  // its settings come with it
const initial = new URLSearchParams(location.search).get("q");
if (initial) {
  $("query").value = initial;
  textSearch(initial);
}
