// adag graph viewer: one graph of a run directory, drawn on a canvas.
//
// Reads (all from the adag server, nothing from outside it):
//   /api/run                      read_only flag
//   /run/viewer/<slug>.json       the circuit-tracer graph JSON (adag's export)
//   /api/clusters                 clusters with labels, descriptions, scores and top records
//   /api/unit?kind=&layer=&index= the same neuron / feature in the run's other graphs
// Writes: POST /api/graphs/<slug>/qparams (pins and supernodes as circuit-tracer's qParams; labels
// of neurons / features as its frontend stores them: qParams.clerps, a JSON string of
// [[feature, label], ...], so a label names the unit at every position and circuit-tracer's own
// frontend shows it too).
//
// Meanings are the export's (adag.graphs.export): a link's `weight` is the raw direct effect of
// the source on the target (circuit-tracer's adjacency entry), drawn blue when positive and
// orange when negative, opacity and then thickness by |weight|; a node's `influence` is its cumulative influence
// fraction on the unpruned graph (smaller = more influential), so the node slider shows the
// nodes with influence <= threshold, as circuit-tracer's pruning slider does, and node size
// grows as influence falls. Embeddings and target logits are always shown.
//
// Rows are layers (embeddings at the bottom, logits at the top), columns token positions.
// window.adagViewer exposes the state and a few functions for tests and the console.
"use strict";

(function () {
  const COLORS = {
    pos: [43, 108, 176],
    neg: [194, 65, 12],
    neuronPos: "#4c78a8",
    neuronNeg: "#9d6fb5",
    embed: "#9ca3af",
    error: "#cbd5e1",
    logit: "#f59e0b",
    selected: "#111827",
    pinned: "#111827",
    match: "#facc15",
  };
  const PALETTE = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf",
    "#17becf", "#bcbd22", "#7f7f7f", "#1b9e77", "#d95f02"];
  const MARGIN = { left: 56, right: 16, top: 22, bottom: 48 };
  const N_EDGE_BUCKETS = 12;
  const THICK_FROM = 0.4; // |weight| / max |weight| from which an edge is drawn thicker than 1 px

  const S = {
    slug: null, graph: null, meta: null, readOnly: true,
    nodes: [], byId: new Map(), links: [], maxAbs: 0,
    inLinks: new Map(), outLinks: new Map(),
    targets: [], clusters: new Map(),
    supernodes: [], memberOf: new Map(), collapsed: new Set(),
    pinned: new Set(), labels: new Map(), dirty: false,
    nodeThreshold: 1, edgeThreshold: 0, pinnedOnly: false,
    selected: null, hover: null, matches: [], matchAt: -1, query: "",
    view: { k: 1, x: 0, y: 0 },
    layout: null, drawn: { nodes: 0, edges: 0, supernodes: 0 },
    items: [], drawnEdges: [], renderMs: 0, base: null, unitCache: new Map(),
  };

  const $ = (id) => document.getElementById(id);
  const fmt = (x, d = 3) => (x === null || x === undefined || !Number.isFinite(x) ? "–" : Number(x).toPrecision(d));
  const showTok = (t) => String(t).replace(/\n/g, "⏎").replace(/\t/g, "→").replace(/\r/g, "↵");

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "style") e.style.cssText = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  // -- data ------------------------------------------------------------------------------------

  async function getJSON(url) {
    const res = await fetch(url);
    if (!res.ok) {
      let msg = `${url} answered ${res.status}`;
      try { msg += ": " + (await res.json()).error; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    return res.json();
  }

  function load(graph, clusters) {
    S.graph = graph;
    S.meta = graph.metadata || {};
    S.targets = S.meta.adag_targets || [];
    S.nodes = graph.nodes.map((n, row) => Object.assign({ row }, n));
    S.byId = new Map(S.nodes.map((n) => [n.node_id, n]));
    S.links = [];
    S.inLinks = new Map(S.nodes.map((n) => [n.node_id, []]));
    S.outLinks = new Map(S.nodes.map((n) => [n.node_id, []]));
    S.maxAbs = 0;
    for (const l of graph.links) {
      if (!S.byId.has(l.source) || !S.byId.has(l.target)) continue;
      const link = { source: l.source, target: l.target, weight: Number(l.weight) };
      S.links.push(link);
      S.outLinks.get(l.source).push(link);
      S.inLinks.get(l.target).push(link);
      S.maxAbs = Math.max(S.maxAbs, Math.abs(link.weight));
    }
    for (const list of [...S.inLinks.values(), ...S.outLinks.values()]) {
      list.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    }
    S.clusters = new Map((clusters || []).map((c) => [c.name, c]));
    // circuit-tracer's own server saves these as URL-parameter strings: read both forms
    const q = graph.qParams || {};
    const list = (v, split) => (Array.isArray(v) ? v : typeof v === "string" && v ? parseList(v, split) : []);
    S.pinned = new Set(list(q.pinnedIds, true).filter((id) => S.byId.has(id)));
    const units = new Set(S.nodes.filter(isUnit).map((n) => String(n.feature)));
    S.labels = new Map(list(q.clerps, false).filter((p) => Array.isArray(p) && units.has(String(p[0])))
      .map((p) => [String(p[0]), String(p[1])]));
    setSupernodes(list(q.supernodes, false).filter(Array.isArray));
    S.layout = layout();
  }

  function setSupernodes(groups) {
    S.supernodes = [];
    S.memberOf = new Map();
    groups.forEach((g, i) => {
      const members = g.slice(1).filter((id) => S.byId.has(id) && !S.memberOf.has(id));
      if (!members.length) return;
      const sn = { name: String(g[0]), members, color: PALETTE[i % PALETTE.length] };
      S.supernodes.push(sn);
      for (const id of members) S.memberOf.set(id, sn);
    });
    for (const name of [...S.collapsed]) {
      if (!S.supernodes.some((s) => s.name === name)) S.collapsed.delete(name);
    }
  }

  function kind(n) {
    if (n.adag_kind) return n.adag_kind;
    return n.feature_type === "cross layer transcoder" ? "feature"
      : n.feature_type === "mlp reconstruction error" ? "error"
        : n.feature_type === "embedding" ? "embed" : n.feature_type;
  }
  function isUnit(n) { const k = kind(n); return k === "neuron" || k === "feature"; }
  function parseList(text, split) {
    try { const v = JSON.parse(text); if (Array.isArray(v)) return v; } catch (e) { /* below */ }
    return split ? text.split(",").filter(Boolean) : [];
  }

  function nodeLabel(n) {
    if (isUnit(n) && S.labels.has(String(n.feature))) return S.labels.get(String(n.feature));
    const k = kind(n);
    const tok = JSON.stringify(showTok(n.token ?? ""));
    if (k === "logit") return `logit ${tok}`;
    if (k === "embed") return `emb ${tok}`;
    if (k === "error") return `L${n.adag_layer} error @${n.ctx_idx}`;
    if (k === "feature") return `L${n.adag_layer} F${n.adag_index} @${tok}`;
    if (n.clerp) return n.clerp;
    return `L${n.adag_layer} N${n.adag_index} @${tok}`;
  }

  function clusterOf(sn) { return sn ? S.clusters.get(sn.name) : undefined; }
  function superLabel(sn) {
    const c = clusterOf(sn);
    return c && c.label ? `${sn.name}: ${c.label}` : sn.name;
  }

  // -- layout: rows by layer, columns by position ---------------------------------------------

  function layout() {
    const tokens = S.meta.prompt_tokens || [];
    let T = tokens.length;
    for (const n of S.nodes) T = Math.max(T, (n.ctx_idx | 0) + 1);
    const layers = [...new Set(S.nodes.map((n) => n.adag_layer ?? 0))].sort((a, b) => a - b);
    const rowOf = new Map(layers.map((l, i) => [l, i]));
    const cells = new Map();
    for (const n of S.nodes) {
      const key = `${n.adag_layer}|${n.ctx_idx}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const perPos = new Array(T).fill(1);
    for (const [key, list] of cells) {
      const p = Number(key.split("|")[1]);
      perPos[p] = Math.max(perPos[p], list.length);
    }
    const weight = perPos.map((c) => 1 + Math.sqrt(Math.min(c, 400)));
    const total = weight.reduce((a, b) => a + b, 0);
    const colStart = [];
    let acc = 0;
    for (const w of weight) { colStart.push(acc / total); acc += w; }
    const colWidth = weight.map((w) => w / total);
    // unit coordinates in [0, 1] x [0, 1], y = 0 at the top (logits)
    const pos = new Map();
    const nRows = layers.length;
    for (const list of cells.values()) {
      list.sort((a, b) => (a.influence ?? -1) - (b.influence ?? -1) || a.row - b.row);
      const p = list[0].ctx_idx;
      const r = rowOf.get(list[0].adag_layer);
      const many = list.length > 12;
      list.forEach((n, i) => {
        const x = colStart[p] + colWidth[p] * (i + 1) / (list.length + 1);
        const jitter = many ? ((i % 3) - 1) * 0.22 : 0;
        const y = 1 - (r + 0.5 + jitter) / nRows;
        pos.set(n.node_id, { x, y });
      });
    }
    return { T, tokens, layers, rowOf, nRows, colStart, colWidth, pos };
  }

  // -- what is shown --------------------------------------------------------------------------

  function nodeVisible(n) {
    if (S.pinnedOnly) return S.pinned.has(n.node_id);
    const k = kind(n);
    if (k === "logit" || k === "embed") return true;
    if (S.pinned.has(n.node_id)) return true;
    return n.influence === null || n.influence === undefined || n.influence <= S.nodeThreshold + 1e-12;
  }

  function radius(n) {
    if (kind(n) === "logit") return 4 + 8 * Math.sqrt(Math.max(0, n.token_prob || 0));
    const infl = n.influence;
    const r = infl === null || infl === undefined ? 4 : 3 + 6 * (1 - Math.min(1, Math.max(0, infl)));
    return r;
  }

  // Builds S.items (what is drawn and clickable) and S.drawnEdges. A collapsed supernode replaces
  // its visible members; the edges touching them are summed per (source item, target item).
  function compute() {
    const vp = viewport();
    const item = new Map(); // node_id -> item key
    const items = [];
    const superItems = new Map();
    for (const n of S.nodes) {
      if (!nodeVisible(n)) continue;
      const sn = S.memberOf.get(n.node_id);
      if (sn && S.collapsed.has(sn.name)) {
        let it = superItems.get(sn.name);
        if (!it) {
          it = { type: "super", id: sn.name, sn, members: [], x: 0, y: 0, r: 0 };
          superItems.set(sn.name, it);
          items.push(it);
        }
        it.members.push(n);
        item.set(n.node_id, it);
      } else {
        const p = S.layout.pos.get(n.node_id);
        const it = { type: "node", id: n.node_id, node: n, ux: p.x, uy: p.y, r: radius(n) };
        items.push(it);
        item.set(n.node_id, it);
      }
    }
    for (const it of superItems.values()) {
      let x = 0, y = 0;
      for (const m of it.members) { const p = S.layout.pos.get(m.node_id); x += p.x; y += p.y; }
      it.ux = x / it.members.length;
      it.uy = y / it.members.length;
      it.r = 8 + Math.min(10, 2 * Math.sqrt(it.members.length));
    }
    for (const it of items) { it.x = vp.x0 + it.ux * vp.w; it.y = vp.y0 + it.uy * vp.h; }
    const cut = S.edgeThreshold * S.maxAbs;
    const agg = new Map();
    const edges = [];
    for (const l of S.links) {
      const a = item.get(l.source), b = item.get(l.target);
      if (!a || !b || a === b) continue;
      if (a.type === "node" && b.type === "node") {
        if (Math.abs(l.weight) >= cut && l.weight !== 0) edges.push({ a, b, w: l.weight });
      } else {
        const key = a.id + "\u0000" + b.id;
        const e = agg.get(key);
        if (e) e.w += l.weight; else agg.set(key, { a, b, w: l.weight });
      }
    }
    for (const e of agg.values()) if (Math.abs(e.w) >= cut && e.w !== 0) edges.push(e);
    S.items = items;
    S.drawnEdges = edges;
    S.drawn = {
      nodes: items.filter((i) => i.type === "node").length,
      edges: edges.length,
      supernodes: superItems.size,
    };
    const c = $("graph");
    c.dataset.nodes = S.drawn.nodes;
    c.dataset.edges = S.drawn.edges;
    c.dataset.supernodes = S.drawn.supernodes;
    $("counts").textContent =
      `${S.drawn.nodes} nodes · ${S.drawn.supernodes} supernodes · ${S.drawn.edges} edges drawn ` +
      `(of ${S.nodes.length} / ${S.links.length})`;
  }

  // -- drawing ---------------------------------------------------------------------------------

  function viewport() {
    const c = $("graph");
    const w = c.clientWidth, h = c.clientHeight;
    return {
      x0: MARGIN.left, y0: MARGIN.top,
      w: Math.max(10, w - MARGIN.left - MARGIN.right), h: Math.max(10, h - MARGIN.top - MARGIN.bottom),
      cw: w, ch: h,
    };
  }

  function resize() {
    const c = $("graph");
    const dpr = window.devicePixelRatio || 1;
    c.width = Math.max(1, Math.round(c.clientWidth * dpr));
    c.height = Math.max(1, Math.round(c.clientHeight * dpr));
    refresh();
  }

  function refresh() {
    if (!S.graph) return;
    const t0 = performance.now();
    compute();
    const t1 = performance.now();
    S.base = null;
    draw();
    const t2 = performance.now();
    S.computeMs = t1 - t0;
    S.drawMs = t2 - t1;
    S.renderMs = t2 - t0;
  }

  function focusIds() {
    // ids of the selection (a node, or a supernode's members) whose edges are emphasised
    if (!S.selected) return null;
    if (S.selected.type === "node") return new Set([S.selected.id]);
    const sn = S.supernodes.find((s) => s.name === S.selected.id);
    return sn ? new Set([sn.name, ...sn.members]) : null;
  }

  function drawBase(ctx, vp) {
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, vp.cw, vp.ch);
    const L = S.layout;
    // axes: layer rows and token columns (not zoomed: labels stay readable)
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const { k, x: tx, y: ty } = S.view;
    const X = (ux) => tx + k * (vp.x0 + ux * vp.w);
    const Y = (uy) => ty + k * (vp.y0 + uy * vp.h);
    L.layers.forEach((layer, r) => {
      const y = Y(1 - (r + 0.5) / L.nRows);
      const kinds = new Set(S.nodes.filter((n) => n.adag_layer === layer).map(kind));
      const name = kinds.has("logit") ? "logits" : kinds.has("embed") && kinds.size === 1 ? "emb" : `L${layer}`;
      ctx.fillText(name, MARGIN.left - 8, y);
      ctx.strokeStyle = "#eef1f4";
      ctx.beginPath(); ctx.moveTo(X(0), y); ctx.lineTo(X(1), y); ctx.stroke();
    });
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let p = 0; p < L.T; p++) {
      const cx = X(L.colStart[p] + L.colWidth[p] / 2);
      ctx.strokeStyle = "#f1f3f5";
      ctx.beginPath(); ctx.moveTo(X(L.colStart[p]), Y(0)); ctx.lineTo(X(L.colStart[p]), Y(1)); ctx.stroke();
      ctx.fillStyle = "#374151";
      const tok = showTok(L.tokens[p] ?? "");
      ctx.fillText(tok.length > 14 ? tok.slice(0, 13) + "…" : tok, cx, vp.ch - MARGIN.bottom + 8);
    }
    ctx.save();
    ctx.translate(tx, ty);
    ctx.scale(k, k);
    // edges. Edges weaker than THICK_FROM of the strongest are hairlines (1 px: the canvas's
    // fast path, ~3 µs each in software rendering) bucketed by sign and opacity into a few
    // strokes; the stronger ones are stroked one by one, thicker, strongest on top (a thick
    // line costs ~17 µs, and a single path of many thick segments far more)
    const focus = focusIds();
    const buckets = [];
    for (let i = 0; i < 2 * N_EDGE_BUCKETS; i++) buckets.push([]);
    const hi = [], thick = [];
    for (const e of S.drawnEdges) {
      const rel = S.maxAbs > 0 ? Math.min(1, Math.abs(e.w) / S.maxAbs) : 0;
      if (focus && (focus.has(e.a.id) || focus.has(e.b.id))) { hi.push([e, rel]); continue; }
      if (rel >= THICK_FROM) { thick.push([e, rel]); continue; }
      const b = Math.min(N_EDGE_BUCKETS - 1, Math.floor((rel / THICK_FROM) * N_EDGE_BUCKETS));
      buckets[(e.w >= 0 ? 0 : N_EDGE_BUCKETS) + b].push(e);
    }
    ctx.lineWidth = 1 / k;
    buckets.forEach((list, i) => {
      if (!list.length) return;
      const s = ((i % N_EDGE_BUCKETS) + 1) / N_EDGE_BUCKETS;
      const [r, g, bl] = i < N_EDGE_BUCKETS ? COLORS.pos : COLORS.neg;
      const alpha = focus ? 0.04 + 0.12 * s : 0.08 + 0.45 * s;
      ctx.strokeStyle = `rgba(${r},${g},${bl},${alpha.toFixed(3)})`;
      ctx.beginPath();
      for (const e of list) { ctx.moveTo(e.a.x, e.a.y); ctx.lineTo(e.b.x, e.b.y); }
      ctx.stroke();
    });
    thick.sort((x, y) => x[1] - y[1]);
    for (const [e, rel] of thick) {
      const [r, g, bl] = e.w >= 0 ? COLORS.pos : COLORS.neg;
      ctx.strokeStyle = `rgba(${r},${g},${bl},${focus ? 0.2 : 0.7})`;
      ctx.lineWidth = (1 + 3.5 * (rel - THICK_FROM) / (1 - THICK_FROM)) / k;
      ctx.beginPath(); ctx.moveTo(e.a.x, e.a.y); ctx.lineTo(e.b.x, e.b.y); ctx.stroke();
    }
    for (const [e, rel] of hi) {
      const [r, g, bl] = e.w >= 0 ? COLORS.pos : COLORS.neg;
      ctx.strokeStyle = `rgba(${r},${g},${bl},0.95)`;
      ctx.lineWidth = (0.8 + 4 * Math.sqrt(rel)) / k;
      ctx.beginPath(); ctx.moveTo(e.a.x, e.a.y); ctx.lineTo(e.b.x, e.b.y); ctx.stroke();
    }
    // nodes
    const matches = new Set(S.matches.map((m) => m.id));
    for (const it of S.items) {
      const r = it.r / Math.sqrt(k);
      if (matches.has(it.id)) {
        ctx.fillStyle = COLORS.match;
        ctx.beginPath(); ctx.arc(it.x, it.y, r + 4 / k, 0, 2 * Math.PI); ctx.fill();
      }
      if (it.type === "super") {
        ctx.fillStyle = it.sn.color;
        ctx.globalAlpha = 0.85;
        roundRect(ctx, it.x - r * 1.4, it.y - r, r * 2.8, r * 2, r * 0.5);
        ctx.fill();
        ctx.globalAlpha = 1;
        ctx.fillStyle = "#111827";
        ctx.font = `${11 / k}px system-ui, sans-serif`;
        ctx.textAlign = "center";
        ctx.textBaseline = "bottom";
        const lab = superLabel(it.sn);
        ctx.fillText(`${lab.length > 24 ? lab.slice(0, 23) + "…" : lab} (${it.members.length})`, it.x, it.y - r - 2 / k);
      } else {
        const n = it.node, kd = kind(n);
        ctx.fillStyle = kd === "logit" ? COLORS.logit : kd === "embed" ? COLORS.embed : kd === "error"
          ? COLORS.error : (n.adag_activation ?? n.activation ?? 0) >= 0 ? COLORS.neuronPos : COLORS.neuronNeg;
        ctx.beginPath();
        if (kd === "embed" || kd === "error") ctx.rect(it.x - r, it.y - r, 2 * r, 2 * r);
        else if (kd === "logit") { ctx.moveTo(it.x, it.y - r); ctx.lineTo(it.x + r, it.y); ctx.lineTo(it.x, it.y + r); ctx.lineTo(it.x - r, it.y); ctx.closePath(); }
        else ctx.arc(it.x, it.y, r, 0, 2 * Math.PI);
        ctx.fill();
        const sn = S.memberOf.get(n.node_id);
        if (sn) { ctx.strokeStyle = sn.color; ctx.lineWidth = 2.2 / k; ctx.stroke(); }
        if (S.pinned.has(n.node_id)) {
          ctx.strokeStyle = COLORS.pinned; ctx.lineWidth = 1.5 / k;
          ctx.setLineDash([3 / k, 2 / k]);
          ctx.beginPath(); ctx.arc(it.x, it.y, r + 3 / k, 0, 2 * Math.PI); ctx.stroke();
          ctx.setLineDash([]);
        }
        if (kd === "logit") {
          ctx.fillStyle = "#111827";
          ctx.font = `${10 / k}px system-ui, sans-serif`;
          ctx.textAlign = "center";
          ctx.textBaseline = "bottom";
          ctx.fillText(`${showTok(n.token ?? "")} ${(100 * (n.token_prob || 0)).toFixed(0)}%`, it.x, it.y - r - 2 / k);
        }
      }
      if (S.selected && S.selected.type === it.type && S.selected.id === it.id) {
        ctx.strokeStyle = COLORS.selected; ctx.lineWidth = 3 / k;
        ctx.beginPath(); ctx.arc(it.x, it.y, r + 6 / k, 0, 2 * Math.PI); ctx.stroke();
      }
    }
    ctx.restore();
  }

  function roundRect(ctx, x, y, w, h, r) {
    ctx.beginPath();
    ctx.moveTo(x + r, y);
    ctx.arcTo(x + w, y, x + w, y + h, r);
    ctx.arcTo(x + w, y + h, x, y + h, r);
    ctx.arcTo(x, y + h, x, y, r);
    ctx.arcTo(x, y, x + w, y, r);
    ctx.closePath();
  }

  function draw() {
    const c = $("graph");
    const vp = viewport();
    if (!S.base || S.base.width !== c.width || S.base.height !== c.height) {
      const off = document.createElement("canvas");
      off.width = c.width; off.height = c.height;
      drawBase(off.getContext("2d"), vp);
      S.base = off;
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, c.width, c.height);
    ctx.drawImage(S.base, 0, 0);
    if (S.hover) {
      const dpr = window.devicePixelRatio || 1;
      const { k, x, y } = S.view;
      ctx.setTransform(dpr * k, 0, 0, dpr * k, dpr * x, dpr * y);
      ctx.strokeStyle = "#111827";
      ctx.lineWidth = 1.5 / k;
      ctx.beginPath();
      ctx.arc(S.hover.x, S.hover.y, S.hover.r / Math.sqrt(k) + 2.5 / k, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }

  // -- interaction -----------------------------------------------------------------------------

  function toWorld(px, py) { return { x: (px - S.view.x) / S.view.k, y: (py - S.view.y) / S.view.k }; }
  function toScreen(it) { return { x: S.view.x + S.view.k * it.x, y: S.view.y + S.view.k * it.y }; }

  function hit(px, py) {
    const w = toWorld(px, py);
    let best = null, bestD = Infinity;
    for (const it of S.items) {
      const r = it.r / Math.sqrt(S.view.k) * (it.type === "super" ? 1.4 : 1) + 4 / S.view.k;
      const d = Math.hypot(it.x - w.x, it.y - w.y);
      if (d <= r && d < bestD) { best = it; bestD = d; }
    }
    return best;
  }

  function itemFor(sel) {
    if (!sel) return null;
    return S.items.find((i) => i.type === sel.type && i.id === sel.id) || null;
  }

  function select(sel, { focusCanvas = false } = {}) {
    // a node inside a collapsed supernode selects the supernode
    if (sel && sel.type === "node") {
      const sn = S.memberOf.get(sel.id);
      if (sn && S.collapsed.has(sn.name)) sel = { type: "super", id: sn.name };
    }
    S.selected = sel;
    S.base = null;
    draw();
    renderDetail();
    if (focusCanvas) $("graph").focus();
  }

  function selectNode(id) { if (S.byId.has(id)) select({ type: "node", id }); }

  function setHover(it, px, py) {
    const changed = S.hover !== it;
    S.hover = it;
    const tip = $("tooltip");
    if (!it) { tip.style.display = "none"; if (changed) draw(); return; }
    tip.replaceChildren();
    if (it.type === "super") {
      const c = clusterOf(it.sn);
      tip.append(el("b", {}, superLabel(it.sn)), el("br"), `${it.members.length} nodes here`);
      if (c && c.size) tip.append(`, ${c.size} units in the run`);
    } else {
      const n = it.node;
      tip.append(el("b", {}, nodeLabel(n)), el("br"),
        `act ${fmt(n.adag_activation ?? n.activation)} · attr ${fmt(n.attribution)} · infl ${fmt(n.influence)}`);
    }
    tip.style.display = "block";
    const wrap = $("wrap").getBoundingClientRect();
    tip.style.left = `${Math.min(px + 12, wrap.width - 330)}px`;
    tip.style.top = `${py + 12}px`;
    if (changed) draw();
  }

  function toggleCollapse(name) {
    if (S.collapsed.has(name)) S.collapsed.delete(name); else S.collapsed.add(name);
    $("collapse").checked = S.supernodes.length > 0 && S.supernodes.every((s) => S.collapsed.has(s.name));
    if (S.selected && S.selected.type === "node") {
      const sn = S.memberOf.get(S.selected.id);
      if (sn && S.collapsed.has(sn.name)) S.selected = { type: "super", id: sn.name };
    }
    refresh();
    renderDetail();
  }

  function togglePin(id) {
    if (S.pinned.has(id)) S.pinned.delete(id); else S.pinned.add(id);
    markDirty();
    refresh();
    renderDetail();
  }

  function markDirty() { S.dirty = true; $("status").textContent = S.readOnly ? "read-only: edits are not saved" : "unsaved edits"; }

  function search(q) {
    S.query = q.trim().toLowerCase();
    S.matches = [];
    S.matchAt = -1;
    if (S.query) {
      for (const it of S.items) {
        const hay = it.type === "super"
          ? [it.sn.name, superLabel(it.sn)]
          : [it.node.node_id, it.node.adag_id, it.node.token, nodeLabel(it.node), it.node.clerp,
            (S.memberOf.get(it.node.node_id) || {}).name,
            superLabel(S.memberOf.get(it.node.node_id) || { name: "" })];
        if (hay.some((h) => h && String(h).toLowerCase().includes(S.query))) S.matches.push(it);
      }
    }
    $("matches").textContent = S.query ? `${S.matches.length} match${S.matches.length === 1 ? "" : "es"}` : "";
    S.base = null;
    draw();
  }

  function nextMatch(step = 1) {
    if (!S.matches.length) return;
    S.matchAt = (S.matchAt + step + S.matches.length) % S.matches.length;
    const it = S.matches[S.matchAt];
    select({ type: it.type, id: it.id });
  }

  function neighbour(dir) {
    const cur = itemFor(S.selected);
    if (!cur) {
      // start from the top target logit
      const top = S.items.filter((i) => i.type === "node" && kind(i.node) === "logit")
        .sort((a, b) => (b.node.token_prob || 0) - (a.node.token_prob || 0))[0];
      if (top) select({ type: "node", id: top.id });
      return;
    }
    let next = null;
    if (dir === "up" || dir === "down") {
      const list = S.drawnEdges.filter((e) => (dir === "up" ? e.a === cur : e.b === cur))
        .sort((x, y) => Math.abs(y.w) - Math.abs(x.w));
      if (list.length) next = dir === "up" ? list[0].b : list[0].a;
    } else {
      const row = S.items.filter((i) => Math.abs(i.y - cur.y) < 1e-6 && i !== cur)
        .filter((i) => (dir === "right" ? i.x > cur.x : i.x < cur.x))
        .sort((a, b) => (dir === "right" ? a.x - b.x : b.x - a.x));
      next = row[0] || null;
      if (!next) {
        const any = S.items.filter((i) => i !== cur && (dir === "right" ? i.x > cur.x : i.x < cur.x))
          .sort((a, b) => Math.hypot(a.x - cur.x, a.y - cur.y) - Math.hypot(b.x - cur.x, b.y - cur.y));
        next = any[0] || null;
      }
    }
    if (next) select({ type: next.type, id: next.id });
  }

  async function save() {
    if (S.readOnly) { $("status").textContent = "read-only server: nothing saved"; return; }
    const body = {
      pinnedIds: [...S.pinned],
      supernodes: S.supernodes.map((s) => [s.name, ...s.members]),
      clerps: JSON.stringify([...S.labels.entries()]),
      clickedId: S.selected && S.selected.type === "node" ? S.selected.id : "",
      linkType: "both",
    };
    $("status").textContent = "saving…";
    try {
      const res = await fetch(`/api/graphs/${encodeURIComponent(S.slug)}/qparams`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const data = await res.json();
      if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
      S.dirty = false;
      $("status").textContent = "saved";
    } catch (e) {
      $("status").textContent = `not saved: ${e.message}`;
    }
  }

  // -- detail panel ----------------------------------------------------------------------------

  function shade(v, scale) {
    if (!scale || !Number.isFinite(v) || v === 0) return "transparent";
    const a = Math.min(1, Math.abs(v) / scale) * 0.85;
    const [r, g, b] = v > 0 ? COLORS.pos : COLORS.neg;
    return `rgba(${r},${g},${b},${a.toFixed(3)})`;
  }

  function tokensShaded(tokens, values, cls) {
    const scale = Math.max(0, ...values.map((v) => Math.abs(v) || 0));
    const div = el("div", { class: cls || "profile" });
    tokens.forEach((t, i) => {
      const v = values[i] ?? 0;
      div.append(el("span", { class: "tok", title: fmt(v, 4), "data-value": v, style: `background:${shade(v, scale)}` }, showTok(t)));
    });
    return div;
  }

  function inputProfile(n) {
    const a = n.adag_activation ?? n.activation;
    const raw = n.input_attr || [];
    if (!raw.length || !a) return null;
    return raw.map((v) => v / a);
  }

  function outputProfile(n) {
    const raw = n.output_attr || [];
    if (!raw.length || !S.targets.length) return null;
    return raw.map((v, j) => (S.targets[j] && S.targets[j].logit ? v / S.targets[j].logit : 0));
  }

  function bars(labels, values) {
    const scale = Math.max(0, ...values.map((v) => Math.abs(v) || 0));
    const div = el("div", { class: "bars" });
    labels.forEach((lab, i) => {
      const v = values[i] ?? 0;
      const w = scale ? (100 * Math.abs(v)) / scale : 0;
      div.append(el("span", { class: "mono" }, JSON.stringify(showTok(lab))),
        el("div", {}, el("div", { class: "bar", style: `width:${w.toFixed(1)}%;background:${shade(v, Math.abs(v) || 1)}` })),
        el("span", { class: "mono", "data-value": v }, fmt(v)));
    });
    return div;
  }

  function edgeList(links, other) {
    const ul = el("ul", { class: "edges" });
    for (const l of links.slice(0, 8)) {
      const id = other(l);
      const n = S.byId.get(id);
      ul.append(el("li", {},
        el("button", { class: "link", onclick: () => selectNode(id) }, nodeLabel(n)),
        el("span", { class: "mono", style: `color:${l.weight >= 0 ? "var(--pos)" : "var(--neg)"}` }, fmt(l.weight))));
    }
    if (!links.length) ul.append(el("li", { class: "muted" }, "none"));
    return ul;
  }

  function kv(pairs) {
    const dl = el("dl", { class: "kv" });
    for (const [k, v, key] of pairs) dl.append(el("dt", {}, k), el("dd", key ? { "data-key": key } : {}, v));
    return dl;
  }

  function labelEditor(current, onSet) {
    const input = el("input", { type: "text", value: current, "aria-label": "label" });
    const set = () => onSet(input.value.trim());
    input.addEventListener("keydown", (e) => { e.stopPropagation(); if (e.key === "Enter") set(); });
    return el("div", { class: "edit" }, input, el("button", { type: "button", onclick: set }, "Set label"));
  }

  function renderDetail() {
    const d = $("detail");
    d.replaceChildren();
    const sel = S.selected;
    if (sel && sel.type === "node" && S.byId.has(sel.id)) renderNode(d, S.byId.get(sel.id));
    else if (sel && sel.type === "super") renderSuper(d, S.supernodes.find((s) => s.name === sel.id));
    else d.append(el("p", { class: "muted" }, "Click a node or a supernode. Keys: / search · ↑ strongest output · ↓ strongest input · ← → neighbours · p pin · c collapse/expand · Esc clear."));
    renderClusterList(d);
  }

  function renderNode(d, n) {
    const k = kind(n);
    d.dataset.kind = "node";
    d.dataset.id = n.node_id;
    d.append(el("h2", { id: "detail-title" }, nodeLabel(n)));
    const sn = S.memberOf.get(n.node_id);
    d.append(kv([
      ["id", el("code", {}, `${n.adag_id ?? ""} (${n.node_id})`)],
      ["kind", k],
      ["position", `${n.ctx_idx} ${JSON.stringify(showTok((S.layout.tokens[n.ctx_idx]) ?? ""))}`],
      ["activation", fmt(n.adag_activation ?? n.activation, 5), "activation"],
      ["attribution", fmt(n.attribution, 5), "attribution"],
      ["influence", fmt(n.influence, 4), "influence"],
      ...(k === "logit" ? [["probability", fmt(n.token_prob, 4), "prob"]] : []),
      ...(sn ? [["supernode", el("button", { class: "link", onclick: () => select({ type: "super", id: sn.name }) }, superLabel(sn))]] : []),
    ]));
    const buttons = el("div", { class: "edit" },
      el("button", { type: "button", id: "pin", onclick: () => togglePin(n.node_id) }, S.pinned.has(n.node_id) ? "Unpin (p)" : "Pin (p)"));
    d.append(buttons);
    if (isUnit(n)) {
      const key = String(n.feature);
      d.append(labelEditor(S.labels.get(key) || "", (v) => {
        if (v) S.labels.set(key, v); else S.labels.delete(key);
        markDirty(); S.base = null; draw(); renderDetail();
      }));
    }
    const inp = inputProfile(n);
    if (inp) {
      d.append(el("h3", {}, "Input profile (share of the activation from each token)"));
      d.append(tokensShaded(S.layout.tokens, inp, "profile input-profile"));
    }
    const out = outputProfile(n);
    if (out && k !== "logit") {
      d.append(el("h3", {}, "Output profile (share of each target logit)"));
      const od = bars(S.targets.map((t) => t.token), out);
      od.classList.add("output-profile");
      d.append(od);
    }
    d.append(el("h3", {}, "Strongest inputs"), edgeList(S.inLinks.get(n.node_id) || [], (l) => l.source));
    d.append(el("h3", {}, "Strongest outputs"), edgeList(S.outLinks.get(n.node_id) || [], (l) => l.target));
    if (k === "neuron" || k === "feature") {
      const box = el("div", { id: "others" }, el("p", { class: "muted" }, "loading…"));
      d.append(el("h3", {}, "Where it matters most in the run"), box);
      otherPrompts(n).then((occ) => {
        box.replaceChildren();
        const ul = el("ul", { class: "others" });
        for (const o of occ) {
          const here = o.slug === S.slug;
          const href = `/graph.html?slug=${encodeURIComponent(o.slug)}&node=${encodeURIComponent(o.node_id)}`;
          ul.append(el("li", {},
            here ? el("span", {}, `this prompt @${JSON.stringify(showTok(o.token ?? ""))}`)
              : el("a", { href }, `${o.prompt} @${JSON.stringify(showTok(o.token ?? ""))}`),
            el("span", { class: "mono" }, `attr ${fmt(o.attribution)}`)));
        }
        if (!occ.length) ul.append(el("li", { class: "muted" }, "only here"));
        box.append(ul);
      }).catch((e) => box.replaceChildren(el("p", { class: "err" }, String(e))));
    }
  }

  async function otherPrompts(n) {
    const key = `${kind(n)}|${n.adag_layer}|${n.adag_index}`;
    if (!S.unitCache.has(key)) {
      const url = `/api/unit?kind=${encodeURIComponent(kind(n))}&layer=${n.adag_layer}&index=${n.adag_index}&limit=10`;
      S.unitCache.set(key, getJSON(url).then((r) => r.occurrences || []));
    }
    return S.unitCache.get(key);
  }

  function renderSuper(d, sn) {
    if (!sn) return;
    d.dataset.kind = "super";
    d.dataset.id = sn.name;
    const c = clusterOf(sn);
    d.append(el("h2", { id: "detail-title" }, el("span", { class: "swatch", style: `background:${sn.color}` }), superLabel(sn)));
    d.append(kv([
      ["members here", String(sn.members.length), "members"],
      ...(c && c.size !== undefined ? [["units in the run", String(c.size), "size"]] : []),
      ...(c && c.layers ? [["layers", `${c.layers[0]}–${c.layers[1]}`]] : []),
      ...(c && c.inhibitory !== undefined ? [["inhibitory", c.inhibitory ? "yes" : "no"]] : []),
    ]));
    d.append(el("div", { class: "edit" },
      el("button", { type: "button", id: "collapse-one", onclick: () => toggleCollapse(sn.name) }, S.collapsed.has(sn.name) ? "Expand (c)" : "Collapse (c)"),
      el("button", { type: "button", onclick: () => { setSupernodes(S.supernodes.filter((s) => s !== sn).map((s) => [s.name, ...s.members])); markDirty(); S.selected = null; refresh(); renderDetail(); } }, "Ungroup")));
    d.append(labelEditor(sn.name, (v) => {
      if (!v || S.supernodes.some((s) => s !== sn && s.name === v)) return;
      if (S.collapsed.delete(sn.name)) S.collapsed.add(v);
      sn.name = v; S.selected = { type: "super", id: v };
      markDirty(); refresh(); renderDetail();
    }));
    if (c) {
      for (const side of ["input", "output"]) {
        const s = c[side];
        if (!s) continue;
        d.append(el("h3", {}, `${side} description`));
        const p = el("p", { class: `description-${side}` }, s.explanation || (s.status === "not run" ? "not described" : s.failure || "–"));
        d.append(p);
        d.append(kv([
          ["score", fmt(s.score), `${side}-score`],
          ["shuffled baseline", fmt(s.shuffled)],
          ["top-tokens baseline", fmt(s.top_tokens)],
        ]));
      }
      if (c.steering) {
        d.append(el("h3", {}, "Steering"));
        d.append(kv([
          ["factor", fmt(c.steering.factor)],
          ["Δ p(target)", `${fmt(c.steering.dprob)} [${fmt(c.steering.dprob_lo)}, ${fmt(c.steering.dprob_hi)}]`, "dprob"],
          ["share down", fmt(c.steering.share_down)],
          ["KL", fmt(c.steering.kl)],
        ]));
      }
    }
    // the group's summed input profile on this prompt
    const sum = new Array(S.layout.tokens.length).fill(0);
    let any = false;
    for (const id of sn.members) {
      const p = inputProfile(S.byId.get(id));
      if (p) { any = true; p.forEach((v, i) => { if (i < sum.length) sum[i] += v; }); }
    }
    if (any) {
      d.append(el("h3", {}, "Summed input profile on this prompt"));
      d.append(tokensShaded(S.layout.tokens, sum, "profile input-profile"));
    }
    if (c && c.records && c.records.length) {
      d.append(el("h3", {}, "Top records across the run"));
      const box = el("div", { class: "records" });
      for (const r of c.records) {
        const rec = tokensShaded(r.tokens, r.values, "record");
        rec.prepend(el("a", { href: `/graph.html?slug=${encodeURIComponent(r.prompt_id)}`, class: "mono" }, "↗ "));
        box.append(rec);
      }
      d.append(box);
    }
    d.append(el("h3", {}, "Members"));
    const ul = el("ul", { class: "members" });
    for (const id of sn.members) {
      const n = S.byId.get(id);
      ul.append(el("li", {}, el("button", { class: "link", onclick: () => { if (S.collapsed.has(sn.name)) toggleCollapse(sn.name); selectNode(id); } }, nodeLabel(n)),
        el("span", { class: "mono" }, `attr ${fmt(n.attribution)}`)));
    }
    d.append(ul);
  }

  function renderClusterList(d) {
    const box = el("div", { class: "clusters-list" });
    box.append(el("h3", {}, `Supernodes (${S.supernodes.length})`));
    const ul = el("ul", { class: "members" });
    for (const sn of S.supernodes) {
      ul.append(el("li", {},
        el("button", { class: "link", onclick: () => select({ type: "super", id: sn.name }) },
          el("span", { class: "swatch", style: `background:${sn.color}` }), superLabel(sn)),
        el("span", { class: "muted" }, `${sn.members.length}`)));
    }
    box.append(ul);
    if (S.pinned.size >= 1) {
      const name = el("input", { type: "text", placeholder: "new supernode name", "aria-label": "supernode name" });
      name.addEventListener("keydown", (e) => e.stopPropagation());
      box.append(el("div", { class: "edit" }, name, el("button", {
        type: "button", id: "group-pinned", onclick: () => {
          const v = name.value.trim() || `group ${S.supernodes.length + 1}`;
          if (S.supernodes.some((s) => s.name === v)) return;
          const ids = [...S.pinned];
          const groups = S.supernodes.map((s) => [s.name, ...s.members.filter((m) => !S.pinned.has(m))]).filter((g) => g.length > 1);
          groups.push([v, ...ids]);
          setSupernodes(groups);
          markDirty(); refresh(); select({ type: "super", id: v });
        },
      }, `Group ${S.pinned.size} pinned`)));
    }
    d.append(box);
  }

  // -- wiring ----------------------------------------------------------------------------------

  function wire() {
    const c = $("graph");
    let drag = null;
    c.addEventListener("mousemove", (e) => {
      if (drag) {
        S.view.x = drag.vx + e.offsetX - drag.x; S.view.y = drag.vy + e.offsetY - drag.y;
        drag.moved = drag.moved || Math.hypot(e.offsetX - drag.x, e.offsetY - drag.y) > 3;
        S.base = null; draw(); return;
      }
      setHover(hit(e.offsetX, e.offsetY), e.offsetX, e.offsetY);
    });
    c.addEventListener("mouseleave", () => setHover(null, 0, 0));
    c.addEventListener("mousedown", (e) => { drag = { x: e.offsetX, y: e.offsetY, vx: S.view.x, vy: S.view.y, moved: false }; });
    window.addEventListener("mouseup", () => { setTimeout(() => { drag = null; }, 0); });
    c.addEventListener("click", (e) => {
      if (drag && drag.moved) return;
      const it = hit(e.offsetX, e.offsetY);
      if (it && e.shiftKey && it.type === "node") { togglePin(it.id); return; }
      select(it ? { type: it.type, id: it.id } : null, { focusCanvas: true });
    });
    c.addEventListener("dblclick", (e) => {
      const it = hit(e.offsetX, e.offsetY);
      if (it && it.type === "super") toggleCollapse(it.id);
      else if (it && S.memberOf.has(it.id)) toggleCollapse(S.memberOf.get(it.id).name);
    });
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const f = Math.exp(-e.deltaY * 0.0015);
      const k = Math.min(20, Math.max(0.5, S.view.k * f));
      const w = toWorld(e.offsetX, e.offsetY);
      S.view.k = k; S.view.x = e.offsetX - k * w.x; S.view.y = e.offsetY - k * w.y;
      S.base = null; draw();
    }, { passive: false });
    document.addEventListener("keydown", (e) => {
      const t = e.target;
      if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA")) {
        if (e.key === "Escape") t.blur();
        return;
      }
      const keys = { ArrowUp: "up", ArrowDown: "down", ArrowLeft: "left", ArrowRight: "right" };
      if (keys[e.key]) { e.preventDefault(); neighbour(keys[e.key]); }
      else if (e.key === "/") { e.preventDefault(); $("search").focus(); }
      else if (e.key === "Escape") { select(null); }
      else if (e.key === "p" && S.selected && S.selected.type === "node") togglePin(S.selected.id);
      else if (e.key === "c" && S.selected) {
        const name = S.selected.type === "super" ? S.selected.id : (S.memberOf.get(S.selected.id) || {}).name;
        if (name) toggleCollapse(name);
      } else if (e.key === "0") { S.view = { k: 1, x: 0, y: 0 }; S.base = null; draw(); }
    });
    $("search").addEventListener("input", (e) => search(e.target.value));
    $("search").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); nextMatch(e.shiftKey ? -1 : 1); } });
    const nt = $("node-threshold"), et = $("edge-threshold");
    nt.addEventListener("input", () => { S.nodeThreshold = Number(nt.value); $("node-threshold-value").textContent = S.nodeThreshold.toFixed(2); refresh(); if (S.query) search(S.query); });
    et.addEventListener("input", () => { S.edgeThreshold = Number(et.value); $("edge-threshold-value").textContent = S.edgeThreshold.toFixed(2); refresh(); });
    $("collapse").addEventListener("change", (e) => {
      S.collapsed = e.target.checked ? new Set(S.supernodes.map((s) => s.name)) : new Set();
      if (S.selected && S.selected.type === "node") {
        const sn = S.memberOf.get(S.selected.id);
        if (sn && S.collapsed.has(sn.name)) S.selected = { type: "super", id: sn.name };
      } else if (S.selected && S.selected.type === "super" && !S.collapsed.size) {
        // an expanded supernode stays selected: its members are emphasised
      }
      refresh(); renderDetail();
    });
    $("pinned-only").addEventListener("change", (e) => { S.pinnedOnly = e.target.checked; refresh(); });
    $("save").addEventListener("click", save);
    window.addEventListener("resize", resize);
    window.addEventListener("beforeunload", (e) => { if (S.dirty && !S.readOnly) { e.preventDefault(); e.returnValue = ""; } });
  }

  async function main() {
    const params = new URLSearchParams(location.search);
    S.slug = params.get("slug");
    if (!S.slug) throw new Error("no graph given: open /graph.html?slug=<slug> (the index at / lists them)");
    const [run, graph, clusters] = await Promise.all([
      getJSON("/api/run"),
      getJSON(`/run/viewer/${encodeURIComponent(S.slug)}.json`),
      getJSON("/api/clusters").catch(() => ({ clusters: [] })),
    ]);
    S.readOnly = !!run.read_only;
    if (S.readOnly) { $("save").disabled = true; $("save").title = "the server was started with --read-only"; }
    load(graph, clusters.clusters);
    document.title = `adag: ${S.meta.prompt || S.slug}`;
    $("title").textContent = S.slug;
    $("prompt").textContent = S.meta.prompt || "";
    $("targets").textContent = S.targets.length
      ? "targets " + S.targets.map((t) => `${JSON.stringify(showTok(t.token))} ${(100 * t.prob).toFixed(1)}%`).join(", ")
      : "";
    wire();
    resize();
    const node = params.get("node");
    if (node && S.byId.has(node)) selectNode(node); else renderDetail();
    document.body.dataset.ready = "1";
  }

  window.adagViewer = {
    state: S,
    select: (type, id) => select({ type, id }),
    // screen position (CSS pixels relative to the canvas) of a drawn node or supernode
    screenPos: (type, id) => { const it = S.items.find((i) => i.type === type && i.id === id); return it ? toScreen(it) : null; },
    drawnIds: () => S.items.map((i) => ({ type: i.type, id: i.id })),
  };

  main().catch((e) => {
    $("detail").replaceChildren(el("p", { class: "err", id: "load-error" }, String(e.message || e)));
    document.body.dataset.ready = "error";
  });
})();
