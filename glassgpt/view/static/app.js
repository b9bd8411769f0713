// glassgpt viewer: one generation and what explains it (spans, nearest windows, neurons).
// Two modes: live (talks to `glassgpt view`'s JSON API) and static (`glassgpt report`: the data is
// inlined as JSON in a script element, id glassgpt-data). Every string from the corpus, the model or the user
// is rendered with text nodes (el() / textContent), never as markup.
"use strict";

const STATIC_DATA = (() => {
  const node = document.getElementById("glassgpt-data");
  return node ? JSON.parse(node.textContent) : null;
})();
const LIVE = STATIC_DATA === null;
const $ = (id) => document.getElementById(id);
const state = { result: null, neuron: null, cards: {}, selection: "" };

// el("div", {class: "x", title: t}, "text", child): children that are strings become text nodes
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "title") node.title = String(v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "style") Object.assign(node.style, v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
function fmt(x, d = 3) { return x === null || x === undefined ? "n/a" : Number(x).toFixed(d); }

function showError(msg) { const e = $("error"); e.textContent = msg || ""; e.hidden = !msg; }
function status(msg) { $("status").textContent = msg || ""; }

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  let data;
  try { data = await r.json(); } catch (e) { throw new Error(`${path}: HTTP ${r.status}`); }
  if (!r.ok || (data && data.error && r.status >= 400)) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

// ---------------------------------------------------------------- the text, highlighted

// Python counts characters as code points, JS strings as UTF-16 units: slice by code points.
function rarityLevels(spans) {
  const lp = spans.map((s) => s.logprob).sort((a, b) => a - b);
  const cut1 = lp[Math.floor(lp.length / 3)], cut2 = lp[Math.floor((2 * lp.length) / 3)];
  return spans.map((s) => (s.logprob <= cut1 ? 3 : s.logprob <= cut2 ? 2 : 1));
}

function renderText() {
  const out = clear($("output"));
  const r = state.result;
  if (!r) return;
  const cps = Array.from(r.text);
  const offs = r.token_offsets || [...Array(cps.length + 1).keys()];
  const spans = (r.spans && r.spans.spans) || [];
  const levels = rarityLevels(spans);
  const cuts = new Set([0, cps.length, ...offs]);
  for (const [a, b] of (r.spans && r.spans.highlights) || []) { cuts.add(a); cuts.add(b); }
  const points = [...cuts].filter((c) => c >= 0 && c <= cps.length).sort((a, b) => a - b);
  const acts = state.neuron ? state.neuron.token_activations : null;
  const maxAct = acts ? Math.max(1e-6, ...acts.map((a) => Math.abs(a))) : 1;
  let tok = 0;
  for (let i = 0; i + 1 < points.length; i++) {
    const a = points[i], b = points[i + 1];
    while (tok + 1 < offs.length - 1 && offs[tok + 1] <= a) tok++;
    const covering = spans.map((s, k) => [s, levels[k]]).filter(([s]) => s.char_start <= a && b <= s.char_end);
    const seg = el("span", { class: "seg", "data-token": tok }, cps.slice(a, b).join(""));
    if (a < (r.prompt_chars || 0)) seg.classList.add("prompt");
    if (covering.length) {
      seg.classList.add("hl", "hl" + Math.max(...covering.map(([, l]) => l)));
      seg.title = covering.map(([s]) => `${s.count} occurrence(s) in the training data: "${s.text}"`).join("\n");
      seg.addEventListener("click", () => showSources(covering.map(([s]) => s)));
    }
    if (acts && tok < acts.length) {
      const v = acts[tok] / maxAct;
      seg.style.backgroundColor = v >= 0 ? `rgba(255, 120, 0, ${Math.min(1, v).toFixed(3)})` : `rgba(60, 120, 255, ${Math.min(1, -v).toFixed(3)})`;
      seg.title = (seg.title ? seg.title + "\n" : "") + `neuron ${state.neuron.layer}/${state.neuron.index}: ${fmt(acts[tok])}`;
      seg.classList.add("act");
    }
    out.appendChild(seg);
  }
  const sp = r.spans || {};
  $("coverage").textContent = sp.error ? `spans: ${sp.error}` :
    `${(sp.spans || []).length} span(s) shown of ${sp.n_maximal} maximal; coverage ${(100 * (sp.coverage || 0)).toFixed(1)}% of ${sp.n_tokens} tokens`;
}

function showSources(spans) {
  const box = clear($("sources"));
  $("sources-panel").hidden = false;
  for (const s of spans) {
    box.appendChild(el("div", { class: "span-head" }, el("span", { class: "hl hl3" }, s.text), ` — ${s.count} occurrence(s), log p ${fmt(s.logprob, 1)}`));
    for (const src of s.sources || []) {
      const row = el("div", { class: "source", title: "open the surrounding training text" },
        el("div", { class: "loc muted" }, `${src.doc_id} line ${src.line} (tokens ${src.token_start}-${src.token_end})`),
        el("div", { class: "text" }, "…" + src.context_before, el("mark", {}, src.text), src.context_after + "…"));
      row.addEventListener("click", () => openContext(src));
      box.appendChild(row);
    }
  }
}

async function openContext(src) {
  $("context-panel").hidden = false;
  const box = clear($("context"));
  let c = { before: src.context_before, match: src.text, after: src.context_after, location: src };
  if (LIVE) {
    try { c = await api("/api/context", { token_start: src.token_start, token_end: src.token_end }); }
    catch (e) { showError(e.message); }
  }
  $("context-loc").textContent = `${src.doc_id} line ${src.line}, ${src.source || ""}`;
  box.append(el("span", {}, c.before), el("mark", {}, c.match), el("span", {}, c.after));
  $("context-panel").scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------- nearest windows

function renderKnn(k, what) {
  const box = clear($("knn"));
  $("knn-what").textContent = what || "";
  if (!k) return;
  if (k.error) { box.appendChild(el("div", { class: "error-inline" }, k.error)); return; }
  for (const n of k.neighbours) {
    box.appendChild(el("div", { class: "neighbour" },
      el("div", { class: "loc muted" }, `#${n.rank}  score ${fmt(n.score, 4)}  ${n.doc_id} line ${n.line} (tokens ${n.token_start}:${n.token_end})`),
      el("div", { class: "text" }, n.text)));
  }
}

// ---------------------------------------------------------------- what taught it (influence)

// A token's share of a window's score as a background: green = raised the score, red = lowered it.
function shade(score, max) {
  if (!max || !score) return null;
  const a = (0.65 * Math.min(1, Math.abs(score) / max)).toFixed(3);
  return { background: score > 0 ? `rgba(46, 160, 67, ${a})` : `rgba(215, 58, 73, ${a})` };
}

function tokenRow(pieces) {  // [[text, score], ...] -> one line of shaded text nodes
  const max = Math.max(0, ...pieces.map(([, s]) => Math.abs(s)));
  const row = el("div", { class: "text" });
  for (const [t, s] of pieces) row.appendChild(el("span", { title: fmt(s, 6), style: shade(s, max) }, t));
  return row;
}

function renderInfluence(r) {
  const box = clear($("influence"));
  $("influence-what").textContent = "";
  if (!r) return;
  if (r.error) { box.appendChild(el("div", { class: "error-inline" }, r.error)); return; }
  $("influence-what").textContent = `score: predicted change of the traced text's loss (nats) if the window were left `
    + `out of training; + taught it, − worked against it. ${r.n_candidates} of ${r.n_windows} windows scored in `
    + `${(r.query_ms / 1000).toFixed(1)} s.`;
  for (const [title, wins] of [["Proponents", r.proponents], ["Opponents", r.opponents]]) {
    box.appendChild(el("h3", {}, wins.length ? title : `${title}: none among the candidates`));
    for (const w of wins) {
      const explains = r.tokens.map((t, i) => [t, w.query_scores[i]]).slice(r.prompt_tokens);
      box.appendChild(el("div", { class: "neighbour influence" },
        el("div", { class: "loc muted" }, `#${w.rank}  ${w.score > 0 ? "+" : ""}${Number(w.score).toPrecision(3)} nats  `
          + `${w.doc_id} line ${w.line} (tokens ${w.token_start}:${w.token_end})`),
        tokenRow(w.pieces), el("div", { class: "muted" }, "explains:"), tokenRow(explains)));
    }
  }
}

async function traceInfluence() {
  const r = state.result;
  if (!r || !LIVE) return;
  const prompt = Array.from(r.text).slice(0, r.prompt_chars || 0).join("");
  showError(""); status("tracing what taught it…");
  const t0 = performance.now();
  try {
    renderInfluence(await api("/api/influence", { text: r.text, prompt, k: 5 }));
    status(`influence traced in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  } catch (e) { showError(e.message); status(""); }
}

async function knnSelection() {
  const text = state.selection;
  if (!text || !LIVE) return;
  try { renderKnn(await api("/api/knn", { text, k: 5 }), `for the selected part: "${text.slice(0, 60)}${text.length > 60 ? "…" : ""}"`); }
  catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- neurons

function renderNeurons(nr) {
  const box = clear($("neurons"));
  clear($("neuron-card"));
  $("ablation").textContent = "";
  if (!nr) return;
  if (nr.error) { box.appendChild(el("div", { class: "error-inline" }, nr.error)); return; }
  const a = nr.ablation;
  if (a) {
    // engine versions name the control differently: activation-matched neurons, or random ones
    const ctl = a.drop_matched_mean !== undefined ? ["activation-matched", a.drop_matched_mean, a.drop_matched_std]
      : ["random", a.drop_random_mean, a.drop_random_std];
    $("ablation").textContent = `ablating these ${a.k} (${a.mode || "zero"}): log p of the text drops ${fmt(a.drop_top, 2)} nats; ` +
      `${a.k} ${ctl[0]} neurons: ${fmt(ctl[1], 2)} ± ${fmt(ctl[2], 2)}` + (a.drop_raw_top !== undefined ? `; the ${a.k} most active: ${fmt(a.drop_raw_top, 2)}` : "") +
      ` (ranked by ${nr.ranking}, ${nr.n_traced_tokens} tokens)`;
  }
  const table = el("table", { class: "neurons" }, el("tr", {}, el("th", {}, "layer/neuron"), el("th", {}, "score"), el("th", {}, "mean act")));
  for (const t of nr.top) {
    const row = el("tr", { class: "neuron", "data-neuron": `${t.layer}:${t.index}` },
      el("td", {}, `${t.layer}/${t.index}`), el("td", {}, fmt(t.score, 2)), el("td", {}, fmt(t.mean_activation, 3)));
    row.addEventListener("click", () => selectNeuron(t));
    table.appendChild(row);
  }
  box.appendChild(table);
}

async function selectNeuron(t) {
  state.neuron = t;
  $("clear-neuron").hidden = false;
  for (const r of document.querySelectorAll("tr.neuron")) r.classList.toggle("selected", r.dataset.neuron === `${t.layer}:${t.index}`);
  $("legend").textContent = `coloured by neuron ${t.layer}/${t.index}'s activation (orange +, blue −)`;
  renderText();
  const card = clear($("neuron-card"));
  const key = `${t.layer}:${t.index}`;
  let c = state.cards[key];
  if (!c && LIVE) {
    card.appendChild(el("div", { class: "muted" }, "loading its top-activating training windows…"));
    try { c = state.cards[key] = await api("/api/neuron", { layer: t.layer, index: t.index, top: 8 }); }
    catch (e) { clear(card).appendChild(el("div", { class: "error-inline" }, e.message)); return; }
  }
  clear(card);
  if (!c) { card.appendChild(el("div", { class: "muted" }, "no training windows for this neuron in this report")); return; }
  card.appendChild(el("h3", {}, `neuron ${t.layer}/${t.index}: top-activating training windows`));
  for (const e of c.examples) {
    const m = Math.max(1e-6, ...(e.tokens || []).map(([, v]) => Math.abs(v)));
    const line = el("div", { class: "text example" });
    for (const [s, v] of e.tokens || [[e.before + e.token + e.after, e.activation]]) {
      const x = v / m;
      line.appendChild(el("span", { class: "act", title: fmt(v), style: { backgroundColor: x >= 0 ? `rgba(255, 120, 0, ${Math.min(1, x).toFixed(3)})` : `rgba(60, 120, 255, ${Math.min(1, -x).toFixed(3)})` } }, s));
    }
    card.appendChild(el("div", { class: "loc muted" }, `act ${fmt(e.activation)}  ${e.location.doc_id} line ${e.line}`));
    card.appendChild(line);
  }
}

function clearNeuron() {
  state.neuron = null;
  $("clear-neuron").hidden = true;
  $("legend").textContent = "highlighted: verbatim in the training data (brighter = rarer)";
  for (const r of document.querySelectorAll("tr.neuron")) r.classList.remove("selected");
  clear($("neuron-card"));
  renderText();
}

// ---------------------------------------------------------------- the run

function renderRun(info) {
  $("run-summary").textContent = `${info.out_dir} · ${(info.n_params / 1e6).toFixed(2)}M parameters · iter ${info.iter_num} · ${info.dataset || info.data_dir}`;
  const box = clear($("run"));
  const rows = [["checkpoint", info.out_dir], ["iteration", info.iter_num], ["parameters", info.n_params.toLocaleString()],
    ["layers / heads / width", `${info.n_layer} / ${info.n_head} / ${info.n_embd}`], ["context", info.block_size],
    ["vocabulary", `${info.vocab_size} (${info.tokenizer})`], ["dataset", `${info.dataset || ""} ${info.data_dir}`]];
  box.appendChild(el("table", { class: "kv" }, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v))))));
  renderLoss(info.loss_curve);
  renderIndexes(info.indexes);
}

function renderLoss(curve) {
  const box = clear($("loss"));
  if (!curve || !curve.train.length) { box.appendChild(el("div", { class: "muted" }, "no log.jsonl: no loss curve")); return; }
  const W = 320, H = 120, NS = "http://www.w3.org/2000/svg";
  const all = curve.train.map((p) => p[1]).concat(curve.eval.map((p) => p[2]));
  const maxIt = Math.max(1, ...curve.train.map((p) => p[0]), ...curve.eval.map((p) => p[0]));
  const lo = Math.min(...all), hi = Math.max(...all);
  const x = (it) => (4 + (W - 8) * it / maxIt).toFixed(1), y = (v) => (H - 14 - (H - 24) * (v - lo) / Math.max(1e-9, hi - lo)).toFixed(1);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("class", "loss");
  const line = (pts, cls) => { const p = document.createElementNS(NS, "polyline"); p.setAttribute("points", pts.join(" ")); p.setAttribute("class", cls); svg.appendChild(p); };
  line(curve.train.map((p) => `${x(p[0])},${y(p[1])}`), "train");
  if (curve.eval.length) line(curve.eval.map((p) => `${x(p[0])},${y(p[2])}`), "val");
  const t = document.createElementNS(NS, "text"); t.setAttribute("x", "6"); t.setAttribute("y", String(H - 2));
  const last = curve.eval.length ? curve.eval[curve.eval.length - 1] : null;
  t.textContent = `loss ${fmt(hi, 2)} → ${fmt(lo, 2)}` + (last ? `; val ${fmt(last[2], 3)} at iter ${last[0]}` : "");
  svg.appendChild(t);
  box.appendChild(svg);
}

const INDEX_NAMES = { spans: "span index (verbatim spans)", knn: "kNN store (nearest windows)", neurons: "neuron baseline (contrast)", examples: "neuron examples (top windows)", influence: "influence store (what taught it)" };

function renderIndexes(ix) {
  const box = clear($("indexes"));
  for (const [kind, s] of Object.entries(ix || {})) {
    const row = el("div", { class: "index " + (s.fresh ? "fresh" : "stale"), "data-kind": kind },
      el("span", { class: "badge" }, s.fresh ? "fresh" : "missing/stale"), " " + (INDEX_NAMES[kind] || kind));
    if (!s.fresh) {
      row.appendChild(el("div", { class: "muted" }, s.problem || ""));
      row.appendChild(el("div", {}, "build: ", el("code", {}, s.command)));
      if (LIVE) {
        const b = s.build;
        if (b && b.state === "running") row.appendChild(el("progress", { id: "progress-" + kind }));
        else row.appendChild(el("button", { type: "button", class: "small", onclick: () => startBuild(kind) }, "build it now"));
        if (b && b.state === "error") row.appendChild(el("div", { class: "error-inline" }, b.message));
      }
    } else if (s.build && s.build.state === "done") row.appendChild(el("span", { class: "muted" }, " — " + s.build.message));
    box.appendChild(row);
  }
}

async function startBuild(kind) {
  try { await api("/api/build", { kind }); } catch (e) { showError(e.message); return; }
  pollBuild();
}

async function pollBuild() {
  const p = await api("/api/progress");
  renderIndexes(p.indexes);
  const running = Object.entries(p.indexes).find(([, s]) => s.build && s.build.state === "running");
  if (running) {
    const bar = $("progress-" + running[0]);
    if (bar && p.bar) { bar.max = p.bar.total; bar.value = p.bar.n; bar.title = `${p.bar.desc} ${p.bar.n}/${p.bar.total}`; }
    setTimeout(pollBuild, 400);
  } else {
    renderRun(await api("/api/run"));
  }
}

// ---------------------------------------------------------------- generate / trace

function settings() {
  const num = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
  return { max_new_tokens: num("max_new_tokens"), temperature: num("temperature"), top_k: num("top_k"), seed: num("seed") };
}

function busy(on) { $("generate").disabled = on; $("trace").disabled = on; }

async function generate() {
  showError(""); busy(true);
  const prompt = $("prompt").value;
  state.result = { text: prompt, prompt_chars: Array.from(prompt).length, token_offsets: null, spans: null };
  renderText(); renderKnn(null); renderInfluence(null); renderNeurons(null); clearNeuron();
  $("influence-run").disabled = true;
  status("generating…");
  const t0 = performance.now();
  try {
    const r = await fetch("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ prompt, ...settings() }) });
    if (!r.ok) { const d = await r.json().catch(() => ({})); throw new Error(d.error || `HTTP ${r.status}`); }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "", done = null;
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i); buf = buf.slice(i + 2);
        const ev = /^event: (.*)$/m.exec(block), data = /^data: (.*)$/m.exec(block);
        if (!ev || !data) continue;
        const payload = JSON.parse(data[1]);
        if (ev[1] === "piece") { state.result.text += payload.text; $("output").appendChild(el("span", { class: "seg streaming" }, payload.text)); }
        else if (ev[1] === "error") throw new Error(payload.error);
        else if (ev[1] === "done") done = payload;
      }
    }
    if (!done) throw new Error("the generation stream ended early");
    status(`generated in ${((performance.now() - t0) / 1000).toFixed(2)} s; explaining…`);
    await explain(done.text, done.prompt);
  } catch (e) { showError(e.message); status(""); }
  finally { busy(false); }
}

async function explain(text, prompt) {
  const t0 = performance.now();
  const r = await api("/api/explain", { text, prompt: prompt || "" });
  showResult(r);
  status(`explained in ${((performance.now() - t0) / 1000).toFixed(2)} s (spans ${r.timings_ms.spans} ms, windows ${r.timings_ms.knn} ms, neurons ${r.timings_ms.neurons} ms)`);
}

async function traceText() {
  showError(""); busy(true); clearNeuron();
  status("tracing…");
  try { await explain($("prompt").value, ""); } catch (e) { showError(e.message); status(""); }
  finally { busy(false); }
}

function showResult(r) {
  state.result = r;
  state.neuron = null;
  renderText();
  renderKnn(r.knn, "for the whole text");
  renderInfluence(r.influence || null);
  $("influence-run").disabled = !LIVE;
  renderNeurons(r.neurons);
  document.body.dataset.ready = "1";
}

function onSelect() {
  const sel = window.getSelection();
  const inside = sel && sel.rangeCount && $("output").contains(sel.anchorNode);
  state.selection = inside ? sel.toString() : "";
  $("knn-selection").disabled = !(LIVE && state.selection.trim());
}

async function init() {
  $("clear-neuron").addEventListener("click", clearNeuron);
  $("knn-selection").addEventListener("click", knnSelection);
  $("influence-run").addEventListener("click", traceInfluence);
  document.addEventListener("selectionchange", onSelect);
  if (!LIVE) {
    $("controls").hidden = true;
    renderRun(STATIC_DATA.run);
    state.cards = STATIC_DATA.cards || {};
    showResult(STATIC_DATA.result);
    status(`static report written ${STATIC_DATA.written_at || ""}: ${STATIC_DATA.what || ""}`);
    return;
  }
  $("generate").addEventListener("click", generate);
  $("trace").addEventListener("click", traceText);
  try { renderRun(await api("/api/run")); } catch (e) { showError(e.message); }
  document.body.dataset.loaded = "1";
}

init();
