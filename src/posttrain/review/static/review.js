// posttrain review page: polls the run's state, shows plots, doctor events and samples, writes labels.
// Sample text is only ever written with textContent (never innerHTML): a completion is shown, not run.
"use strict";

const TOKEN = document.querySelector('meta[name="review-token"]').content;
const POLL_MS = 2000;
const $ = (sel) => document.querySelector(sel);
let current = { run: "", step: -1, samples: -1, shown: 0 };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new Error(body.error || `${url}: ${r.status}`);
  }
  return r.json();
}

function showError(e) {
  $("#shown").textContent = `(${e.message})`;
}

function fmt(v) {
  return v === null || v === undefined ? "-" : String(Number(Number(v).toPrecision(3)));
}

function query(extra) {
  const q = new URLSearchParams({ run: current.run });
  for (const input of $("#filters").querySelectorAll("input, select")) {
    if (input.value !== "") q.set(input.name, input.value);
  }
  for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
  return q.toString();
}

// -- labels ---------------------------------------------------------------------------------------

async function saveLabel(card, sample, label) {
  const note = card.querySelector(".note").value;
  const r = await fetch("/api/label", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Review-Token": TOKEN },
    body: JSON.stringify({ run: current.run, id: sample.id, label, note }),
  });
  const body = await r.json();
  if (!r.ok) {
    card.querySelector(".label-state").textContent = `not saved: ${body.error}`;
    return;
  }
  sample.label = label === "clear" ? null : label;
  for (const c of document.querySelectorAll(`.sample[data-id="${CSS.escape(sample.id)}"]`)) paintLabel(c, sample.label);
  refreshState();
}

function paintLabel(card, label) {
  card.classList.remove("good", "bad", "hacked");
  if (label) card.classList.add(label);
  card.dataset.label = label || "";
  for (const b of card.querySelectorAll(".actions button[data-label]")) b.classList.toggle("on", b.dataset.label === label);
  card.querySelector(".label-state").textContent = label ? `saved: ${label}` : "";
}

// -- samples --------------------------------------------------------------------------------------

function textBlock(sample) {
  if (!sample.conversation) return el("div", { class: "completion" }, sample.completion);
  const box = el("div", { class: "conversation" });
  for (const m of sample.conversation) {
    box.append(el("div", { class: `turn ${m.role}` }, el("span", { class: "role" }, m.role),
      el("span", { class: "content" }, m.content)));
  }
  return box;
}

function card(sample, options) {
  const c = el("div", { class: "sample", "data-id": sample.id });
  const meta = el("div", { class: "meta" },
    el("span", {}, `step ${sample.step}`), el("span", {}, `group ${sample.group} #${sample.index}`),
    el("span", { class: "reward" }, `reward ${fmt(sample.reward)}`),
    el("span", { class: "advantage" }, `advantage ${fmt(sample.advantage)}`),
    el("span", {}, `${sample.length} chars`));
  for (const [name, v] of Object.entries(sample.parts || {})) meta.append(el("span", {}, `${name} ${fmt(v)}`));
  for (const f of sample.flags) meta.append(el("span", { class: "flag" }, f));
  c.append(meta);
  if (!options || !options.noPrompt) c.append(el("div", { class: "prompt" }, sample.prompt));
  c.append(textBlock(sample));
  const actions = el("div", { class: "actions" });
  for (const label of ["good", "bad", "hacked", "clear"]) {
    const b = el("button", { type: "button", class: `label-${label}`, "data-label": label },
      label === "hacked" ? "reward-hacked" : label);
    b.addEventListener("click", () => saveLabel(c, sample, label));
    actions.append(b);
  }
  const note = el("input", { class: "note", type: "text", placeholder: "note", maxLength: 2000 });
  note.value = sample.note || "";
  actions.append(note, el("span", { class: "label-state muted" }));
  if (!options || !options.inPanel) {
    const g = el("button", { type: "button", class: "open-group" }, "group");
    g.addEventListener("click", () => openGroup(sample));
    const p = el("button", { type: "button", class: "open-prompt" }, "same prompt");
    p.addEventListener("click", () => openPrompt(sample));
    actions.append(g, p);
  }
  c.append(actions);
  paintLabel(c, sample.label);
  return c;
}

async function loadSamples(append) {
  const offset = append ? current.shown : 0;
  const data = await getJSON(`/api/samples?${query({ offset, limit: 50 })}`);
  const box = $("#samples");
  if (!append) box.replaceChildren();
  for (const s of data.samples) box.append(card(s));
  current.shown = offset + data.samples.length;
  $("#shown").textContent = `(${current.shown} of ${data.total})`;
  $("#more").hidden = current.shown >= data.total;
}

async function openPanel(title, url, noPrompt) {
  const data = await getJSON(url);
  $("#panel-title").textContent = title;
  $("#panel-prompt").textContent = data.samples.length ? data.samples[0].prompt : "";
  const body = $("#panel-body");
  body.replaceChildren();
  for (const s of data.samples) body.append(card(s, { inPanel: true, noPrompt }));
  $("#panel").hidden = false;
  $("#panel").scrollIntoView();
}

function openGroup(s) {
  openPanel(`Group: step ${s.step}, group ${s.group}: ${s.prompt.slice(0, 120)}`,
    `/api/group?run=${encodeURIComponent(current.run)}&step=${s.step}&group=${s.group}`, true);
}

function openPrompt(s) {
  openPanel(`Same prompt across steps: ${s.prompt.slice(0, 120)}`,
    `/api/prompt?run=${encodeURIComponent(current.run)}&id=${encodeURIComponent(s.id)}`, true);
}

// -- state: plots, events, counts ----------------------------------------------------------------

function fillOptions(select, values) {
  const have = new Set([...select.options].map((o) => o.value));
  for (const v of values) if (!have.has(v)) select.append(el("option", { value: v }, v));
}

function showEvents(events) {
  const body = $("#events tbody");
  body.replaceChildren();
  for (const e of events) {
    body.append(el("tr", { class: "event", "data-rule": e.rule },
      el("td", {}, e.step), el("td", { class: e.severity }, e.severity), el("td", {}, e.rule),
      el("td", {}, e.symptom), el("td", {}, e.fix)));
  }
  $("#no-events").hidden = events.length > 0;
}

function showPlots(plots, step) {
  const box = $("#plots");
  box.replaceChildren();
  for (const p of plots) {
    box.append(el("figure", {}, el("img", { src: `${p.url}?v=${step}`, alt: p.title }), el("figcaption", {}, p.title)));
  }
}

async function refreshState() {
  const s = await getJSON(`/api/state?run=${encodeURIComponent(current.run)}`);
  $("#status").textContent = `step ${s.step} · ${s.samples} samples · ${s.running ? "running" : "finished"}`;
  $("#counts").textContent = Object.entries(s.labels).map(([k, n]) => `${k} ${n}`).join(" · ");
  fillOptions($("#f-reward_fn"), s.reward_fns);
  fillOptions($("#f-flag"), s.flags);
  fillOptions($("#f-label"), s.label_names);
  showEvents(s.events);
  const grew = s.step !== current.step || s.samples !== current.samples;
  if (grew) {
    showPlots(s.plots, s.step);
    const first = current.samples < 0;
    current.step = s.step;
    current.samples = s.samples;
    const typing = document.activeElement && document.activeElement.classList.contains("note");
    if (first || (current.shown < 50 && !typing)) await loadSamples(false);
  }
}

async function start() {
  const runs = await getJSON("/api/runs");
  const select = $("#run");
  for (const r of runs) select.append(el("option", { value: r.name }, `${r.name}${r.running ? " (running)" : ""}`));
  current.run = runs.length ? runs[0].name : "";
  select.addEventListener("change", () => {
    current = { run: select.value, step: -1, samples: -1, shown: 0 };
    $("#panel").hidden = true;
    refreshState();
  });
  $("#filters").addEventListener("submit", (e) => { e.preventDefault(); loadSamples(false).catch(showError); });
  $("#filters").addEventListener("reset", () => setTimeout(() => loadSamples(false), 0));
  $("#more").addEventListener("click", () => loadSamples(true));
  $("#panel-close").addEventListener("click", () => { $("#panel").hidden = true; });
  await refreshState();
  setInterval(() => refreshState().catch(() => {}), POLL_MS);
}

start();
