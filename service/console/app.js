// The semsearch search console. Plain JS, no dependencies. It calls the gateway's JSON routes with
// the key typed into the page (held in that field only). Everything that comes from the service or
// a document is written with textContent: nothing is ever parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { highlightSupported: false, metadataFields: new Set(), servingSchema: null };

class ConsoleError extends Error {
  constructor(title, message) {
    super(message);
    this.title = title;
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// ---- calling the service -------------------------------------------------------------------

async function callApi(method, path, body) {
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers.authorization = "Bearer " + key;
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit",
    });
  } catch (err) {
    throw new ConsoleError("service unreachable",
      `The service at ${location.origin} is unreachable (${err.message}). Is it running?`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const error = data && data.error;
    if (error && error.message !== undefined) {
      throw new ConsoleError(`${error.code || response.status} ${error.status || ""}`.trim(), error.message);
    }
    throw new ConsoleError(`HTTP ${response.status}`, text.slice(0, 500) || response.statusText);
  }
  if (data === null) throw new ConsoleError(`HTTP ${response.status}`, "the answer is not JSON");
  return data;
}

function showMessage(error) {
  const box = $("message");
  box.replaceChildren();
  if (!error) { box.hidden = true; return; }
  box.hidden = false;
  box.append(el("strong", "", error.title || "error"), document.createTextNode(": " + error.message));
}

// ---- building the request ------------------------------------------------------------------

function numberOrNull(input, label) {
  const raw = input.value.trim();
  if (raw === "") return null;
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new ConsoleError("bad input", `${label}: "${raw}" is not a number`);
  return value;
}

function typedValue(raw, type, where) {
  const text = raw.trim();
  if (type === "string" || (type === "auto" && text === "")) return { stringValue: text };
  if (type === "bool" || (type === "auto" && (text === "true" || text === "false"))) {
    if (text !== "true" && text !== "false") throw new ConsoleError("bad input", `${where}: "${text}" is not true or false`);
    return { boolValue: text === "true" };
  }
  if (type === "int" || (type === "auto" && /^-?\d+$/.test(text))) {
    if (!/^-?\d+$/.test(text)) throw new ConsoleError("bad input", `${where}: "${text}" is not an integer`);
    return { intValue: text };  // int64 is a string in proto3 JSON
  }
  if (type === "double" || (type === "auto" && text !== "" && Number.isFinite(Number(text)))) {
    if (!Number.isFinite(Number(text))) throw new ConsoleError("bad input", `${where}: "${text}" is not a number`);
    return { doubleValue: Number(text) };
  }
  return { stringValue: text };
}

const LIST_OPERATORS = new Set(["FILTER_OPERATOR_IN", "FILTER_OPERATOR_NOT_IN",
  "FILTER_OPERATOR_CONTAINS_ANY", "FILTER_OPERATOR_CONTAINS_ALL"]);

function readFilters() {
  return Array.from(document.querySelectorAll("#filters .filter")).map((row, index) => {
    const where = `filter ${index + 1}`;
    const field = row.querySelector(".field").value.trim();
    if (!field) throw new ConsoleError("bad input", `${where}: the field is empty`);
    const operator = row.querySelector(".operator").value;
    const type = row.querySelector(".type").value;
    const raw = row.querySelector(".value").value;
    const filter = { field, operator };
    if (operator === "FILTER_OPERATOR_EXISTS") return filter;
    if (LIST_OPERATORS.has(operator)) {
      filter.values = raw.split(",").map((part) => typedValue(part, type, where));
    } else {
      filter.value = typedValue(raw, type, where);
    }
    return filter;
  });
}

function settingsValue(fieldset, name) {
  return fieldset.querySelector(`[name="${name}"]`);
}

function buildRequest(fieldset) {
  const query = $("query").value.trim();
  if (!query) throw new ConsoleError("bad input", "query: type something to search for");
  const request = { query };
  const topK = numberOrNull($("top-k"), "top_k");
  if (topK !== null) request.topK = topK;
  const tenant = $("tenant").value.trim();
  if (tenant) request.tenant = tenant;
  const filters = readFilters();
  if (filters.length) request.filters = filters;
  const mode = settingsValue(fieldset, "mode").value;
  if (mode) request.mode = mode;
  const fusion = {};
  const method = settingsValue(fieldset, "fusion").value;
  if (method) fusion.method = method;
  const rrfK = numberOrNull(settingsValue(fieldset, "rrf-k"), "rrf_k");
  if (rrfK !== null) fusion.rrfK = rrfK;
  const dense = numberOrNull(settingsValue(fieldset, "dense-weight"), "dense weight");
  if (dense !== null) fusion.denseWeight = dense;
  const lexical = numberOrNull(settingsValue(fieldset, "lexical-weight"), "lexical weight");
  if (lexical !== null) fusion.lexicalWeight = lexical;
  if (Object.keys(fusion).length) request.fusion = fusion;
  const minScore = numberOrNull(settingsValue(fieldset, "min-score"), "min_score");
  if (minScore !== null) request.minScore = minScore;
  if (settingsValue(fieldset, "rerank").checked) {
    request.rerank = true;
    const candidates = numberOrNull(settingsValue(fieldset, "rerank-candidates"), "rerank candidates");
    if (candidates !== null) request.rerankCandidates = candidates;
  }
  if (state.highlightSupported) request.highlight = true;
  return request;
}

function describeSettings(fieldset) {
  const parts = [settingsValue(fieldset, "mode").selectedOptions[0].textContent];
  const fusion = settingsValue(fieldset, "fusion");
  if (fusion.value) parts.push(fusion.selectedOptions[0].textContent);
  if (settingsValue(fieldset, "min-score").value.trim()) parts.push("min " + settingsValue(fieldset, "min-score").value.trim());
  if (settingsValue(fieldset, "rerank").checked) parts.push("rerank");
  return parts.join(" · ");
}

// ---- highlighting --------------------------------------------------------------------------

// Spans [start, end) in code points (characters) from the service's highlight field (`highlight: true`),
// when it sends any.
function serverSpans(hit, chars) {
  const key = Object.keys(hit).find((name) => name.toLowerCase().startsWith("highlight"));
  if (!key) return null;
  let value = hit[key];
  if (value && !Array.isArray(value) && typeof value === "object") {
    value = Object.values(value).find(Array.isArray) || [];
  }
  if (!Array.isArray(value)) return null;
  const spans = [];
  for (const item of value) {
    if (Array.isArray(item) && item.length >= 2) spans.push([Number(item[0]), Number(item[1])]);
    else if (item && typeof item === "object") {
      const start = Number(item.start ?? item.begin ?? item.offset ?? 0);
      const end = item.end !== undefined ? Number(item.end) : start + Number(item.length ?? 0);
      spans.push([start, end]);
    } else if (typeof item === "string" && item) {
      spans.push(...termSpans(chars, Array.from(item.toLowerCase())));
    }
  }
  const valid = spans.filter(([s, e]) => Number.isFinite(s) && Number.isFinite(e) && e > s && s >= 0);
  return valid.length ? valid : null;  // none (a dense hit, say): the page marks shared characters instead
}

function termSpans(chars, needle) {
  const spans = [];
  const lower = chars.map((c) => c.toLowerCase());
  for (let i = 0; i + needle.length <= lower.length; i++) {
    if (needle.every((c, j) => lower[i + j] === c)) spans.push([i, i + needle.length]);
  }
  return spans;
}

const WORD_CHAR = /[\p{L}\p{N}]/u;

// Client-side: the longest runs of the text that also occur in the query (two characters or more,
// or one when the query is a single character).
function querySpans(chars, query) {
  const needle = query.toLowerCase();
  const minimum = Array.from(needle).filter((c) => WORD_CHAR.test(c)).length <= 1 ? 1 : 2;
  const lower = chars.map((c) => c.toLowerCase());
  const spans = [];
  let i = 0;
  while (i < lower.length) {
    if (!WORD_CHAR.test(lower[i]) || !needle.includes(lower[i])) { i++; continue; }
    let j = i + 1;
    while (j < lower.length && needle.includes(lower.slice(i, j + 1).join(""))) j++;
    if (j - i >= minimum) { spans.push([i, j]); i = j; } else { i++; }
  }
  return spans;
}

function highlightedText(text, spans, source) {
  const chars = Array.from(text);
  const marked = new Array(chars.length).fill(false);
  for (const [start, end] of spans) for (let i = start; i < Math.min(end, chars.length); i++) marked[i] = true;
  const container = el("p", "text");
  let i = 0;
  while (i < chars.length) {
    let j = i;
    while (j < chars.length && marked[j] === marked[i]) j++;
    const piece = chars.slice(i, j).join("");
    if (marked[i]) {
      const mark = el("mark", source, piece);
      mark.title = source === "server" ? "matched by the service" : "shared with the query (marked by the page)";
      container.append(mark);
    } else {
      container.append(document.createTextNode(piece));
    }
    i = j;
  }
  return container;
}

// ---- rendering results ---------------------------------------------------------------------

const RETRIEVER_NAMES = { RETRIEVAL_MODE_DENSE: "dense", RETRIEVAL_MODE_LEXICAL: "lexical", RETRIEVAL_MODE_HYBRID: "hybrid" };

function fmt(value, digits = 4) {
  return Number(value).toFixed(digits);
}

function hitKey(hit) {
  return `${hit.id}#${hit.chunkIndex || 0}`;
}

function compareBadge(hit, position, otherPositions, otherLabel) {
  if (!otherPositions) return null;
  const before = otherPositions.get(hitKey(hit));
  if (before === undefined) return el("span", "moved new", `not in ${otherLabel}`);
  if (before === position) return el("span", "moved same", `same as ${otherLabel}`);
  const delta = before - position;
  return el("span", delta > 0 ? "moved up" : "moved down",
    `${delta > 0 ? "↑" : "↓"}${Math.abs(delta)} vs ${otherLabel} (#${before})`);
}

function renderHit(hit, position, query, otherPositions, otherLabel) {
  const item = el("li", "hit");
  item.dataset.id = hit.id;
  const head = el("div", "hit-head");
  head.append(el("span", "rank", `#${position}`), el("span", "id", hit.id));
  if (hit.chunkIndex) head.append(el("span", "chunk", `chunk ${hit.chunkIndex}`));
  head.append(el("span", "score", `score ${fmt(hit.score)}`));
  const badge = compareBadge(hit, position, otherPositions, otherLabel);
  if (badge) head.append(badge);
  item.append(head);

  const scores = el("div", "scores");
  for (const retriever of hit.retrievers || []) {
    const name = RETRIEVER_NAMES[retriever.retriever] || retriever.retriever;
    scores.append(el("span", "retriever", `${name} ${fmt(retriever.score)} (#${retriever.rank})`));
  }
  if (hit.rerankScore !== undefined) {
    const was = hit.retrievalRank;
    const delta = was - position;
    const move = delta === 0 ? "=" : (delta > 0 ? `↑${delta}` : `↓${-delta}`);
    scores.append(el("span", "rerank", `rerank ${fmt(hit.rerankScore)} · retrieval ${fmt(hit.retrievalScore)} ` +
      `#${was} → #${position} (${move})`));
  }
  item.append(scores);

  const text = hit.text || "";
  const chars = Array.from(text);
  const fromServer = serverSpans(hit, chars);
  item.append(fromServer ? highlightedText(text, fromServer, "server")
    : highlightedText(text, querySpans(chars, query), "client"));

  const metadata = hit.metadata || {};
  if (Object.keys(metadata).length) {
    const list = el("div", "metadata");
    for (const [key, value] of Object.entries(metadata)) {
      state.metadataFields.add(key);
      list.append(el("span", "meta", `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`));
    }
    item.append(list);
  }
  return item;
}

function renderTiming(timing) {
  const box = el("div", "timing");
  if (!timing) return box;
  const total = Number(timing.totalMs || 0);
  const parts = [["encode", timing.encodeMs], ["store", timing.storeMs], ["rerank", timing.rerankMs]]
    .map(([name, ms]) => [name, Number(ms || 0)]);
  const other = Math.max(0, total - parts.reduce((sum, [, ms]) => sum + ms, 0));
  box.append(el("span", "timing-total", `${fmt(total, 1)} ms`));
  const bar = el("div", "timing-bar");
  for (const [name, ms] of [...parts, ["other", other]]) {
    if (ms <= 0) continue;
    const piece = el("span", `timing-${name}`, "");
    piece.title = `${name} ${fmt(ms, 1)} ms`;
    piece.style.width = `${total > 0 ? (100 * ms) / total : 0}%`;  // CSSOM, allowed by the CSP
    bar.append(piece);
  }
  box.append(bar);
  box.append(el("span", "timing-legend",
    parts.map(([name, ms]) => `${name} ${fmt(ms, 1)}`).concat(`other ${fmt(other, 1)}`).join(" · ")));
  return box;
}

function renderColumn(label, description, response, query, otherPositions, otherLabel) {
  const column = el("section", "column");
  column.dataset.label = label;
  const head = el("h3", "", `${label}: ${description}`);
  column.append(head);
  const facts = el("p", "facts", `${RETRIEVER_NAMES[response.mode] || response.mode} · ${response.hits.length} hits · ` +
    `model ${response.modelVersion} · ${response.collection}` +
    (response.rerankerVersion ? ` · reranker ${response.rerankerVersion}` : ""));
  column.append(facts, renderTiming(response.timing));
  if (!response.hits.length) column.append(el("p", "empty", "no hits"));
  const list = el("ol", "hits");
  response.hits.forEach((hit, index) => list.append(renderHit(hit, index + 1, query, otherPositions, otherLabel)));
  column.append(list);
  return column;
}

function positions(response) {
  return new Map(response.hits.map((hit, index) => [hitKey(hit), index + 1]));
}

function refreshFieldSuggestions() {
  const list = $("metadata-fields");
  list.replaceChildren(...Array.from(state.metadataFields).sort().map((name) => {
    const option = document.createElement("option");
    option.value = name;
    return option;
  }));
}

// ---- actions -------------------------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  const button = $("search-button");
  const results = $("results");
  button.disabled = true;
  try {
    const settingsA = $("settings-a");
    const settingsB = $("compare").checked ? $("settings-b") : null;
    const requestA = buildRequest(settingsA);
    const requestB = settingsB ? buildRequest(settingsB) : null;
    showMessage(null);
    const [answerA, answerB] = await Promise.all([
      callApi("POST", "v1/search", requestA),
      requestB ? callApi("POST", "v1/search", requestB) : Promise.resolve(null),
    ]);
    const query = requestA.query;
    results.replaceChildren(renderColumn("A", describeSettings(settingsA), answerA, query,
      answerB ? positions(answerB) : null, "B"));
    if (answerB) {
      results.append(renderColumn("B", describeSettings(settingsB), answerB, query, positions(answerA), "A"));
    }
    results.classList.toggle("compare", Boolean(answerB));
    rememberServing(answerA);
    refreshFieldSuggestions();
  } catch (error) {
    results.replaceChildren();
    showMessage(error);
  } finally {
    button.disabled = false;
  }
}

function addFilter() {
  const row = $("filter-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".remove").addEventListener("click", () => row.remove());
  $("filters").append(row);
}

function setupSettingsB() {
  const copy = $("settings-a").cloneNode(true);
  copy.id = "settings-b";
  copy.querySelector("legend").textContent = "Settings B";
  settingsValue(copy, "mode").value = "RETRIEVAL_MODE_HYBRID";
  copy.hidden = true;
  $("settings-b-slot").append(copy);
  $("compare").addEventListener("change", () => { copy.hidden = !$("compare").checked; });
}

// ---- the collection panel ------------------------------------------------------------------

function fact(name, value) {
  const facts = $("collection-facts");
  let dt = Array.from(facts.querySelectorAll("dt")).find((node) => node.textContent === name);
  if (!dt) {
    dt = el("dt", "", name);
    facts.append(dt, el("dd", "", ""));
  }
  dt.nextElementSibling.textContent = value === "" || value === undefined || value === null ? "—" : String(value);
}

function flatten(prefix, value, out) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(prefix ? `${prefix}.${key}` : key, inner, out);
  } else {
    out.push([prefix, Array.isArray(value) ? JSON.stringify(value) : value]);
  }
}

function rememberServing(answer) {
  fact("last search: model", answer.modelVersion);
  fact("last search: collection", answer.collection);
  if (answer.rerankerVersion) fact("last search: reranker", answer.rerankerVersion);
}

async function refreshCollection() {
  const note = $("collection-note");
  try {
    const servingState = await callApi("GET", "v1/admin/serving-state");
    const rows = [];
    flatten("", servingState, rows);
    for (const [name, value] of rows) fact(name, value);
    note.textContent = "";
    showCollection(await callApi("GET", "v1/admin/collection"));
  } catch (error) {
    note.textContent = `${error.title}: ${error.message}`;
  }
}

// DescribeCollection: counts, set-up and the registry's history (services without it: the note says so).
function showCollection(described) {
  fact("documents", described.documents);
  fact("chunks", described.chunks);
  fact("lexical (BM25)", described.lexical ? "yes" : "no");
  fact("tenants", described.tenants ? "yes" : "no");
  fact("tuned retrieval", described.tunedRetrieval || "not tuned");
  fact("metadata fields", (described.metadataFields || []).join(", "));
  for (const name of described.metadataFields || []) state.metadataFields.add(name);
  refreshFieldSuggestions();
  const history = $("collection-history");
  history.replaceChildren(...(described.history || []).slice().reverse().map((event) => {
    const details = Object.entries(event.details || {}).filter(([, value]) => value !== null)
      .map(([key, value]) => `${key}=${typeof value === "object" ? JSON.stringify(value) : value}`).join(" ");
    return el("li", "", `${event.at} ${event.event} ${details}`);
  }));
}

async function checkHealth() {
  const badge = $("health");
  try {
    const answer = await callApi("GET", "healthz");
    badge.textContent = answer.status;
    badge.className = "badge ok";
  } catch (error) {
    badge.textContent = error.title === "service unreachable" ? "unreachable" : `not serving: ${error.message}`;
    badge.className = "badge bad";
  }
  fact("serving", badge.textContent);
}

// The request field `highlight` exists only on services that have it: sending it elsewhere is a 400.
async function detectFeatures() {
  try {
    const openapi = await callApi("GET", "openapi.json");
    const schemas = (openapi.components && openapi.components.schemas) || {};
    const request = Object.entries(schemas).find(
      ([name]) => name === "SearchDocumentsRequest" || name.endsWith(".SearchDocumentsRequest"));
    state.highlightSupported = Boolean(request && request[1].properties && request[1].properties.highlight);
  } catch (_) {
    state.highlightSupported = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupSettingsB();
  $("search-form").addEventListener("submit", search);
  $("query").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("search-form").requestSubmit();
    }
  });
  $("add-filter").addEventListener("click", addFilter);
  $("refresh-collection").addEventListener("click", refreshCollection);
  checkHealth();
  detectFeatures();
});
