// nodemesh service map: a live SVG graph of workloads and services (no build step, no library).
//
// Data: /api/graph (once), then /api/events (Server-Sent Events, the graph every second; polling
// if the stream fails). Layout: layered (Sugiyama-style) and deterministic: layers by longest
// path, services glued above the workload they select, long edges routed through dummy points,
// barycentric ordering, then balanced vertical placement. The layout only changes when the set of
// nodes or of edges ever seen (on this page) changes, so positions stay put as numbers update.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const NODE_W = 204;
const H = { workload: 54, service: 44, reserved: 48 };
const COL_GAP = 190;        // between columns: room for edge labels
const ITEM_GAP = 80;        // between stacked items in a column
const DUMMY_H = 18;
const BLOCK_GAP = 12;       // between a service and the workload below it
const PAD = 40;

const state = {
  graph: null,
  seenEdges: new Map(),     // id -> {from, to}: every edge seen since the page loaded
  layoutKey: "",
  layout: null,             // {pos: Map id -> {x, y, w, h}, routes: Map edgeId -> {pts, reversed}, box}
  shown: null,              // what is drawn now (animated towards state.layout)
  anim: null,
  selected: null,           // {type: "node", id} | {type: "edge", from, to}
  lastUpdate: 0,
  els: { nodes: new Map(), edges: new Map(), labels: new Map(), links: new Map() },
  flowTimer: null,
  zoom: { k: 1, x: 0, y: 0 },  // the user's zoom and pan, over the fitted view
  view: null,
};

const $ = (id) => document.getElementById(id);

function svg(tag, attrs = {}, parent = null) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function html(tag, attrs = {}, text = null) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== null) el.textContent = text;
  return el;
}

// ---- formatting ---------------------------------------------------------------------------
function fmtRate(r) {
  if (r >= 100) return r.toFixed(0);
  if (r >= 10) return r.toFixed(1);
  if (r >= 1) return r.toFixed(2);
  if (r === 0) return "0";
  return String(parseFloat(r.toPrecision(2)));
}
function fmtPct(x) {
  if (x === 0) return "0%";
  if (x >= 0.995) return "100%";
  if (x < 0.001) return "<0.1%";
  return (x * 100 < 10 ? (x * 100).toFixed(1) : (x * 100).toFixed(0)) + "%";
}
function fmtTime(iso) {
  const m = /T(\d\d:\d\d:\d\d)(\.\d{1,3})?/.exec(iso || "");
  if (!m) return iso || "";
  const d = new Date(iso.replace(/(\.\d{3})\d*Z$/, "$1Z"));
  if (isNaN(d)) return m[1] + (m[2] || "");
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}
function shortName(id) {
  if (!id) return "?";
  if (id.startsWith("service:")) return id.slice(8).split("/").pop() + " (svc)";
  return id.includes("/") ? id.split("/").pop() : id;
}
function clip(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

// ---- data ---------------------------------------------------------------------------------
function connect() {
  fetch("/api/graph").then((r) => r.json()).then((g) => { if (g.nodes) update(g); }).catch(() => {});
  if (!window.EventSource) { poll(); return; }
  const es = new EventSource("/api/events");
  es.addEventListener("graph", (ev) => {
    try { update(JSON.parse(ev.data)); } catch (e) { console.error(e); }
  });
  es.onopen = () => setLive("live");
  es.onerror = () => setLive("reconnecting");
}

function poll() {
  fetch("/api/graph").then((r) => r.json()).then((g) => { update(g); setLive("live"); })
    .catch(() => setLive("reconnecting"))
    .finally(() => setTimeout(poll, 1000));
}

function setLive(mode) {
  const el = $("live");
  el.className = "live " + mode;
  $("live-text").textContent = mode === "live" ? "live" : mode === "stale" ? "stale" : mode + "…";
}

setInterval(() => {
  if (state.lastUpdate && Date.now() - state.lastUpdate > 4000) setLive("stale");
}, 1000);

function update(g) {
  if (!g || !g.nodes) return;
  state.graph = g;
  state.lastUpdate = Date.now();
  setLive("live");
  const ids = new Set(g.nodes.map((n) => n.id));
  for (const e of g.edges) state.seenEdges.set(e.id, { id: e.id, from: e.from, to: e.to });
  for (const [id, e] of state.seenEdges) {
    if (!ids.has(e.from) || !ids.has(e.to)) state.seenEdges.delete(id);
  }
  renderHeader(g);
  const key = layoutKey(g);
  if (key !== state.layoutKey) {
    state.layoutKey = key;
    state.layout = computeLayout(g);
    animateTo(state.layout);
  }
  renderGraph(g);
  draw(state.shown || state.layout);
  if (state.selected) renderPanelStats();
}

function layoutKey(g) {
  const nodes = g.nodes.map((n) => n.id + ":" + n.kind).sort().join(",");
  const edges = [...state.seenEdges.keys()].sort().join(",");
  const links = g.links.map((l) => l.from + ">" + l.to).sort().join(",");
  return nodes + "|" + edges + "|" + links;
}

// ---- header -------------------------------------------------------------------------------
function renderHeader(g) {
  const nodes = g.cluster ? g.cluster.nodes : [];
  const up = nodes.filter((n) => n.connected).length;
  $("stat-cluster").textContent = g.cluster ? g.cluster.name : "–";
  $("stat-nodes").textContent = nodes.length + (up < nodes.length ? ` (${up} up)` : "");
  $("stat-workloads").textContent = g.nodes.filter((n) => n.kind === "workload" && !n.gone).length;
  $("stat-flows").textContent = fmtRate(g.flowsPerSecond);
  const drops = g.edges.reduce((s, e) => s + e.drops, 0);
  $("stat-drops").textContent = drops;
  $("stat-drops").classList.toggle("bad", drops > 0);
  $("stat-window").textContent = `${g.window} s`;
  $("legend-window").textContent = g.window;
  $("empty-window").textContent = g.window;
  const down = nodes.filter((n) => !n.connected);
  const agents = $("agents");
  agents.hidden = down.length === 0;
  agents.textContent = down.map((n) => `${n.name}: ${n.error || "agent not connected"}`).join(" · ");
  agents.title = agents.textContent;
}

// ---- layout -------------------------------------------------------------------------------
function sortKey(n) {
  const rank = n.kind === "reserved" ? 2 : 0;
  return `${rank}|${n.namespace || ""}|${n.name}|${n.kind === "service" ? 0 : 1}`;
}

function computeLayout(g) {
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  // Services glue onto the first workload they select (drawn just above it).
  const anchor = new Map();
  for (const n of g.nodes) {
    if (n.kind !== "service") continue;
    const sel = (n.selects || []).filter((id) => byId.has(id)).sort();
    if (sel.length) anchor.set(n.id, sel[0]);
  }
  const unit = (id) => anchor.get(id) || id;           // the layout unit a node belongs to
  const units = [...new Set(g.nodes.map((n) => unit(n.id)))]
    .sort((a, b) => sortKey(byId.get(a)).localeCompare(sortKey(byId.get(b))));
  const members = new Map(units.map((u) => [u, []]));
  for (const n of [...g.nodes].sort((a, b) => sortKey(a).localeCompare(sortKey(b)))) {
    members.get(unit(n.id)).push(n.id);
  }
  for (const [u, ms] of members) {        // services first, the workload last (bottom)
    ms.sort((a, b) => (a === u) - (b === u) || a.localeCompare(b));
  }

  // Edges between units (traffic seen on this page, and service -> other selected workloads).
  const edges = [];
  for (const e of state.seenEdges.values()) {
    const a = unit(e.from), b = unit(e.to);
    if (a !== b && members.has(a) && members.has(b)) edges.push({ id: e.id, a, b });
  }
  for (const l of g.links) {
    const a = unit(l.from), b = unit(l.to);
    if (a !== b && members.has(a) && members.has(b)) edges.push({ id: "link:" + l.from + ">" + l.to, a, b });
  }
  edges.sort((x, y) => x.id.localeCompare(y.id));

  // Layers: longest path over the edges between workloads and services (cycles broken by a DFS
  // in sorted order). Reserved entities (host, world) take no part: each goes one column after
  // the units that send to it (or before those it sends to), so they do not stretch the map.
  const isReserved = (u) => byId.get(u).kind === "reserved";
  const core = edges.filter((e) => !isReserved(e.a) && !isReserved(e.b));
  const out = new Map(units.map((u) => [u, []]));
  for (const e of core) out.get(e.a).push(e);
  const mark = new Map();
  const back = new Set();
  const visit = (u) => {
    mark.set(u, 1);
    for (const e of out.get(u)) {
      const m = mark.get(e.b);
      if (m === 1) back.add(e.id);
      else if (!m) visit(e.b);
    }
    mark.set(u, 2);
  };
  for (const u of units) if (!mark.get(u)) visit(u);
  const layer = new Map(units.map((u) => [u, 0]));
  const indeg = new Map(units.map((u) => [u, 0]));
  const succ = new Map(units.map((u) => [u, []]));
  for (const e of core) {
    const [s, t] = back.has(e.id) ? [e.b, e.a] : [e.a, e.b];
    indeg.set(t, indeg.get(t) + 1);
    succ.get(s).push(t);
  }
  const queue = units.filter((u) => indeg.get(u) === 0);
  while (queue.length) {
    const u = queue.shift();
    for (const t of succ.get(u)) {
      layer.set(t, Math.max(layer.get(t), layer.get(u) + 1));
      indeg.set(t, indeg.get(t) - 1);
      if (indeg.get(t) === 0) queue.push(t);
    }
  }
  for (const u of units) {
    if (!isReserved(u)) continue;
    const from = edges.filter((e) => e.b === u && !isReserved(e.a)).map((e) => layer.get(e.a));
    const to = edges.filter((e) => e.a === u && !isReserved(e.b)).map((e) => layer.get(e.b));
    layer.set(u, from.length ? Math.max(...from) + 1 : to.length ? Math.max(0, Math.min(...to) - 1) : 0);
  }
  // Units without any edge: spread over the columns (a grid when nothing talks yet).
  const linked = new Set(edges.flatMap((e) => [e.a, e.b]));
  const lonely = units.filter((u) => !linked.has(u));
  const cols = linked.size ? Math.max(...[...linked].map((u) => layer.get(u))) + 1
    : Math.min(lonely.length, Math.max(1, Math.ceil(Math.sqrt(lonely.length * 1.6))));
  lonely.forEach((u, i) => layer.set(u, i % cols));
  // Every edge, oriented left to right for routing (`rev`: drawn right to left).
  const dag = edges.map((e) => layer.get(e.a) <= layer.get(e.b)
    ? { ...e, s: e.a, t: e.b, rev: false } : { ...e, s: e.b, t: e.a, rev: true });

  // Items per layer: units, and dummy points for edges that span more than one layer.
  const nLayers = Math.max(0, ...layer.values()) + 1;
  const layers = Array.from({ length: nLayers }, () => []);
  const items = new Map();
  const unitHeight = (u) => members.get(u).reduce((s, id) => s + H[byId.get(id).kind], 0)
    + BLOCK_GAP * (members.get(u).length - 1);
  for (const u of units) {
    const it = { id: u, unit: true, h: unitHeight(u), layer: layer.get(u), nbrs: [] };
    items.set(u, it);
    layers[it.layer].push(it);
  }
  const chains = new Map();   // edge id -> [dummy items] in s -> t order
  for (const e of dag) {
    const ls = layer.get(e.s), lt = layer.get(e.t);
    let prev = items.get(e.s);
    const chain = [];
    for (let l = ls + 1; l < lt; l++) {
      const d = { id: `${e.id}#${l}`, unit: false, h: DUMMY_H, layer: l, nbrs: [] };
      items.set(d.id, d);
      layers[l].push(d);
      chain.push(d);
      prev.nbrs.push(d); d.nbrs.push(prev);
      prev = d;
    }
    const last = items.get(e.t);
    prev.nbrs.push(last); last.nbrs.push(prev);
    chains.set(e.id, chain);
  }

  // Order within layers: barycentres, a few sweeps down and up.
  const index = new Map();
  const reindex = () => layers.forEach((L) => L.forEach((it, i) => index.set(it.id, i)));
  reindex();
  for (let sweep = 0; sweep < 8; sweep++) {
    const down = sweep % 2 === 0;
    const order = down ? [...layers.keys()].slice(1) : [...layers.keys()].reverse().slice(1);
    for (const l of order) {
      const ref = down ? l - 1 : l + 1;
      const L = layers[l];
      const bc = new Map();
      for (const it of L) {
        const ns = it.nbrs.filter((n) => n.layer === ref);
        const rel = (index.get(it.id) + 0.5) / L.length * Math.max(1, layers[ref].length) - 0.5;
        bc.set(it.id, ns.length ? ns.reduce((s, n) => s + index.get(n.id), 0) / ns.length : rel);
      }
      L.sort((x, y) => bc.get(x.id) - bc.get(y.id) || index.get(x.id) - index.get(y.id));
      reindex();
    }
  }

  // Vertical placement: stacked, then relaxed towards neighbours (balanced, order kept).
  const y = new Map();
  for (const L of layers) {
    let top = 0;
    for (const it of L) { y.set(it.id, top + it.h / 2); top += it.h + ITEM_GAP; }
  }
  const gapBetween = (a, b) => (a.unit && b.unit ? ITEM_GAP : 12);
  const place = (L, want) => {
    const n = L.length;
    const fwd = new Array(n), bwd = new Array(n);
    for (let i = 0; i < n; i++) {
      fwd[i] = i === 0 ? want[0] : Math.max(want[i], fwd[i - 1] + L[i - 1].h / 2 + gapBetween(L[i - 1], L[i]) + L[i].h / 2);
    }
    for (let i = n - 1; i >= 0; i--) {
      bwd[i] = i === n - 1 ? want[i] : Math.min(want[i], bwd[i + 1] - L[i + 1].h / 2 - gapBetween(L[i], L[i + 1]) - L[i].h / 2);
    }
    L.forEach((it, i) => y.set(it.id, (fwd[i] + bwd[i]) / 2));
  };
  for (let iter = 0; iter < 24; iter++) {
    const seq = iter % 2 === 0 ? [...layers.keys()] : [...layers.keys()].reverse();
    for (const l of seq) {
      const L = layers[l];
      if (!L.length) continue;
      const want = L.map((it) => it.nbrs.length
        ? it.nbrs.reduce((s, n) => s + y.get(n.id), 0) / it.nbrs.length
        : y.get(it.id));
      place(L, want);
    }
  }

  // Coordinates: node centres; a unit's members stack from its top.
  const pos = new Map();
  for (const u of units) {
    const it = items.get(u);
    let top = y.get(u) - it.h / 2;
    const x = PAD + it.layer * (NODE_W + COL_GAP) + NODE_W / 2;
    for (const id of members.get(u)) {
      const h = H[byId.get(id).kind];
      pos.set(id, { x, y: top + h / 2, w: NODE_W, h });
      top += h + BLOCK_GAP;
    }
  }
  // Routes: a long edge crosses each column in between straight, at its dummy's height. Its
  // label goes into the gap (between two columns) that has the fewest labels so far.
  const routes = new Map();
  const perGap = new Map();
  for (const e of dag) {
    if (e.id.startsWith("link:")) continue;
    const pts = [];
    for (const d of chains.get(e.id)) {
      const cx = PAD + d.layer * (NODE_W + COL_GAP) + NODE_W / 2;
      pts.push({ x: cx - NODE_W / 2, y: y.get(d.id) }, { x: cx + NODE_W / 2, y: y.get(d.id) });
    }
    if (e.rev) pts.reverse();
    const ls = layer.get(e.s), lt = layer.get(e.t), n = lt - ls;
    let best = 0, bestScore = Infinity;
    for (let k = 0; k < n; k++) {
      const gap = e.rev ? lt - 1 - k : ls + k;
      const score = (perGap.get(gap) || 0) * 100 + Math.abs(k - (n - 1) / 2);
      if (score < bestScore) { best = k; bestScore = score; }
    }
    const gap = e.rev ? lt - 1 - best : ls + best;
    perGap.set(gap, (perGap.get(gap) || 0) + 1);
    routes.set(e.id, { pts, reversed: e.rev, labelSeg: best });
  }
  let minY = Infinity, maxY = -Infinity;
  for (const p of pos.values()) { minY = Math.min(minY, p.y - p.h / 2); maxY = Math.max(maxY, p.y + p.h / 2); }
  for (const r of routes.values()) for (const p of r.pts) { minY = Math.min(minY, p.y); maxY = Math.max(maxY, p.y); }
  if (!isFinite(minY)) { minY = 0; maxY = 0; }
  const width = PAD * 2 + nLayers * NODE_W + (nLayers - 1) * COL_GAP;
  return { pos, routes, box: { x: 0, y: minY - PAD, w: width, h: maxY - minY + PAD * 2 } };
}

// ---- animation ----------------------------------------------------------------------------
function lerp(a, b, t) { return a + (b - a) * t; }

function animateTo(target) {
  const from = state.shown;
  if (!from) { state.shown = target; fitView(target.box); return; }
  const start = performance.now();
  const dur = 450;
  if (state.anim) cancelAnimationFrame(state.anim);
  const step = (now) => {
    const t = Math.min(1, (now - start) / dur);
    const k = t < 0.5 ? 2 * t * t : 1 - Math.pow(-2 * t + 2, 2) / 2;
    const pos = new Map();
    for (const [id, p] of target.pos) {
      const q = from.pos.get(id) || p;
      pos.set(id, { ...p, x: lerp(q.x, p.x, k), y: lerp(q.y, p.y, k) });
    }
    const routes = new Map();
    for (const [id, r] of target.routes) {
      const o = from.routes.get(id);
      const pts = r.pts.map((p, i) => (o && o.pts[i] && o.reversed === r.reversed)
        ? { x: lerp(o.pts[i].x, p.x, k), y: lerp(o.pts[i].y, p.y, k) } : p);
      routes.set(id, { pts, reversed: r.reversed, labelSeg: r.labelSeg });
    }
    const box = {};
    for (const f of ["x", "y", "w", "h"]) box[f] = lerp(from.box[f], target.box[f], k);
    state.shown = { pos, routes, box };
    fitView(box);
    draw(state.shown);
    state.anim = t < 1 ? requestAnimationFrame(step) : null;
    if (t >= 1) state.shown = target;
  };
  state.anim = requestAnimationFrame(step);
}

function fitView(box) {
  const el = $("graph");
  const legend = 50;   // the legend row along the bottom
  const cw = el.clientWidth || 800, ch = Math.max(100, (el.clientHeight || 600) - legend);
  // Never magnify: a small graph is drawn at its natural size, centred.
  const w = Math.max(box.w, cw), h = Math.max(box.h, ch);
  const sx = w / cw, sy = h / ch;
  const s = Math.max(sx, sy);
  const vw = cw * s, vh = ch * s;
  const cx = box.x + box.w / 2, cy = box.y + box.h / 2;
  const z = state.zoom;
  const zw = vw / z.k, zh = (vh + legend * s) / z.k;
  el.setAttribute("viewBox", `${cx - zw / 2 + z.x} ${cy - vh / 2 - (zh - vh - legend * s) / 2 + z.y} ${zw} ${zh}`);
  state.view = { w: zw, cw: el.clientWidth || 800 };
}

// ---- rendering ----------------------------------------------------------------------------
function edgeClass(e) {
  if (!e) return "idle";
  if (e.drops > 0) return "drop";
  if (e.errorRate > 0) return "error";
  return "ok";
}

function renderGraph(g) {
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  const live = new Map(g.edges.map((e) => [e.id, e]));
  state.multiNs = new Set(g.nodes.filter((n) => n.namespace).map((n) => n.namespace)).size > 1;
  $("empty").hidden = g.edges.length > 0;

  // nodes
  const nodesG = $("nodes");
  for (const [id, el] of state.els.nodes) if (!byId.has(id)) { el.remove(); state.els.nodes.delete(id); }
  for (const n of g.nodes) {
    let el = state.els.nodes.get(n.id);
    if (!el) { el = createNode(n); nodesG.appendChild(el); state.els.nodes.set(n.id, el); }
    updateNode(el, n);
  }

  // edges (every edge seen on this page; those without flows in the window are idle)
  const edgesG = $("edges"), labelsG = $("edge-labels");
  for (const [id, el] of state.els.edges) {
    if (!state.seenEdges.has(id)) {
      el.remove(); state.els.edges.delete(id);
      state.els.labels.get(id).remove(); state.els.labels.delete(id);
    }
  }
  // A service edge that runs beside an edge from the same source to a workload the service
  // selects carries the same traffic: only the workload edge gets a label (both get tooltips).
  const beside = new Set();
  for (const e of g.edges) {
    if (e.kind !== "service") continue;
    const svcNode = byId.get(e.to);
    if (svcNode && (svcNode.selects || []).some((w) => live.has(`${e.from}->${w}`))) beside.add(e.id);
  }
  for (const s of [...state.seenEdges.values()].sort((a, b) => a.id.localeCompare(b.id))) {
    let el = state.els.edges.get(s.id);
    if (!el) {
      el = svg("g", { class: "edge-group" }, edgesG);
      svg("path", { class: "edge-hit" }, el);
      const p = svg("path", { class: "edge", "data-from": s.from, "data-to": s.to, "data-id": s.id }, el);
      svg("title", {}, p);
      el.addEventListener("click", (ev) => { ev.stopPropagation(); select({ type: "edge", from: s.from, to: s.to }); });
      state.els.edges.set(s.id, el);
      const lab = svg("g", { class: "edge-label", "data-from": s.from, "data-to": s.to }, labelsG);
      svg("rect", { class: "edge-label-bg", rx: 5 }, lab);
      lab.addEventListener("click", (ev) => { ev.stopPropagation(); select({ type: "edge", from: s.from, to: s.to }); });
      state.els.labels.set(s.id, lab);
    }
    const e = live.get(s.id);
    const cls = edgeClass(e);
    const path = el.querySelector("path.edge");
    const sel = state.selected;
    const focus = sel && ((sel.type === "node" && (s.from === sel.id || s.to === sel.id))
      || (sel.type === "edge" && sel.from === s.from && sel.to === s.to));
    path.setAttribute("class", `edge ${cls}${e && e.kind === "service" ? " to-service" : ""}${focus ? " focus" : ""}`);
    path.setAttribute("marker-end", `url(#arrow-${cls})`);
    path.style.strokeWidth = e ? (1.6 + Math.min(4, Math.log10(1 + e.rate * 20) * 1.6)).toFixed(2) : "1.2";
    path.querySelector("title").textContent = edgeTitle(s, e);
    updateLabel(state.els.labels.get(s.id), beside.has(s.id) ? null : e, cls);
  }

  // service -> workload links
  const linksG = $("links");
  const wanted = new Set(g.links.map((l) => l.from + ">" + l.to));
  for (const [id, el] of state.els.links) if (!wanted.has(id)) { el.remove(); state.els.links.delete(id); }
  for (const l of g.links) {
    const id = l.from + ">" + l.to;
    if (!state.els.links.has(id)) {
      state.els.links.set(id, svg("path", { class: "link", "data-from": l.from, "data-to": l.to }, linksG));
    }
  }
}

function edgeTitle(s, e) {
  const head = `${s.from} → ${s.to}`;
  if (!e) return `${head}\nno flows in the window`;
  const lines = [head, `${fmtRate(e.rate)} ${e.unit} (${e.requests} in ${state.graph.window} s)`,
    `errors ${fmtPct(e.errorRate)} (${e.errors})`, `p99 ${e.p99}`];
  if (e.l7) lines.push(`HTTP: ${e.l7.requests} requests, ${e.l7.status4xx} 4xx, ${e.l7.status5xx} 5xx, ${e.l7.denied} denied`);
  lines.push(`connections ${e.connections} (${e.droppedConnections} dropped)`);
  if (e.drops) lines.push(`drops ${e.drops}: ` + Object.entries(e.dropReasons).map(([r, n]) => `${r} ×${n}`).join(", "));
  if (e.protocols.length) lines.push(e.protocols.join(", "));
  return lines.join("\n");
}

function updateLabel(lab, e, cls) {
  lab.setAttribute("class", `edge-label ${cls}`);
  for (const t of lab.querySelectorAll("text")) t.remove();
  if (!e) { lab.style.display = "none"; return; }
  lab.style.display = "";
  const lines = [{ text: `${fmtRate(e.rate)}/s · ${fmtPct(e.errorRate)} · p99 ${e.p99}`, cls: "l-rate" }];
  if (e.drops) lines.push({ text: `${e.drops} drop${e.drops === 1 ? "" : "s"} · ${e.dropReason}`, cls: "l-drop" });
  lines.forEach((l, i) => {
    const t = svg("text", { class: l.cls, y: i * 14, "text-anchor": "middle" }, lab);
    t.textContent = clip(l.text, 30);
  });
  lab.dataset.lines = lines.length;
  lab.dataset.rate = e.rate;
  // widths in steps of 16 px, so that labels do not hop about as their numbers change
  const px = Math.max(...lines.map((l) => Math.min(30, l.text.length) * 6.2)) + 12;
  lab.dataset.width = Math.ceil(px / 16) * 16;
}

function createNode(n) {
  const g = svg("g", { class: `node ${n.kind}`, "data-id": n.id, tabindex: 0, role: "button" });
  const h = H[n.kind];
  svg("rect", { class: "card", x: -NODE_W / 2, y: -h / 2, width: NODE_W, height: h, rx: n.kind === "service" ? h / 2 : 9, filter: "url(#shadow)" }, g);
  svg("rect", { class: "accent", x: -NODE_W / 2, y: -h / 2, width: 5, height: h, rx: 2 }, g);
  const icon = svg("g", { class: "icon", transform: `translate(${-NODE_W / 2 + (n.kind === "service" ? 24 : 25)},0)` }, g);
  drawIcon(icon, n);
  svg("text", { class: "title", x: -NODE_W / 2 + 46, y: -4 }, g);
  svg("text", { class: "detail", x: -NODE_W / 2 + 46, y: 12 }, g);
  svg("circle", { class: "status", cx: NODE_W / 2 - 12, cy: -h / 2 + 12, r: 4 }, g);
  svg("title", {}, g);
  g.addEventListener("click", (ev) => { ev.stopPropagation(); select({ type: "node", id: n.id }); });
  g.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select({ type: "node", id: n.id }); } });
  return g;
}

function drawIcon(g, n) {
  svg("circle", { class: "icon-bg", r: 15 }, g);
  if (n.kind === "service") {
    svg("path", { class: "glyph", d: "M-7,0 H7 M3,-4 L7,0 L3,4 M-7,-5 V5" }, g);
  } else if (n.kind === "reserved") {
    if (n.id === "world") {
      svg("circle", { class: "glyph", r: 7 }, g);
      svg("path", { class: "glyph", d: "M-7,0 H7 M0,-7 C-4,-3 -4,3 0,7 M0,-7 C4,-3 4,3 0,7" }, g);
    } else {
      svg("rect", { class: "glyph", x: -7, y: -7, width: 14, height: 6, rx: 1.5 }, g);
      svg("rect", { class: "glyph", x: -7, y: 1, width: 14, height: 6, rx: 1.5 }, g);
    }
  } else if (n.type === "Deployment") {
    svg("rect", { class: "glyph", x: -4, y: -8, width: 11, height: 11, rx: 2 }, g);
    svg("rect", { class: "glyph fill", x: -8, y: -4, width: 11, height: 11, rx: 2 }, g);
  } else {
    svg("path", { class: "glyph", d: "M0,-8 L7,-4 V4 L0,8 L-7,4 V-4 Z M-7,-4 L0,0 L7,-4 M0,0 V8" }, g);
  }
}

function fitText(el, text, max) {
  // Set `text`, shortened with an ellipsis until it is at most `max` pixels wide.
  el.textContent = text;
  if (!el.getComputedTextLength || el.getComputedTextLength() <= max) return;
  let lo = 1, hi = text.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    el.textContent = text.slice(0, mid) + "…";
    if (el.getComputedTextLength() <= max) lo = mid; else hi = mid - 1;
  }
  el.textContent = text.slice(0, lo) + "…";
}

function nodeDetail(n, withNs = false) {
  if (n.kind === "service") {
    const ports = (n.ports || []).map((p) => p.replace("/TCP", "")).join(" ");
    return n.gone ? "service (deleted)" : `svc ${n.clusterIP || "headless"}${ports ? " · " + ports : ""}`;
  }
  if (n.kind === "reserved") {
    return { host: "node (host)", world: "outside the cluster", "remote-node": "another node",
      unknown: "unidentified endpoint" }[n.id] || "reserved identity";
  }
  if (n.gone) return "gone from the store";
  const kind = n.type === "Deployment" ? "deploy" : "pod";
  return `${kind} · ${n.ready}/${n.type === "Deployment" ? n.replicas : n.total} ready${withNs ? " · " + n.namespace : ""}`;
}

function updateNode(el, n) {
  const sel = state.selected;
  const selected = sel && sel.type === "node" && sel.id === n.id;
  const degraded = n.kind === "workload" && !n.gone && n.ready < (n.type === "Deployment" ? n.replicas : n.total);
  el.setAttribute("class", `node ${n.kind}${n.type === "Deployment" ? " deployment" : ""}${n.active ? " active" : " quiet"}${selected ? " selected" : ""}${degraded ? " degraded" : ""}${n.gone ? " gone" : ""}`);
  const room = NODE_W - 46 - 12;
  fitText(el.querySelector("text.title"), n.name, room - (degraded ? 10 : 0));
  fitText(el.querySelector("text.detail"), nodeDetail(n, state.multiNs), room);
  el.setAttribute("aria-label", `${n.kind} ${n.id}`);
  const rates = `in ${fmtRate(n.rateIn)}/s · out ${fmtRate(n.rateOut)}/s`;
  el.querySelector("title").textContent = `${n.id}\n${nodeDetail(n)}\n${rates}` +
    (n.pods && n.pods.length ? `\npods: ${n.pods.join(", ")}` : "") +
    (n.nodes && n.nodes.length ? `\nnodes: ${n.nodes.join(", ")}` : "");
}

function portSpread(count, h) {
  if (count <= 1) return [0];
  const span = Math.min(h - 16, (count - 1) * 9);
  return Array.from({ length: count }, (_, i) => -span / 2 + (span * i) / (count - 1));
}

function draw(L) {
  if (!L) return;
  for (const [id, el] of state.els.nodes) {
    const p = L.pos.get(id);
    if (p) el.setAttribute("transform", `translate(${p.x.toFixed(1)},${p.y.toFixed(1)})`);
  }
  // Endpoints: spread the edges that leave or enter one side of a node, ordered by where they go.
  const ends = new Map();   // "id|side" -> [{edgeId, end, otherY}]
  const geo = new Map();
  for (const s of state.seenEdges.values()) {
    const a = L.pos.get(s.from), b = L.pos.get(s.to);
    const r = L.routes.get(s.id);
    if (!a || !b) continue;
    const rightward = r ? !r.reversed : a.x < b.x;
    const sameCol = Math.abs(a.x - b.x) < 1;
    const pts = r ? r.pts : [];
    const nextA = pts.length ? pts[0] : b, nextB = pts.length ? pts[pts.length - 1] : a;
    const sideA = sameCol ? "R" : rightward ? "R" : "L";
    const sideB = sameCol ? "R" : rightward ? "L" : "R";
    geo.set(s.id, { a, b, pts, sideA, sideB });
    const push = (k, v) => { if (!ends.has(k)) ends.set(k, []); ends.get(k).push(v); };
    push(`${s.from}|${sideA}`, { id: s.id, end: "a", y: nextA.y });
    push(`${s.to}|${sideB}`, { id: s.id, end: "b", y: nextB.y });
  }
  const offset = new Map();
  for (const [k, list] of ends) {
    const p = L.pos.get(k.split("|")[0]);
    list.sort((x, y) => x.y - y.y || x.id.localeCompare(y.id));
    const offs = portSpread(list.length, p.h);
    list.forEach((v, i) => offset.set(`${v.id}|${v.end}`, offs[i]));
  }
  const labelBoxes = [];
  for (const [id, el] of state.els.edges) {
    const gm = geo.get(id);
    if (!gm) continue;
    const { a, b, pts, sideA, sideB } = gm;
    const start = { x: a.x + (sideA === "R" ? a.w / 2 : -a.w / 2), y: a.y + offset.get(`${id}|a`) };
    const end = { x: b.x + (sideB === "R" ? b.w / 2 : -b.w / 2), y: b.y + offset.get(`${id}|b`) };
    const seq = [start, ...pts, end];
    let d;
    if (sideA === sideB) {          // same column: a loop out to the right
      const bulge = 60;
      d = `M${start.x},${start.y} C${start.x + bulge},${start.y} ${end.x + bulge},${end.y} ${end.x + 4},${end.y}`;
    } else {
      d = `M${seq[0].x.toFixed(1)},${seq[0].y.toFixed(1)}`;
      for (let i = 1; i < seq.length; i++) {
        const p = seq[i - 1], q = seq[i];
        if (i % 2 === 0) { d += ` L${q.x.toFixed(1)},${q.y.toFixed(1)}`; continue; }  // through a column
        const dx = (q.x - p.x) / 2;
        d += ` C${(p.x + dx).toFixed(1)},${p.y.toFixed(1)} ${(q.x - dx).toFixed(1)},${q.y.toFixed(1)} ${q.x.toFixed(1)},${q.y.toFixed(1)}`;
      }
    }
    for (const p of el.querySelectorAll("path")) p.setAttribute("d", d);
    // The label sits in the middle of the edge's stretch across its chosen gap between columns.
    const r = L.routes.get(id);
    const seg = 2 * Math.min(r ? r.labelSeg : 0, Math.floor((seq.length - 1) / 2));
    const p = seq[seg], q = seq[seg + 1];
    const lab = state.els.labels.get(id);
    if (lab.style.display !== "none") {
      const lines = Number(lab.dataset.lines || 1);
      const prio = lab.classList.contains("drop") ? 1e9 : lab.classList.contains("error") ? 1e8 : Number(lab.dataset.rate || 0);
      labelBoxes.push({ id, lab, p, q, prio, h: lines * 14 + 6, w: Number(lab.dataset.width || 120) });
    }
  }
  const obstacles = [...L.pos.values()].map((p) => ({ x: p.x - p.w / 2, y: p.y - p.h / 2, w: p.w, h: p.h }));
  placeLabels(labelBoxes, obstacles);
  for (const [id, el] of state.els.links) {
    const [from, to] = id.split(">");
    const a = L.pos.get(from), b = L.pos.get(to);
    if (!a || !b) { el.setAttribute("d", ""); continue; }
    if (Math.abs(a.x - b.x) < 1 && b.y > a.y) {
      el.setAttribute("d", `M${a.x},${a.y + a.h / 2} L${b.x},${b.y - b.h / 2}`);
    } else {
      const sx = a.x + a.w / 2, ex = b.x - b.w / 2;
      el.setAttribute("d", `M${sx},${a.y} C${(sx + ex) / 2},${a.y} ${(sx + ex) / 2},${b.y} ${ex},${b.y}`);
    }
  }
}

function bezier(p, q, t) {
  // the gap segment: a cubic with horizontal tangents at both ends
  const dx = (q.x - p.x) / 2, u = 1 - t;
  const x = u * u * u * p.x + 3 * u * u * t * (p.x + dx) + 3 * u * t * t * (q.x - dx) + t * t * t * q.x;
  const y = u * u * u * p.y + 3 * u * u * t * p.y + 3 * u * t * t * q.y + t * t * t * q.y;
  return { x, y };
}

function placeLabels(boxes, obstacles) {
  // Each label sits on its own edge, inside the gap: the first spot along the curve (middle
  // first) where it overlaps nothing placed so far; drops are placed first, then by rate.
  const placed = obstacles.slice();
  const free = (r) => placed.every((o) => r.x + r.w + 3 <= o.x || o.x + o.w + 3 <= r.x || r.y + r.h + 2 <= o.y || o.y + o.h + 2 <= r.y);
  boxes.sort((a, b) => b.prio - a.prio || a.id.localeCompare(b.id));
  for (const b of boxes) {
    const lo = Math.min(b.p.x, b.q.x) + 4 + b.w / 2, hi = Math.max(b.p.x, b.q.x) - 4 - b.w / 2;
    let spot = null;
    for (const t of [0.5, 0.42, 0.58, 0.34, 0.66, 0.26, 0.74, 0.18, 0.82]) {
      const c = bezier(b.p, b.q, t);
      if (t !== 0.5 && (c.x < lo || c.x > hi)) continue;
      const r = { x: c.x - b.w / 2, y: c.y - b.h / 2, w: b.w, h: b.h };
      if (free(r)) { spot = r; break; }
    }
    if (!spot) {
      const c = bezier(b.p, b.q, 0.5);
      for (let i = 1; i <= 40 && !spot; i++) {
        const dy = (i % 2 ? 1 : -1) * Math.ceil(i / 2) * 6;
        const r = { x: c.x - b.w / 2, y: c.y - b.h / 2 + dy, w: b.w, h: b.h };
        if (free(r)) spot = r;
      }
      spot = spot || { x: c.x - b.w / 2, y: c.y - b.h / 2, w: b.w, h: b.h };
    }
    placed.push(spot);
    b.lab.setAttribute("transform", `translate(${(spot.x + b.w / 2).toFixed(1)},${(spot.y + 14).toFixed(1)})`);
    const r = b.lab.querySelector("rect");
    r.setAttribute("x", -b.w / 2); r.setAttribute("y", -14); r.setAttribute("width", b.w); r.setAttribute("height", b.h);
  }
}

// ---- selection and the side panel ------------------------------------------------------------
function select(sel) {
  state.selected = sel;
  $("panel").hidden = false;
  document.body.classList.add("with-panel");
  if (state.graph) { renderGraph(state.graph); }
  requestAnimationFrame(() => { if (state.layout) fitView((state.shown || state.layout).box); draw(state.shown || state.layout); });
  renderPanelStats();
  $("flow-list").replaceChildren(html("li", { class: "placeholder" }, "loading…"));
  loadFlows();
  clearInterval(state.flowTimer);
  state.flowTimer = setInterval(loadFlows, 2000);
}

function closePanel() {
  state.selected = null;
  clearInterval(state.flowTimer);
  $("panel").hidden = true;
  document.body.classList.remove("with-panel");
  if (state.graph) renderGraph(state.graph);
  requestAnimationFrame(() => { if (state.layout) fitView((state.shown || state.layout).box); draw(state.shown || state.layout); });
}

function renderPanelStats() {
  const sel = state.selected, g = state.graph;
  if (!sel || !g) return;
  const box = $("panel-stats");
  box.replaceChildren();
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  const dl = html("dl", { class: "kv" });
  const kv = (k, v, cls = "") => { dl.append(html("dt", {}, k), html("dd", cls ? { class: cls } : {}, v)); };
  let edges;
  if (sel.type === "node") {
    const n = byId.get(sel.id);
    $("panel-kind").textContent = n ? (n.kind === "workload" ? n.type : n.kind === "service" ? "Service" : "reserved") + (n && n.namespace ? ` · ${n.namespace}` : "") : "gone";
    $("panel-title").textContent = n ? n.name : sel.id;
    if (n && n.kind === "workload" && !n.gone) {
      kv("pods", `${n.ready}/${n.total} ready` + (n.type === "Deployment" ? ` (replicas ${n.replicas})` : ""));
      kv("nodes", n.nodes.join(", ") || "–");
    }
    if (n && n.kind === "service") {
      kv("cluster IP", n.clusterIP || "–");
      kv("ports", (n.ports || []).join(", ") || "–");
      kv("selects", (n.selects || []).map(shortName).join(", ") || "–");
    }
    if (n) kv("traffic", `in ${fmtRate(n.rateIn)}/s · out ${fmtRate(n.rateOut)}/s`);
    edges = g.edges.filter((e) => e.from === sel.id || e.to === sel.id);
  } else {
    $("panel-kind").textContent = "edge";
    $("panel-title").textContent = `${shortName(sel.from)} → ${shortName(sel.to)}`;
    edges = g.edges.filter((e) => e.from === sel.from && e.to === sel.to);
    const e = edges[0];
    if (e) {
      kv("rate", `${fmtRate(e.rate)} ${e.unit} (${e.requests} in ${g.window} s)`);
      kv("errors", `${fmtPct(e.errorRate)} (${e.errors})`, e.errors ? "bad" : "");
      kv("p99", e.p99);
      if (e.l7) kv("HTTP", `${e.l7.requests} requests: ${e.l7.status5xx} 5xx, ${e.l7.status4xx} 4xx, ${e.l7.denied} denied`);
      kv("drops", e.drops ? Object.entries(e.dropReasons).map(([r, c]) => `${r} ×${c}`).join(", ") : "0", e.drops ? "bad" : "");
      kv("protocols", e.protocols.join(", ") || "–");
    } else {
      kv("rate", "no flows in the window");
    }
    edges = [];
  }
  box.append(dl);
  if (edges.length) {
    const t = html("table", { class: "edges" });
    const head = html("tr");
    for (const c of ["", "peer", "rate", "err", "p99", "drops"]) head.append(html("th", {}, c));
    t.append(head);
    for (const e of edges.sort((a, b) => b.rate - a.rate)) {
      const out = e.from === sel.id;
      const tr = html("tr", { class: edgeClass(e) });
      tr.append(html("td", { class: "dir" }, out ? "→" : "←"), html("td", {}, shortName(out ? e.to : e.from)),
        html("td", {}, `${fmtRate(e.rate)}/s`), html("td", {}, fmtPct(e.errorRate)), html("td", {}, e.p99),
        html("td", { class: e.drops ? "bad" : "" }, String(e.drops)));
      tr.addEventListener("click", () => select({ type: "edge", from: e.from, to: e.to }));
      t.append(tr);
    }
    box.append(t);
  }
}

function loadFlows() {
  const sel = state.selected;
  if (!sel) return;
  const q = sel.type === "node" ? `workload=${encodeURIComponent(sel.id)}`
    : `from=${encodeURIComponent(sel.from)}&to=${encodeURIComponent(sel.to)}`;
  fetch(`/api/flows?${q}&limit=50`).then((r) => r.json()).then((data) => {
    if (state.selected !== sel) return;
    renderFlows(data.flows || []);
  }).catch(() => {});
}

function renderFlows(flows) {
  const list = $("flow-list");
  $("flow-count").textContent = flows.length ? `(${flows.length}, newest first)` : "";
  if (!flows.length) {
    list.replaceChildren(html("li", { class: "placeholder" }, `no flows in the last ${state.graph ? state.graph.window : 60} s`));
    return;
  }
  const items = flows.map((f) => {
    const li = html("li", { class: `flow ${f.verdict.toLowerCase()}` });
    const top = html("div", { class: "flow-top" });
    top.append(html("span", { class: "time" }, fmtTime(f.time)),
      html("span", { class: `verdict ${f.verdict.toLowerCase()}` }, f.verdict),
      html("span", { class: "type" }, f.kind === "l7" ? "L7" : f.kind === "sock" ? "socket LB" : "L3/L4"));
    const code = f.kind === "l7" && f.flow && f.flow.l7 && f.flow.l7.http ? f.flow.l7.http.code : 0;
    if (code) top.append(html("span", { class: `code c${String(code)[0]}xx` }, String(code)));
    top.append(
      html("span", { class: "node-name" }, f.node));
    const who = html("div", { class: "flow-who" });
    who.append(html("span", {}, shortName(f.from)), html("span", { class: "arrow" }, " → "), html("span", {}, shortName(f.to)));
    if (f.service) who.append(html("span", { class: "via" }, ` via svc ${f.service.slice(8)}`));
    li.append(top, who, html("div", { class: "flow-summary" }, f.summary));
    if (f.dropReason) li.append(html("div", { class: "flow-drop" }, `drop reason: ${f.dropReason}`));
    return li;
  });
  list.replaceChildren(...items);
}

// ---- zoom and pan (wheel, drag; double-click resets) ----------------------------------------
function refit() {
  const L = state.shown || state.layout;
  if (L) fitView(L.box);
}

function setupZoom() {
  const el = $("graph");
  el.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const z = state.zoom;
    z.k = Math.min(4, Math.max(0.25, z.k * Math.exp(-ev.deltaY * 0.0015)));
    refit();
  }, { passive: false });
  let drag = null;
  el.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0 || ev.target.closest(".node, .edge-group, .edge-label")) return;
    drag = { x: ev.clientX, y: ev.clientY, zx: state.zoom.x, zy: state.zoom.y, moved: false };
  });
  window.addEventListener("pointermove", (ev) => {
    if (!drag || !state.view) return;
    const per = state.view.w / state.view.cw;   // svg units per screen pixel
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    state.zoom.x = drag.zx - dx * per;
    state.zoom.y = drag.zy - dy * per;
    refit();
  });
  window.addEventListener("pointerup", () => {
    if (drag && drag.moved) state.suppressClick = true;
    drag = null;
  });
  el.addEventListener("dblclick", () => { state.zoom = { k: 1, x: 0, y: 0 }; refit(); });
}

// ---- start --------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("panel-close").addEventListener("click", closePanel);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && state.selected) closePanel(); });
  $("graph").addEventListener("click", () => {
    if (state.suppressClick) { state.suppressClick = false; return; }
    if (state.selected) closePanel();
  });
  setupZoom();
  new ResizeObserver(() => {
    const L = state.shown || state.layout;
    if (L) { fitView(L.box); draw(L); }
  }).observe($("map"));
  connect();
});
