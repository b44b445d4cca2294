// The playground page: plain JavaScript, no build step, nothing fetched but this server's API.
//
// Generation goes through the project's own POST /generate with "stream": true. Its {"text"}
// events fill the Output as they are decoded, and its last event, {"record"}, is the stored
// record: it carries what the badges show (cached, ttft_ms, usage.completion_tokens,
// latency_ms) and the id that feedback needs. The OpenAI routes' chunks carry none of these.
"use strict";

const KEY_STORAGE = "serve-gpt2.api-key";
const HISTORY_PAGE_SIZE = 10;
const GOOD = 5; // the API's ratings run from 1 (bad) to 5 (good)
const BAD = 1;

const $ = (id) => document.getElementById(id);

class ApiError extends Error {}

// ---- talking to the API --------------------------------------------------------------------

function requestHeaders(hasBody) {
  const headers = {};
  if (hasBody) headers["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: the status line says what there is to say
  }
  if (response.status === 401) showKeyForm();
  return new ApiError(message);
}

/** fetch() that answers only a 2xx response and throws the API's error message otherwise. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: requestHeaders(options.body !== undefined),
    });
  } catch (err) {
    throw new ApiError(`Could not reach the server (${err.message}).`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

/** The JSON events of a server-sent event stream, up to `[DONE]`. */
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer
          .slice(0, end)
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        buffer = buffer.slice(end + 2);
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
  throw new ApiError("The stream ended before the generation was complete.");
}

// ---- messages ------------------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  box.textContent = err instanceof Error ? err.message : String(err);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

/** An event handler whose failures show in the page (never an unhandled rejection). */
const guarded = (handler) => (event) => {
  Promise.resolve()
    .then(() => handler(event))
    .catch(showError);
};

// ---- API key -------------------------------------------------------------------------------
// The field appears when the server answers 401 (keys are configured) or a key is already
// kept for this tab; a server without keys never shows it.

function showKeyForm() {
  $("key-form").hidden = false;
}

async function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  clearError();
  await loadModels();
  await loadHistory();
}

// ---- models --------------------------------------------------------------------------------

function option(value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

async function loadModels() {
  const body = await (await api("/v1/models")).json();
  const ids = body.data.map((card) => card.id);
  const picker = $("model");
  const chosen = picker.value;
  picker.replaceChildren(...ids.map((id) => option(id, id)));
  if (ids.includes(chosen)) picker.value = chosen;
  const filter = $("history-model");
  const filtered = filter.value;
  filter.replaceChildren(option("", "All models"), ...ids.map((id) => option(id, id)));
  if (ids.includes(filtered)) filter.value = filtered;
}

// ---- generating ----------------------------------------------------------------------------

function numberField(id, body, name) {
  const raw = $(id).value.trim();
  if (raw !== "") body[name] = Number(raw);
}

function requestBody() {
  const body = { prompts: [$("prompt").value], stream: true };
  if ($("model").value) body.model = $("model").value;
  numberField("max-tokens", body, "max_new_tokens");
  numberField("temperature", body, "temperature");
  numberField("top-p", body, "top_p");
  numberField("seed", body, "seed");
  return body;
}

function setStats(cache, ttft, rate, hit = false) {
  $("stat-cache").textContent = cache;
  $("stat-cache").classList.toggle("hit", hit);
  $("stat-ttft").textContent = ttft;
  $("stat-rate").textContent = rate;
}

function showStats(record) {
  const ttft = record.ttft_ms == null ? "—" : `${record.ttft_ms.toFixed(0)} ms`;
  const seconds = record.latency_ms / 1000;
  const tokens = record.usage.completion_tokens;
  // Completion tokens over the request's whole time at the server (first token included).
  const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : "—";
  setStats(record.cached ? "cache hit" : "cache miss", `TTFT ${ttft}`, `${rate} tokens/s`,
    record.cached);
}

async function generate(event) {
  event.preventDefault();
  clearError();
  const button = $("generate");
  const output = $("output");
  const body = requestBody();
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = body.prompts[0];
  const completion = document.createTextNode("");
  output.replaceChildren(prompt, completion);
  setStats("cache …", "TTFT …", "tokens/s …");
  button.disabled = true;
  output.setAttribute("aria-busy", "true");
  try {
    const response = await api("/generate", { method: "POST", body: JSON.stringify(body) });
    for await (const item of sseEvents(response)) {
      if (item.error) throw new ApiError(item.error.message);
      if (item.text) completion.appendData(item.text);
      if (item.record) showStats(item.record);
    }
    await loadHistory();
  } catch (err) {
    setStats("cache —", "TTFT —", "tokens/s —");
    throw err;
  } finally {
    button.disabled = false;
    output.setAttribute("aria-busy", "false");
  }
}

// ---- history and feedback ------------------------------------------------------------------

const historyState = { cursor: null, ticket: 0 };

function feedbackButton(label, rating, record, status) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.dataset.rating = String(rating);
  button.setAttribute("aria-pressed", String(record.feedback?.rating === rating));
  button.addEventListener(
    "click",
    guarded(async () => {
      const path = `/generations/${encodeURIComponent(record.id)}/feedback`;
      const response = await api(path, { method: "POST", body: JSON.stringify({ rating }) });
      const stored = await response.json();
      for (const b of button.parentElement.querySelectorAll("button")) {
        b.setAttribute("aria-pressed", String(Number(b.dataset.rating) === stored.feedback.rating));
      }
      status.textContent = "Saved";
    }),
  );
  return button;
}

function historyItem(record) {
  const item = document.createElement("li");
  item.dataset.id = record.id;

  const meta = document.createElement("p");
  meta.className = "meta";
  const when = document.createElement("time");
  when.dateTime = record.created_at;
  when.textContent = new Date(record.created_at).toLocaleString();
  const tokens = record.usage.completion_tokens;
  const details = [record.model_name, `${tokens} token${tokens === 1 ? "" : "s"}`];
  if (record.cached) details.push("cached");
  if (record.finish_reason === "cancelled") details.push("cancelled");
  meta.append(when, ` · ${details.join(" · ")}`);

  const text = document.createElement("p");
  text.className = "text";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = record.prompt;
  text.append(prompt, record.completion);

  const feedback = document.createElement("div");
  feedback.className = "feedback";
  feedback.setAttribute("role", "group");
  feedback.setAttribute("aria-label", "Feedback");
  const status = document.createElement("span");
  status.className = "note";
  status.setAttribute("aria-live", "polite");
  feedback.append(
    feedbackButton("Good", GOOD, record, status),
    feedbackButton("Bad", BAD, record, status),
    status,
  );

  item.append(meta, text, feedback);
  return item;
}

async function loadHistory(more = false) {
  const ticket = ++historyState.ticket; // a newer load (another filter) wins
  const params = new URLSearchParams({ limit: String(HISTORY_PAGE_SIZE) });
  if ($("history-model").value) params.set("model", $("history-model").value);
  if (more && historyState.cursor) params.set("cursor", historyState.cursor);
  const page = await (await api(`/history?${params}`)).json();
  if (ticket !== historyState.ticket) return;
  const list = $("history");
  const items = page.items.map(historyItem);
  if (more) list.append(...items);
  else list.replaceChildren(...items);
  historyState.cursor = page.next_cursor;
  $("history-more").hidden = !page.next_cursor;
  $("history-empty").hidden = list.children.length > 0;
}

// ---- start ---------------------------------------------------------------------------------

async function start() {
  $("generate-form").addEventListener("submit", guarded(generate));
  $("key-form").addEventListener("submit", guarded(useKey));
  $("history-model").addEventListener("change", guarded(() => loadHistory()));
  $("history-more").addEventListener("click", guarded(() => loadHistory(true)));
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) {
    $("api-key").value = key;
    showKeyForm();
  }
  await loadModels();
  await loadHistory();
}

window.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  showError(event.reason);
});
document.addEventListener("DOMContentLoaded", guarded(start));
