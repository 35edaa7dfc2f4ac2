// The labelling page's behaviour.
// Choices: model text only ever goes through textContent (never innerHTML), so whatever
// the model writes is displayed, not interpreted; the token lives in sessionStorage and
// travels in the Authorization header; one key press saves a judgment and loads the next.
"use strict";

const CRITERIA = [["accuracy", "Accuracy"], ["relevance", "Relevance"], ["coherence", "Logical coherence"]];
const KEYS = { "1": "a", a: "a", "2": "b", b: "b", "3": "tie", t: "tie", "4": "both_bad", x: "both_bad" };
const LABELS = { a: "A is better", b: "B is better", tie: "tie", both_bad: "both bad" };
const state = { token: null, pair: null, busy: false };
const $ = (id) => document.getElementById(id);

function readToken() {
  // #token=... in the URL wins (fragments are never sent to the server), then remove it
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("moeforge-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("moeforge-token");
}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + state.token, ...(options.headers || {}) };
  const res = await fetch(path, { ...options, headers });
  if (res.status === 401) {
    sessionStorage.removeItem("moeforge-token");
    showLogin("That token was not accepted.");
    throw new Error("unauthorised");
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(typeof body.detail === "string" ? body.detail : "request failed (" + res.status + ")");
  return body;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function buildRatings() {
  // radio groups: native inputs, so Tab and the arrow keys work too
  for (const fs of document.querySelectorAll("fieldset.ratings")) {
    const side = fs.dataset.side;
    for (const [key, title] of CRITERIA) {
      const row = document.createElement("div");
      row.className = "rating";
      const name = document.createElement("span");
      name.textContent = title;
      row.appendChild(name);
      for (let v = 1; v <= 5; v++) {
        const label = document.createElement("label");
        const input = document.createElement("input");
        input.type = "radio";
        input.name = side + "-" + key;
        input.value = String(v);
        label.appendChild(input);
        label.appendChild(document.createTextNode(String(v)));
        row.appendChild(label);
      }
      fs.appendChild(row);
    }
  }
}

function ratingsOf(side) {
  const out = {};
  for (const [key] of CRITERIA) {
    const checked = document.querySelector(`input[name="${side}-${key}"]:checked`);
    out[key] = checked ? Number(checked.value) : null;
  }
  return out;
}

function showPair(pair) {
  state.pair = pair;
  $("pair-id").textContent = "#" + pair.pair_id;
  $("prompt").textContent = pair.prompt;
  $("answer-a").textContent = pair.answer_a;
  $("answer-b").textContent = pair.answer_b;
  for (const input of document.querySelectorAll("fieldset.ratings input")) input.checked = false;
  $("better").value = "";
  document.body.dataset.pairId = String(pair.pair_id); // lets tests wait for the next pair
}

async function loadNext() {
  state.busy = true;
  status("Loading the next pair…");
  try {
    showPair(await api("/api/next"));
    status("");
  } catch (e) {
    if (e.message !== "unauthorised") status(e.message, true);
  } finally {
    state.busy = false;
  }
}

async function submit(choice) {
  if (state.busy || !state.pair) return;
  state.busy = true;
  const body = { pair_id: state.pair.pair_id, choice, a: ratingsOf("a"), b: ratingsOf("b"), better_answer: $("better").value };
  try {
    await api("/api/judgments", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    state.busy = false;
    await loadNext();
    status(`Saved pair #${body.pair_id}: ${LABELS[choice]}.`);
    refreshProgress();
  } catch (e) {
    state.busy = false;
    if (e.message !== "unauthorised") status(e.message, true);
  }
}

async function refreshProgress() {
  const prog = await api("/api/progress");
  const rows = $("progress-rows");
  rows.replaceChildren();
  let mine = 0;
  for (const r of prog.labellers) {
    const tr = document.createElement("tr");
    for (const v of [r.name, r.judged, r.a, r.b, r.tie, r.both_bad, r.last || "–"]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.appendChild(td);
    }
    rows.appendChild(tr);
    if (r.name === prog.you) mine = r.judged;
  }
  $("who").textContent = `${prog.you} · ${mine} judged · ${prog.pairs} pairs`;
  $("progress").hidden = false;
}

function showLogin(message) {
  $("work").hidden = true;
  $("progress").hidden = true;
  $("login").hidden = false;
  if (message) $("who").textContent = message;
}

async function start() {
  $("login").hidden = true;
  $("work").hidden = false;
  try {
    await refreshProgress();
    await loadNext();
  } catch (e) {
    if (e.message !== "unauthorised") status(e.message, true);
  }
}

document.addEventListener("keydown", (e) => {
  const t = e.target;
  if (t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "radio"))) {
    if (e.key === "Escape") t.blur(); // typing never triggers a shortcut; Esc leaves the box
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey || $("work").hidden) return;
  const choice = KEYS[e.key.toLowerCase()];
  if (choice) {
    e.preventDefault();
    submit(choice);
  }
});

document.addEventListener("DOMContentLoaded", () => {
  buildRatings();
  for (const button of document.querySelectorAll("button[data-choice]")) {
    button.addEventListener("click", () => submit(button.dataset.choice));
  }
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem("moeforge-token", state.token);
    start();
  });
  state.token = readToken();
  if (state.token) start();
  else showLogin();
});
