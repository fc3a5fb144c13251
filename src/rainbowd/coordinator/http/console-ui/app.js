// rbd web console: polls the coordinator's admin API (JSON) once a second and draws it.
//
// Why polling and not Server-Sent Events: EventSource cannot send an
// Authorization header, so the admin token would have to ride in the URL
// (access logs, history). A poll reuses the authenticated JSON API as it is
// and recovers from a coordinator restart by itself.
//
// Every string from the cluster (node ids, reasons, event details) goes into
// the page as text (textContent / createTextNode), never as HTML; the page's
// Content-Security-Policy forbids inline script as a second wall.
"use strict";

const TOKEN_KEY = "rbd-admin-token";
const POLL_MS = 1000;
const REQUEST_TIMEOUT_MS = 5000;
const MAX_JOBS_SHOWN = 12;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  token: "",
  generation: 0, // bumped on login/logout: a poll of an older session drops its result
  timer: 0,
  selectedJob: "", // job id whose graph is shown
  userSelected: false, // the operator clicked a job: do not follow the newest one
  lastOk: 0,
};

class AuthError extends Error {}

// ---------------------------------------------------------------- helpers
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function td(text, cls) {
  return el("td", { class: cls || "", text: text });
}

function badge(text, cls) {
  return el("span", { class: "badge " + (cls || text), text: text });
}

const MiB = 1024 * 1024;
function mib(n) {
  return (n / MiB).toFixed(n >= 100 * MiB ? 0 : 1) + " MiB";
}
function size(n) {
  if (n >= 1024 * MiB) return (n / 1024 / MiB).toFixed(2) + " GiB";
  if (n >= MiB) return mib(n);
  if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
  return n + " B";
}
// bytes/s -> MB/s (decimal, as the scheduler's reasons print it)
function mbps(bps) {
  return (bps / 1e6).toFixed(1) + " MB/s";
}
function shortDigest(d) {
  return String(d).split(":").pop().slice(0, 12);
}
function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return s.toFixed(0) + " s ago";
  if (s < 5400) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}
function clock(t) {
  return new Date(t * 1000).toLocaleTimeString();
}
function truncate(s, n) {
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
}
function replaceRows(tbody, rows, emptyText, columns) {
  tbody.replaceChildren(...rows);
  if (!rows.length) tbody.append(el("tr", {}, el("td", { class: "empty", colSpan: columns, text: emptyText })));
}

// ---------------------------------------------------------------- API
async function api(path, token) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), REQUEST_TIMEOUT_MS);
  let resp;
  try {
    resp = await fetch(path, {
      headers: { Accept: "application/json", Authorization: "Bearer " + token },
      cache: "no-store",
      signal: ctrl.signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw new Error(`${path}: no answer in ${REQUEST_TIMEOUT_MS / 1000} s`);
    throw new Error(`${path}: ${e.message}`);
  } finally {
    clearTimeout(timer);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    body = null;
  }
  const why = body && body.error ? body.error : `HTTP ${resp.status}`;
  if (resp.status === 401 || resp.status === 403) throw new AuthError(why);
  if (!resp.ok) throw new Error(`${path}: ${why}`);
  return body;
}

// ---------------------------------------------------------------- login
function showLogin(message) {
  state.generation += 1;
  clearTimeout(state.timer);
  state.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  $("console").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  const err = $("login-error");
  err.hidden = !message;
  err.textContent = message || "";
  setLive("off", "not connected");
  $("token").focus();
}

function showConsole(token) {
  state.generation += 1;
  clearTimeout(state.timer);
  state.token = token;
  state.userSelected = false;
  state.selectedJob = "";
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("console").hidden = false;
  $("logout").hidden = false;
  setLive("off", "connecting…");
  tick(state.generation);
}

async function onLogin(ev) {
  ev.preventDefault();
  const token = $("token").value.trim();
  const err = $("login-error");
  if (!token) return;
  try {
    await api("/v1/nodes", token);
  } catch (e) {
    err.hidden = false;
    err.textContent =
      e instanceof AuthError
        ? `The coordinator refused this admin token: ${e.message}`
        : `Cannot reach the coordinator: ${e.message}`;
    return;
  }
  $("token").value = "";
  showConsole(token);
}

function setLive(cls, text) {
  const live = $("live");
  live.className = "live " + cls;
  live.textContent = text;
}

// ---------------------------------------------------------------- the poll
async function tick(gen) {
  if (gen !== state.generation) return;
  const token = state.token;
  try {
    const [nodes, jobs, events, images] = await Promise.all([
      api("/v1/nodes", token),
      // every job, without the nodes' finished transfers (they grow with each piece);
      // only the job on show is fetched whole, below
      api("/v1/jobs?transfers=0", token),
      api("/v1/security-events", token),
      api("/v1/images", token),
    ]);
    const picked = pickJob(jobs.jobs);
    const [job, active] = picked
      ? await Promise.all([
          api(`/v1/jobs/${encodeURIComponent(picked.job_id)}`, token),
          api(`/v1/jobs/${encodeURIComponent(picked.job_id)}/transfers`, token),
        ])
      : [null, { transfers: [] }];
    if (gen !== state.generation) return;
    renderNodes(nodes.nodes);
    // the job on show whole (seeders per node); the others from the brief list
    renderJobs(jobs.jobs.map((j) => (job && j.job_id === job.job_id ? job : j)));
    renderGraph(job, active.transfers, nodes.nodes);
    renderEvents(events.events, events.total ?? events.events.length);
    renderImages(images.images);
    state.lastOk = Date.now();
    $("banner").hidden = true;
    setLive("on", "live · updated " + new Date().toLocaleTimeString());
  } catch (e) {
    if (gen !== state.generation) return;
    if (e instanceof AuthError) {
      showLogin(`The coordinator no longer accepts this admin token: ${e.message}`);
      return;
    }
    const since = state.lastOk ? ` (showing data from ${((Date.now() - state.lastOk) / 1000).toFixed(0)} s ago)` : "";
    $("banner").hidden = false;
    $("banner").textContent = `Coordinator unreachable or failing: ${e.message}; retrying every second${since}.`;
    setLive("stale", "reconnecting…");
  }
  if (gen === state.generation) state.timer = setTimeout(() => tick(gen), POLL_MS);
}

function pickJob(jobs) {
  if (!jobs.length) return null;
  const byId = jobs.find((j) => j.job_id === state.selectedJob);
  if (byId && state.userSelected) return byId;
  const running = jobs.filter((j) => j.state === "running");
  const job = (running.length ? running : jobs)[(running.length ? running : jobs).length - 1];
  state.selectedJob = job.job_id;
  return job;
}

// ---------------------------------------------------------------- nodes
function health(n) {
  if (n.quarantined) return "quarantined";
  if (n.suspect) return "suspect";
  return n.state;
}

function renderNodes(nodes) {
  const origin = (n) => (n.roles.includes("origin") ? 0 : 1);
  const sorted = nodes.slice().sort((a, b) => origin(a) - origin(b) || a.node_id.localeCompare(b.node_id));
  const rows = sorted.map((n) => {
    const h = health(n);
    const hcell = el("td", {}, badge(h));
    if (n.quarantined && n.quarantine_reason) {
      hcell.title = n.quarantine_reason;
      hcell.append(el("div", { class: "note", text: truncate(n.quarantine_reason, 90) }));
    }
    return el(
      "tr",
      { "data-node": n.node_id },
      td(n.node_id, "mono"),
      hcell,
      td(n.roles.join(", ") || "—"),
      td(`${n.address}:${n.ssh_port}`, "mono"),
      td(n.speed_bps ? mbps(n.speed_bps) : "—", "num"),
      td(n.load.toFixed(2), "num"),
      td(n.busy ? "busy" : "idle"),
      td(String(n.holdings), "num"),
      td(n.disk_free ? size(n.disk_free) : "—", "num"),
      td(ago(n.last_seen)),
    );
  });
  replaceRows($("nodes").tBodies[0], rows, "no nodes enrolled", 10);
  const up = nodes.filter((n) => health(n) === "up").length;
  const q = nodes.filter((n) => n.quarantined).length;
  $("nodes-summary").textContent = `${up} of ${nodes.length} up` + (q ? ` · ${q} quarantined` : "");
}

// ---------------------------------------------------------------- jobs
function nodeRow(job, ns) {
  const pct = ns.bytes_total ? Math.floor((100 * ns.bytes_done) / ns.bytes_total) : 100;
  const bar = el("div", { class: "bar " + ns.state });
  const fill = el("div", { class: "fill" });
  fill.style.width = pct + "%"; // CSSOM, allowed by the CSP (no inline style attribute)
  bar.append(fill, el("span", { class: "label", text: `${pct}% · ${mib(ns.bytes_done)} / ${mib(ns.bytes_total)}` }));
  const end = ns.finished_at || (job.state === "running" ? Date.now() / 1000 : job.finished_at);
  const seeders = [...new Set(ns.transfers.map((t) => t.seeder))];
  const row = el(
    "tr",
    { "data-node": ns.node_id },
    td(ns.node_id, "mono"),
    el("td", {}, badge(ns.state)),
    el("td", { class: "progress" }, bar),
    td(`${ns.layers_done}/${ns.layers_total} layers`, "num"),
    td(ns.rate_bps ? mbps(ns.rate_bps) : "—", "num rate"),
    td(`${Math.max(0, end - ns.started_at).toFixed(1)} s`, "num"),
    td(seeders.length ? "from " + seeders.join(", ") : "—"),
  );
  if (ns.error) row.title = ns.error;
  return row;
}

function renderJobs(jobs) {
  const box = $("jobs");
  if (!jobs.length) {
    box.replaceChildren(el("p", { class: "empty", text: "no jobs yet" }));
    return;
  }
  const cards = jobs
    .slice(-MAX_JOBS_SHOWN)
    .reverse()
    .map((job) => {
      const done = job.nodes.filter((n) => n.state === "done").length;
      const elapsed = (job.finished_at || Date.now() / 1000) - job.created_at;
      const head = el(
        "div",
        { class: "job-head" },
        el("span", { class: "mono", text: job.job_id }),
        el("span", { class: "image", text: job.image }),
        badge(job.state),
        el("span", {
          class: "meta",
          text:
            `${done}/${job.nodes.length} nodes done · ${elapsed.toFixed(1)} s · ` +
            `a copy ${size(job.copy_bytes)} on the wire · ${size(job.wire_bytes)} sent` +
            (job.copy_bytes ? ` (${(job.wire_bytes / job.copy_bytes).toFixed(1)} copies)` : ""),
        }),
      );
      head.addEventListener("click", () => {
        state.selectedJob = job.job_id;
        state.userSelected = true;
        tick(state.generation);
      });
      const table = el("table", {}, el("tbody", {}, ...job.nodes.map((ns) => nodeRow(job, ns))));
      const card = el("div", { class: "job" + (job.job_id === state.selectedJob ? " selected" : ""), "data-job": job.job_id }, head, table);
      if (job.error) card.append(el("div", { class: "err", text: job.error }));
      return card;
    });
  // keep each bar's element when the job is still shown, so its width animates
  const old = new Map([...box.querySelectorAll(".job")].map((c) => [c.dataset.job, c]));
  for (const card of cards) {
    const prev = old.get(card.dataset.job);
    if (!prev) continue;
    for (const fill of card.querySelectorAll("tr[data-node] .fill")) {
      const node = fill.closest("tr").dataset.node;
      const was = prev.querySelector(`tr[data-node="${CSS.escape(node)}"] .fill`);
      if (was) {
        was.style.width = fill.style.width;
        fill.replaceWith(was);
      }
    }
  }
  box.replaceChildren(...cards);
}

// ---------------------------------------------------------------- transfer graph
const BOX_W = 140;
const COL_GAP = 270; // room for the edge labels, which sit left of their demander
const BEND = 50; // an arrow changes height in this first stretch, then runs flat under its label
const ROW_GAP = 18;
const TOP = 26;
const SLOT2 = 24; // per incoming edge: two label lines (layer · rate, then why)
const SLOT1 = 13; // many layers: one line each; the reason stays in the tooltip and the table
const MAX_TWO_LINE = 3;

function graphEdges(job, active) {
  const edges = [];
  for (const ns of job.nodes) {
    for (const u of ns.transfers) {
      edges.push({
        seeder: u.seeder, demander: ns.node_id, layer: u.layer, bytes: u.bytes,
        rate: u.seconds > 0 ? u.bytes / u.seconds : 0, reason: u.reason, active: false,
      });
    }
  }
  for (const t of active) {
    edges.push({
      seeder: t.seeder, demander: t.demander, layer: t.layer, bytes: t.bytes_done, total: t.bytes_total,
      rate: t.rate_bps, reason: t.reason, active: true,
    });
  }
  return edges;
}

// A transfer's reason is a record (rainbowd.core.sched.reasons): the policy, the rule
// that chose the seeder, the turn that put the demander first, and the numbers both
// weighed, by name; a name's suffix gives its unit (_bps: bytes/s, _s: seconds, _bytes).
// A reason stored by an older rbd is rule "legacy" with its text.
function reasonNumber(name, v) {
  const label = name.replace(/_(bps|bytes|s)$/, "").replace(/_/g, " ");
  if (name.endsWith("_bps")) return `${label} ${mbps(v)}`;
  if (name.endsWith("_bytes")) return `${label} ${size(v)}`;
  if (name.endsWith("_s")) return `${label} ${v.toFixed(1)} s`;
  return `${label} ${v}`;
}

// "swarm: best-fit (seeder 8.0 MB/s, free up 8.0 MB/s, ...); turn fastest-first"
function reasonText(r) {
  if (!r) return "";
  if (r.rule === "legacy") return r.text;
  const numbers = Object.entries(r.numbers || {}).map(([k, v]) => reasonNumber(k, v));
  const rule = `${r.policy ? r.policy + ": " : ""}${r.rule}`;
  const head = numbers.length ? `${rule} (${numbers.join(", ")})` : rule;
  return r.turn ? `${head}; turn ${r.turn}` : head;
}

// the policy, the rule and the rate it gave: "swarm: best-fit 4.0 MB/s"
function reasonShort(r) {
  if (!r || r.rule === "legacy") return truncate(r ? r.text : "", 34);
  const n = r.numbers || {};
  const rate = "planned_bps" in n ? n.planned_bps : n.seeder_bps;
  const rule = `${r.policy ? r.policy + ": " : ""}${r.rule}`;
  return truncate(rate === undefined ? rule : `${rule} ${mbps(rate)}`, 34);
}

// A layered layout: column 0 holds the nodes that had the data (the origin, earlier
// holders); a node sits one column right of the rightmost seeder that fed it, so
// every arrow points right; nodes still waiting for a first transfer come last.
// Within a column, nodes are in the order they finished.
function layout(job, edges) {
  const inJob = new Map(job.nodes.map((n) => [n.node_id, n]));
  const feeders = new Map();
  for (const e of edges) {
    if (!feeders.has(e.demander)) feeders.set(e.demander, new Set());
    feeders.get(e.demander).add(e.seeder);
  }
  const ids = new Set([...inJob.keys(), ...edges.map((e) => e.seeder)]);
  const col = new Map();
  const visiting = new Set();
  function depth(id) {
    if (col.has(id)) return col.get(id);
    if (!feeders.has(id) || visiting.has(id)) return 0; // a cycle (A seeds B one layer, B seeds A another)
    visiting.add(id);
    let d = 0;
    for (const s of feeders.get(id)) d = Math.max(d, depth(s) + 1);
    visiting.delete(id);
    col.set(id, d);
    return d;
  }
  let maxCol = 0;
  for (const id of ids) if (feeders.has(id)) maxCol = Math.max(maxCol, depth(id));
  const waiting = [];
  for (const id of ids) {
    if (col.has(id)) continue;
    const ns = inJob.get(id);
    if (ns && ns.state !== "done") waiting.push(id);
    else col.set(id, 0);
  }
  const waitCol = waiting.length ? maxCol + 1 : -1;
  for (const id of waiting) col.set(id, waitCol);
  const columns = [];
  for (const [id, c] of col) (columns[c] = columns[c] || []).push(id);
  for (let c = 0; c < columns.length; c++) columns[c] = columns[c] || [];
  const incoming = new Map();
  for (const e of edges) incoming.set(e.demander, (incoming.get(e.demander) || 0) + 1);
  const most = Math.max(1, ...incoming.values());
  const slot = most <= MAX_TWO_LINE ? SLOT2 : SLOT1;
  const boxH = Math.max(46, most * slot);
  const rowH = boxH + ROW_GAP;
  const finished = (id) => (inJob.get(id) && inJob.get(id).finished_at) || Infinity;
  const pos = new Map();
  columns.forEach((list, c) => {
    list.sort((a, b) => finished(a) - finished(b) || a.localeCompare(b));
    list.forEach((id, r) => pos.set(id, { x: 10 + c * (BOX_W + COL_GAP), y: TOP + r * rowH }));
  });
  return { pos, columns, waitCol, inJob, slot, boxH, rowH };
}

function renderGraph(job, active, nodes) {
  const box = $("graph");
  const tbody = $("edges").tBodies[0];
  if (!job) {
    box.replaceChildren(el("p", { class: "empty", text: "no job selected" }));
    $("graph-title").textContent = "";
    replaceRows(tbody, [], "no transfers", 7);
    return;
  }
  $("graph-title").textContent = `${job.job_id} · ${job.image} · ${job.state}`;
  const edges = graphEdges(job, active);
  const { pos, columns, waitCol, inJob, slot, boxH, rowH } = layout(job, edges);
  const roles = new Map(nodes.map((n) => [n.node_id, n.roles]));
  const rows = Math.max(1, ...columns.map((c) => c.length));
  const width = 20 + columns.length * (BOX_W + COL_GAP) - COL_GAP;
  const height = TOP + rows * rowH;
  const g = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `transfer graph of ${job.job_id}` });
  // shrink a wide graph to the card (down to ~60%); wider than that, the card scrolls
  if (width <= 1.7 * Math.max(box.clientWidth, 600)) g.style.maxWidth = "100%";
  g.style.height = "auto";
  g.append(svgDefs());
  columns.forEach((_, c) => {
    const label = c === 0 ? "had the data" : c === waitCol ? "waiting" : `step ${c}`;
    g.append(svg("text", { class: "col", x: 10 + c * (BOX_W + COL_GAP), y: 14 }, label));
  });
  // each arrow lands in its own slot on the demander's left side, its label just above it;
  // arrows leave their seeder fanned out the same way
  const slotOf = (list, key) => {
    const groups = new Map();
    for (const e of list) {
      if (!groups.has(e[key])) groups.set(e[key], []);
      groups.get(e[key]).push(e);
    }
    return groups;
  };
  const seederY = (e) => (pos.get(e.seeder) || { y: 0 }).y;
  for (const [, list] of slotOf(edges, "demander")) {
    list.sort((a, b) => seederY(a) - seederY(b) || a.layer.localeCompare(b.layer));
    list.forEach((e, i) => (e.inY = boxH / 2 + (i - (list.length - 1) / 2) * slot + (slot === SLOT2 ? 6 : 3)));
  }
  const landY = (e) => (pos.get(e.demander) || { y: 0 }).y + e.inY;
  for (const [, list] of slotOf(edges, "seeder")) {
    list.sort((a, b) => landY(a) - landY(b)); // arrows leaving one seeder do not cross
    list.forEach((e, i) => (e.outY = boxH / 2 + (i - (list.length - 1) / 2) * Math.min(8, boxH / (list.length + 1))));
  }
  for (const e of edges) {
    const a = pos.get(e.seeder);
    const b = pos.get(e.demander);
    if (!a || !b) continue;
    const x1 = a.x + BOX_W, y1 = a.y + e.outY;
    const x2 = b.x - 2, y2 = b.y + e.inY;
    const edge = svg("g", {
      class: "edge" + (e.active ? " active" : ""),
      "data-seeder": e.seeder, "data-demander": e.demander, "data-layer": e.layer,
      "data-rule": e.reason ? e.reason.rule : "", "data-reason": reasonText(e.reason),
    });
    const h = BEND / 2;
    const d = `M${x1},${y1} C${x1 + h},${y1} ${x1 + h},${y2} ${x1 + BEND},${y2} L${x2},${y2}`;
    edge.append(svg("path", { d, "marker-end": "url(#arrow)" }));
    const progress = e.active && e.total ? ` · ${Math.floor((100 * e.bytes) / e.total)}%` : "";
    const what = `${shortDigest(e.layer)} · ${mbps(e.rate)}${progress}`;
    const lx = b.x - 10;
    if (slot === SLOT2) {
      edge.append(svg("text", { class: "what", x: lx, y: y2 - 13, "text-anchor": "end" }, what));
      edge.append(svg("text", { class: "why", x: lx, y: y2 - 3, "text-anchor": "end" }, reasonShort(e.reason)));
    } else {
      edge.append(svg("text", { class: "what", x: lx, y: y2 - 3, "text-anchor": "end" }, what));
    }
    edge.append(svg("title", {}, `${e.seeder} → ${e.demander}, layer ${e.layer}: ${size(e.bytes)} at ${mbps(e.rate)}\nwhy: ${reasonText(e.reason)}`));
    g.append(edge);
  }
  for (const [id, p] of pos) {
    const ns = inJob.get(id);
    const isOrigin = (roles.get(id) || []).includes("origin");
    const st = ns ? ns.state : isOrigin ? "origin" : "seeder";
    const b = svg("g", { class: `box ${st}${isOrigin ? " origin" : ""}`, "data-node": id, transform: `translate(${p.x},${p.y})` });
    b.append(svg("rect", { width: BOX_W, height: boxH, rx: 5 }));
    b.append(svg("text", { class: "id", x: 8, y: 18 }, id));
    let sub = st;
    if (ns && ns.state === "done" && ns.finished_at) sub = `done in ${(ns.finished_at - ns.started_at).toFixed(1)} s`;
    else if (ns && ns.bytes_total) sub = `${st} · ${Math.floor((100 * ns.bytes_done) / ns.bytes_total)}%`;
    b.append(svg("text", { class: "st", x: 8, y: 35 }, sub));
    g.append(b);
  }
  box.replaceChildren(g);
  const trs = edges.map((e) =>
    el(
      "tr",
      { "data-seeder": e.seeder, "data-demander": e.demander },
      td(e.seeder, "mono"),
      td(e.demander, "mono"),
      td(shortDigest(e.layer), "mono"),
      td(e.active && e.total ? `${size(e.bytes)} / ${size(e.total)}` : size(e.bytes), "num"),
      td(mbps(e.rate), "num"),
      el("td", {}, badge(e.active ? "moving" : "done", e.active ? "transferring" : "done")),
      td(reasonText(e.reason), "why"),
    ),
  );
  replaceRows(tbody, trs, "no transfers yet", 7);
}

function svgDefs() {
  const defs = svg("defs");
  const m = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" });
  m.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#64748b" }));
  defs.append(m);
  return defs;
}

// ---------------------------------------------------------------- events, images
// one page: the newest events (GET /v1/security-events is paginated); total counts all
function renderEvents(events, total) {
  const rows = events
    .slice()
    .reverse()
    .map((ev) =>
      el(
        "tr",
        {},
        td(`${clock(ev.at)} (${ago(ev.at)})`),
        el("td", {}, badge(ev.kind, "failed")),
        td(ev.reporter, "mono"),
        td(ev.peer, "mono"),
        td(ev.detail),
      ),
    );
  replaceRows($("events").tBodies[0], rows, "no security events: no refused host keys, bad chunks or quarantines", 5);
  $("events-summary").textContent = !events.length
    ? ""
    : total > events.length
      ? `newest ${events.length} of ${total} recorded`
      : `${events.length} recorded`;
}

function renderImages(images) {
  const rows = images.map((im) => {
    const row = el(
      "tr",
      {},
      td(im.ref, "mono"),
      el("td", {}, badge(im.state, im.state === "ready" ? "done" : im.state === "failed" ? "failed" : "running")),
      td(size(im.size), "num"),
      td(String(im.layers.length), "num"),
      td(im.origin, "mono"),
      td(String(im.nodes.length), "num"),
      td(im.source || "—"),
    );
    if (im.error) row.title = im.error;
    return row;
  });
  replaceRows($("images").tBodies[0], rows, "no images", 7);
}

// ---------------------------------------------------------------- start
document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", () => showLogin(""));
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) showConsole(saved);
  else showLogin("");
});
