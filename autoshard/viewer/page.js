"use strict";
// The autoshard plan viewer. Reads the plan inlined in #plan-data (schema: autoshard/dump.py)
// and renders each tab on first view; the op tree builds a group's rows only when it opens,
// and every list is capped, so a 10k-node plan stays responsive.
(function () {
  const plan = JSON.parse(document.getElementById("plan-data").textContent);
  const mesh = plan.mesh;
  const nodes = plan.nodes || [];
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const ROW_CAP = 200;
  const COLORS = { compute: "#4c8bf5", collectives: "#e8710a", "reshard in": "#a142f4",
                   "reshard out": "#c5221f" };
  const KIND_COLORS = ["#e8710a", "#12a4af", "#f2a600", "#7b5cd6", "#d93f87", "#3c9a5f"];

  // -- small helpers ---------------------------------------------------------------------------
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null) continue;
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "style") e.style.cssText = v;
      else e.setAttribute(k, v);
    }
    for (const kid of kids.flat()) {
      if (kid == null) continue;
      e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return e;
  }
  const svgNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const e = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function seconds(s) {
    if (s == null) return "-";
    const a = Math.abs(s);
    if (a >= 1) return s.toFixed(3) + " s";
    if (a >= 1e-3) return (s * 1e3).toFixed(3) + " ms";
    if (a >= 1e-6) return (s * 1e6).toFixed(2) + " \u00b5s";
    return (s * 1e9).toFixed(1) + " ns";
  }
  function bytes(b) {
    if (b == null) return "-";
    if (b >= 2 ** 30) return (b / 2 ** 30).toFixed(2) + " GiB";
    if (b >= 2 ** 20) return (b / 2 ** 20).toFixed(2) + " MiB";
    if (b >= 2 ** 10) return (b / 2 ** 10).toFixed(1) + " KiB";
    return b + " B";
  }
  function pspec(entries) {
    return "P(" + entries.map((e) => e == null ? "None" : Array.isArray(e)
      ? "(" + e.map((x) => "'" + x + "'").join(", ") + ")" : "'" + e + "'").join(", ") + ")";
  }
  const nodeCost = (n) => n.cost ? n.cost[0] + n.cost[1] + n.cost[2] : 0;
  function heat(fraction) {
    // log scale over four decades: pale blue (cheap) to red (the costliest op)
    const t = fraction > 0 ? Math.max(0, Math.min(1, (Math.log10(fraction) + 4) / 4)) : 0;
    return `hsl(${Math.round(215 - 215 * t)}, ${Math.round(35 + 50 * t)}%, ${Math.round(88 - 38 * t)}%)`;
  }
  function matches(text, terms) {
    const t = text.toLowerCase();
    return terms.every((term) => t.includes(term));
  }
  const terms = (q) => q.toLowerCase().split(/\s+/).filter(Boolean);

  // -- header and tabs -------------------------------------------------------------------------
  const meshText = mesh.axis_names.map((n, i) => `${n}=${mesh.axis_sizes[i]}`).join(" \u00d7 ");
  const nDevices = mesh.axis_sizes.reduce((a, b) => a * b, 1);
  const p = plan.prediction;
  const facts = [["method", plan.method], ["mesh", `${meshText} (${nDevices} devices)`],
                 ["hardware", plan.hardware ? plan.hardware.name : "none"],
                 ["ops", nodes.length.toLocaleString()],
                 ["arguments", plan.inputs.length.toLocaleString()]];
  if (p) {
    facts.push(["predicted step", seconds(p.step_seconds)]);
    facts.push(["peak memory", bytes(p.peak_memory_bytes) + "/device" +
                (p.memory_budget ? ` (budget ${bytes(p.memory_budget)})` : "")]);
  }
  if (plan.solver) {
    const s = plan.solver;
    facts.push(["solver", `${s.engine}, ${s.status}, ${s.seconds.toFixed(2)} s` +
                (s.gap == null || s.status === "optimal" ? "" : s.gap === 0 ? ", optimal" : `, gap ${(s.gap * 100).toFixed(2)}%`)]);
  }
  const factsBox = document.getElementById("facts");
  for (const [k, v] of facts) factsBox.append(el("span", {}, k + ": ", el("b", { text: v })));

  const TABS = [["arguments", "Arguments"], ["graph", "Op graph"], ["costs", "Costs"],
                ["memory", "Memory"], ["pipeline", "Pipeline"], ["verification", "Verification"]];
  const rendered = new Set();
  const renderers = {};
  const tabBar = document.getElementById("tabs");
  function show(name) {
    for (const [key] of TABS) {
      document.getElementById("tab-" + key).classList.toggle("on", key === name);
      tabBar.querySelector(`[data-tab=${key}]`).classList.toggle("on", key === name);
    }
    if (!rendered.has(name)) { rendered.add(name); renderers[name](); }
  }
  for (const [key, title] of TABS) {
    tabBar.append(el("button", { "data-tab": key, text: title, onclick: () => show(key) }));
  }

  // -- arguments -------------------------------------------------------------------------------
  renderers.arguments = function () {
    const box = document.getElementById("tab-arguments");
    const rows = [...plan.inputs.map((r) => ["argument", r]), ...plan.outputs.map((r) => ["result", r])];
    const total = plan.inputs.reduce((a, r) => a + r.bytes_per_device, 0);
    const search = el("input", { type: "search", id: "arg-search",
                                 placeholder: "filter by path, shape or spec (e.g. wq S1)" });
    const body = el("tbody");
    const note = el("div", { class: "note" });
    box.append(el("div", { class: "note" }, `${plan.inputs.length} arguments, ${bytes(total)} per device; ` +
                  `${plan.outputs.length} results. Specs: SBP per mesh axis (${mesh.axis_names.join(", ")}) ` +
                  "and the PartitionSpec jax uses."), search,
               el("table", { id: "arg-table" }, el("thead", {}, el("tr", {},
                 ["", "path", "shape", "SBP", "PartitionSpec", "bytes/device", "why"].map(
                   (h, i) => el("th", { class: i === 5 ? "num" : null, text: h })))), body), note);
    const text = rows.map(([kind, r]) => [kind, r.path, `${r.dtype}[${r.shape}]`, r.spec,
                                          pspec(r.partition_spec)].join(" "));
    function fill() {
      const q = terms(search.value);
      body.textContent = "";
      let shown = 0, hits = 0;
      rows.forEach(([kind, r], i) => {
        if (q.length && !matches(text[i], q)) return;
        hits++;
        if (shown >= 500) return;
        shown++;
        body.append(el("tr", {}, el("td", { class: "muted", text: kind }),
          el("td", { class: "mono", text: r.path }), el("td", { class: "mono", text: `${r.dtype}[${r.shape}]` }),
          el("td", { class: "mono", text: r.spec }), el("td", { class: "mono", text: pspec(r.partition_spec) }),
          el("td", { class: "num", text: bytes(r.bytes_per_device) }), el("td", { class: "muted", text: r.reason })));
      });
      note.textContent = hits > shown ? `showing ${shown} of ${hits}; refine the filter` : `${hits} rows`;
    }
    let timer = null;
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(fill, 120); });
    fill();
  };

  // -- op graph --------------------------------------------------------------------------------
  const children = new Map();      // loop node id -> its body nodes
  for (const n of nodes) {
    if (n.parent != null) {
      if (!children.has(n.parent)) children.set(n.parent, []);
      children.get(n.parent).push(n);
    }
  }
  const subtreeCost = new Map();
  function costOf(n) {
    if (subtreeCost.has(n.id)) return subtreeCost.get(n.id);
    let c = nodeCost(n);
    for (const k of children.get(n.id) || []) c += costOf(k);
    subtreeCost.set(n.id, c);
    return c;
  }
  const maxCost = nodes.reduce((m, n) => Math.max(m, nodeCost(n)), 0) || 1;
  const fnOf = (n) => { const m = /\(([^()]*)\)\s*$/.exec(n.source || ""); return m ? m[1] : ""; };
  const phaseOf = (n) => n.scope || "(top level)";

  let selected = null;
  function nodeRow(n) {
    const kids = children.get(n.id);
    const label = `${n.op}  ${n.strategy || ""}`;
    const row = el("div", { class: "node", "data-id": n.id, title: `${n.op} #${n.id} ${n.source}`,
                            onclick: (ev) => { ev.stopPropagation(); select(n.id); } },
      el("span", { class: "swatch", style: `background:${heat(nodeCost(n) / maxCost)}` }),
      el("span", { class: "label mono", text: label }),
      el("span", { class: "muted label", text: n.source }),
      el("span", { class: "cost", text: n.cost ? seconds(costOf(n)) : "" }));
    if (!kids) return row;
    const g = { name: `${n.op} #${n.id} body (${kids.length} ops)`, nodes: kids,
                cost: costOf(n) - nodeCost(n), sub: null };
    return el("div", {}, row, groupElement(g, [], 0));
  }
  function capped(container, items, make) {
    let shown = 0;
    function more() {
      const end = Math.min(items.length, shown + ROW_CAP);
      for (; shown < end; shown++) container.append(make(items[shown]));
      if (shown < items.length) {
        container.append(el("div", { class: "more", text: `show ${Math.min(ROW_CAP, items.length - shown)} more of ${items.length - shown}`,
                                     onclick: (ev) => { ev.target.remove(); more(); } }));
      }
    }
    more();
  }
  function groupElement(g, keys, depth) {
    const kidsBox = el("div", { class: "kids" });
    const box = el("div", { class: "group", "data-group": g.name });
    const head = el("div", { class: "head", onclick: () => {
      if (!box.dataset.built) {
        box.dataset.built = "1";
        if (depth < keys.length) {
          const sub = new Map();
          for (const n of g.nodes) {
            const k = keys[depth](n) || "(none)";
            if (!sub.has(k)) sub.set(k, { name: k, nodes: [], cost: 0 });
            const s = sub.get(k); s.nodes.push(n); s.cost += costOf(n);
          }
          capped(kidsBox, [...sub.values()], (s) => groupElement(s, keys, depth + 1));
        } else {
          capped(kidsBox, g.nodes, nodeRow);
        }
      }
      box.classList.toggle("open");
    } },
      el("span", { class: "tw" }),
      el("span", { class: "swatch", style: `background:${heat(g.cost / maxCost / Math.max(1, Math.sqrt(g.nodes.length)))}` }),
      el("span", { class: "label", text: g.name }),
      el("span", { class: "muted", text: `${g.nodes.length} ops` }),
      el("span", { class: "cost", text: g.cost ? seconds(g.cost) : "" }));
    box.append(head, kidsBox);
    return box;
  }

  renderers.graph = function () {
    const pane = document.getElementById("tree-pane");
    const search = el("input", { type: "search", id: "node-search",
                                 placeholder: "find ops: op, source line, scope, layer, #id" });
    const tree = el("div", { id: "tree" });
    const results = el("div", { id: "results" });
    pane.append(el("div", { class: "note" }, "Grouped by layer, name scope and function; colour " +
                   "and time: compute + collectives + resharding of the operands, per step."),
                search, results, tree);
    const top = nodes.filter((n) => n.parent == null);
    const keys = [(n) => n.layer || "(no layer)", phaseOf, fnOf];
    const layers = new Map();
    for (const n of top) {
      const k = keys[0](n);
      if (!layers.has(k)) layers.set(k, { name: k, nodes: [], cost: 0 });
      const g = layers.get(k); g.nodes.push(n); g.cost += costOf(n);
    }
    capped(tree, [...layers.values()], (g) => groupElement(g, keys, 1));
    const text = nodes.map((n) => `#${n.id} ${n.op} ${n.source} ${n.scope} ${n.layer} ${n.strategy || ""}`);
    let timer = null;
    search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        const q = terms(search.value);
        results.textContent = "";
        tree.style.display = q.length ? "none" : "";
        if (!q.length) return;
        const exact = q.length === 1 && /^#\d+$/.test(q[0]) ? Number(q[0].slice(1)) : null;
        const hits = nodes.filter((n, i) => exact != null ? n.id === exact : matches(text[i], q));
        results.append(el("div", { class: "note", text: `${hits.length} ops match` }));
        capped(results, hits, nodeRow);
      }, 150);
    });
    panelHint();
  };

  function panelHint() {
    const panel = document.getElementById("panel");
    if (!panel.childElementCount) {
      panel.append(el("p", { class: "note", text: "Click an op to see its strategy, the layout of its " +
                             "operands and results on the mesh, the collectives it causes and the " +
                             "strategies the solver rejected." }));
    }
  }

  // -- the mesh drawing ------------------------------------------------------------------------
  function parseSpec(text) {
    if (!text) return null;
    const [body, order] = text.replace(/^\(|\)$/g, "").split("|");
    const sbp = body.split(",").map((s) => s.trim()).filter(Boolean);
    const ord = order ? order.replace("order=", "").split(",").map((x) => Number(x.trim())) : null;
    return { sbp, order: ord };
  }
  function parseType(t) {
    const m = /^([^[]*)\[(.*)\]$/.exec(t);
    return m ? { dtype: m[1], shape: m[2] ? m[2].split(",").map(Number) : [] } : { dtype: t, shape: [] };
  }
  function sliceOf(spec, shape, coord) {
    const sizes = mesh.axis_sizes;
    const splitAxes = (spec.order || sizes.map((_, i) => i)).filter((a) => /^S\d+$/.test(spec.sbp[a] || ""));
    const parts = shape.map((dim, d) => {
      const axes = splitAxes.filter((a) => spec.sbp[a] === "S" + d);
      if (!axes.length) return ":";
      let idx = 0, ways = 1;
      for (const a of axes) { idx = idx * sizes[a] + coord[a]; ways *= sizes[a]; }
      const block = Math.floor(dim / ways);
      return `${idx * block}:${(idx + 1) * block}`;
    });
    return "[" + parts.join(", ") + "]";
  }
  function meshDrawing(specText, typeText, title) {
    const spec = parseSpec(specText);
    const { dtype, shape } = parseType(typeText);
    const box = el("div", { class: "meshbox" },
      el("div", {}, el("b", { text: title + " " }), el("code", { text: `${dtype}[${shape}]` }), " ",
         el("code", { text: specText || "free (as it comes)" })));
    if (!spec) return box;
    const sizes = mesh.axis_sizes;
    const rows = sizes.length > 1 ? sizes[0] : 1;
    const cols = nDevices / rows;
    const shownCols = Math.min(cols, 16), shownRows = Math.min(rows, 8);
    const grid = el("div", { class: "mesh", style: `grid-template-columns: repeat(${shownCols}, auto)` });
    for (let r = 0; r < shownRows; r++) {
      for (let c = 0; c < shownCols; c++) {
        const device = r * cols + c;
        const coord = [];
        let rest = device;
        for (let a = sizes.length - 1; a >= 0; a--) { coord[a] = rest % sizes[a]; rest = Math.floor(rest / sizes[a]); }
        const partial = spec.sbp.some((e) => e === "P");
        grid.append(el("div", { class: "dev" + (partial ? " partial" : ""), title: `device ${device} at ` +
                                mesh.axis_names.map((n, a) => `${n}=${coord[a]}`).join(", ") },
          el("div", { class: "id", text: `d${device} (${coord.join(",")})` }),
          el("div", { class: "mono", text: shape.length ? sliceOf(spec, shape, coord) : "scalar" }),
          partial ? el("div", { class: "id", text: "partial sum" }) : null));
      }
    }
    const axes = sizes.length > 1
      ? `rows: ${mesh.axis_names[0]}; columns: ${mesh.axis_names.slice(1).join(" \u00d7 ")}`
      : `columns: ${mesh.axis_names[0]}`;
    box.append(el("div", { class: "axes", text: axes +
      (shownCols < cols || shownRows < rows ? ` (first ${shownRows * shownCols} of ${nDevices} devices)` : "") }), grid);
    return box;
  }

  // -- the node panel --------------------------------------------------------------------------
  function costBar(cost, scale) {
    const parts = ["compute", "collectives", "reshard in", "reshard out"];
    const bar = el("div", { class: "bar", style: `width:${Math.max(8, 100 * (cost.reduce((a, b) => a + b, 0) / (scale || 1)))}%` });
    const total = cost.reduce((a, b) => a + b, 0) || 1;
    cost.forEach((c, i) => { if (c > 0) bar.append(el("div", { title: `${parts[i]} ${seconds(c)}`, style: `width:${100 * c / total}%;background:${COLORS[parts[i]]}` })); });
    return bar;
  }
  function legend() {
    return el("div", { class: "legend note" }, Object.entries(COLORS).map(([k, c]) =>
      el("span", {}, el("span", { class: "swatch", style: `background:${c}` }), k)));
  }
  function select(id) {
    show("graph");
    const n = byId.get(id);
    if (!n) return;
    if (selected) for (const e of document.querySelectorAll(".node.sel")) e.classList.remove("sel");
    selected = id;
    for (const e of document.querySelectorAll(`.node[data-id="${id}"]`)) e.classList.add("sel");
    const panel = document.getElementById("panel");
    panel.textContent = "";
    panel.append(el("h2", { id: "panel-title" }, `${n.op} `, el("span", { class: "muted", text: `#${n.id}` })),
      el("div", {}, "source: ", el("code", { id: "panel-source", text: n.source || "(unknown)" })),
      el("div", { class: "muted" }, `layer ${n.layer || "-"} \u00b7 scope ${n.scope || "-"}` +
         (n.parent != null ? ` \u00b7 inside loop #${n.parent}` : "")));
    panel.append(el("h3", { text: "Strategy" }));
    if (n.strategy != null) {
      panel.append(el("div", {}, el("code", { id: "panel-strategy", text: n.strategy }),
        el("span", { class: "muted", text: `  chosen among ${n.strategies} strategies` })),
        costBar(n.cost, null), legend(),
        el("table", {}, el("tbody", {}, ["compute", "collectives", "reshard in", "reshard out"].map((k, i) =>
          el("tr", {}, el("td", { text: k }), el("td", { class: "num", text: seconds(n.cost[i]) }))))));
    } else {
      panel.append(el("div", { class: "note", text: children.has(n.id)
        ? `a loop: its ${children.get(n.id).length} body ops carry the strategies`
        : "not planned by the search (a rule-made plan, or an op that aliases its operand)" }));
    }
    panel.append(el("h3", { text: "Operands and results on the mesh" }));
    n.inputs.forEach(([vid, type], i) => {
      const spec = n.in_specs ? n.in_specs[i] : null;
      if (vid == null) { panel.append(el("div", { class: "muted", text: `operand ${i}: literal ${type}` })); return; }
      panel.append(meshDrawing(spec, type, `operand ${i} %${vid}`));
    });
    n.outputs.forEach(([vid, type], i) => panel.append(meshDrawing(n.out_specs[i], type, `result ${i} %${vid}`)));
    panel.append(el("h3", { text: "Collectives it causes" }));
    if (!n.collectives.length) panel.append(el("div", { class: "note", text: "none" }));
    else panel.append(el("table", {}, el("thead", {}, el("tr", {}, ["kind", "mesh axes", "bytes/device", "per step", "why"].map((h) => el("th", { text: h })))),
      el("tbody", {}, n.collectives.map((c) => el("tr", {}, el("td", { text: c.kind }), el("td", { text: c.axes.join(", ") }),
        el("td", { class: "num", text: bytes(c.bytes) }), el("td", { class: "num", text: "\u00d7" + c.count }), el("td", { text: c.cause }))))));
    panel.append(el("h3", { text: "Rejected alternatives" }));
    if (!n.rejected.length) {
      panel.append(el("div", { class: "note", text: n.strategy == null ? "-" : "none: this was the only strategy" }));
    } else {
      const chosen = n.cost.reduce((a, b) => a + b, 0);
      const scale = Math.max(chosen, ...n.rejected.map((r) => r.cost.reduce((a, b) => a + b, 0)));
      panel.append(el("div", { class: "note", text: "priced with every other op's choice kept (an op shared by identical layers changes with all of them)" }),
        el("table", { id: "rejected" }, el("thead", {}, el("tr", {}, ["strategy", "cost split", "total", "vs chosen"].map((h) => el("th", { text: h })))),
          el("tbody", {}, [{ strategy: n.strategy + " (chosen)", cost: n.cost }, ...n.rejected].map((r) => {
            const total = r.cost.reduce((a, b) => a + b, 0);
            return el("tr", {}, el("td", { class: "mono", text: r.strategy }), el("td", {}, costBar(r.cost, scale)),
              el("td", { class: "num", text: seconds(total) }),
              el("td", { class: "num", text: r.cost === n.cost ? "" : "+" + seconds(total - chosen) }));
          }))));
    }
  }

  // -- costs -----------------------------------------------------------------------------------
  renderers.costs = function () {
    const box = document.getElementById("tab-costs");
    if (!p) { box.append(el("p", { class: "note", text: "This plan has no cost prediction (it was made by a rule, not the search)." })); return; }
    const parts = [["compute", p.compute_seconds, COLORS.compute]];
    Object.entries(p.collective_seconds).filter(([, v]) => v > 0).forEach(([k, v], i) =>
      parts.push([k, v, KIND_COLORS[i % KIND_COLORS.length]]));
    const total = parts.reduce((a, x) => a + x[1], 0) || 1;
    box.append(el("h2", { text: `Predicted step ${seconds(p.step_seconds)} per device` }),
      el("div", { class: "bar", style: "height:22px;max-width:900px" }, parts.map(([k, v, c]) =>
        el("div", { title: `${k} ${seconds(v)}`, style: `width:${100 * v / total}%;background:${c}` }))),
      el("div", { class: "legend note" }, parts.map(([k, v, c]) => el("span", {}, el("span", { class: "swatch", style: `background:${c}` }), `${k} ${seconds(v)}`))),
      el("table", { id: "cost-table", style: "max-width:620px" }, el("tbody", {},
        parts.map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { class: "num", text: seconds(v) }),
          el("td", { class: "num", text: (100 * v / total).toFixed(1) + "%" }),
          el("td", { class: "num", text: p.collectives[k] ? `${p.collectives[k][0]} ops, ${bytes(p.collectives[k][1])}` : "" }))),
        el("tr", {}, el("td", { text: "of the collectives, resharding between ops" }), el("td", { class: "num", text: seconds(p.reshard_seconds) }), el("td"), el("td")))));
    const layers = new Map();
    for (const n of nodes) {
      if (!n.cost) continue;
      const k = n.layer || "(no layer)";
      if (!layers.has(k)) layers.set(k, [0, 0, 0, 0]);
      const acc = layers.get(k);
      n.cost.forEach((c, i) => { acc[i] += i < 3 ? c : 0; });
    }
    if (layers.size) {
      const scale = Math.max(...[...layers.values()].map((c) => c[0] + c[1] + c[2]));
      box.append(el("h2", { text: "By layer" }), legend(), el("table", { style: "max-width:900px" }, el("tbody", {},
        [...layers.entries()].slice(0, 300).map(([k, c]) => el("tr", {}, el("td", { class: "mono", text: k }),
          el("td", { style: "width:60%" }, costBar(c, scale)), el("td", { class: "num", text: seconds(c[0] + c[1] + c[2]) }))))));
    }
    const top = nodes.filter((n) => n.cost).sort((a, b) => nodeCost(b) - nodeCost(a)).slice(0, 25);
    if (top.length) {
      box.append(el("h2", { text: "Costliest ops" }), el("table", {}, el("thead", {}, el("tr", {},
        ["op", "strategy", "layer", "source", "compute", "collectives", "reshard in", "total"].map((h, i) => el("th", { class: i > 3 ? "num" : null, text: h })))),
        el("tbody", {}, top.map((n) => el("tr", { style: "cursor:pointer", onclick: () => select(n.id) },
          el("td", { class: "mono", text: `${n.op} #${n.id}` }), el("td", { class: "mono", text: n.strategy }),
          el("td", { text: n.layer }), el("td", { class: "muted", text: n.source }),
          ...n.cost.slice(0, 3).map((c) => el("td", { class: "num", text: seconds(c) })),
          el("td", { class: "num", text: seconds(nodeCost(n)) }))))));
    }
  };

  // -- memory ----------------------------------------------------------------------------------
  renderers.memory = function () {
    const box = document.getElementById("tab-memory");
    const m = plan.memory || {};
    const curve = m.curve || [];
    if (!curve.length) { box.append(el("p", { class: "note", text: "No memory curve: the plan was not made by the search." })); return; }
    const budget = m.budget;
    box.append(el("h2", { text: `Predicted memory per device over the step: peak ${bytes(m.peak)}` + (budget ? `, budget ${bytes(budget)}` : ", no budget") }));
    if (m.live_peak != null && m.peak > m.live_peak) {
      box.append(el("p", { class: "note", text: `The curve is live bytes (top ${bytes(m.live_peak)}); the peak is what XLA's buffer assignment allocates for the same buffers, each at one offset for its whole life, holes between them included.` }));
    }
    const W = 960, H = 280, L = 70, B = 24, T = 10;
    const bucket = Math.max(1, Math.ceil(curve.length / 1200));
    const xs = [], ys = [];
    for (let i = 0; i < curve.length; i += bucket) {
      let v = 0; for (let j = i; j < Math.min(curve.length, i + bucket); j++) v = Math.max(v, curve[j]);
      xs.push(i); ys.push(v);
    }
    const top = Math.max(m.peak || 0, budget || 0, ...ys) * 1.05 || 1;
    const X = (i) => L + (W - L - 10) * i / Math.max(1, curve.length - 1);
    const Y = (v) => T + (H - T - B) * (1 - v / top);
    const chart = svg("svg", { width: W, height: H, id: "memory-chart", role: "img" });
    for (let k = 0; k <= 4; k++) {
      const v = top * k / 4;
      chart.append(svg("line", { x1: L, x2: W - 10, y1: Y(v), y2: Y(v), stroke: "#eceff3" }));
      const t = svg("text", { x: 4, y: Y(v) + 4 }); t.textContent = bytes(v); chart.append(t);
    }
    const d = xs.map((x, i) => `${i ? "L" : "M"}${X(x).toFixed(1)},${Y(ys[i]).toFixed(1)}`).join("");
    chart.append(svg("path", { d: d + `L${X(xs[xs.length - 1])},${Y(0)}L${X(0)},${Y(0)}Z`, fill: "#dbe7fd" }));
    chart.append(svg("path", { d, fill: "none", stroke: "#2457c5", "stroke-width": 1.5 }));
    if (m.peak && m.live_peak != null && m.peak > m.live_peak) {
      chart.append(svg("line", { x1: L, x2: W - 10, y1: Y(m.peak), y2: Y(m.peak), stroke: "#888", "stroke-dasharray": "2 3" }));
      const t = svg("text", { x: W - 220, y: Y(m.peak) - 4 }); t.textContent = "allocated peak"; chart.append(t);
    }
    if (budget) {
      chart.append(svg("line", { x1: L, x2: W - 10, y1: Y(budget), y2: Y(budget), stroke: "#c5221f", "stroke-dasharray": "5 4" }));
      const t = svg("text", { x: W - 120, y: Y(budget) - 4 }); t.textContent = "budget"; chart.append(t);
    }
    const xl = svg("text", { x: L, y: H - 6 }); xl.textContent = "program order (top-level ops) \u2192"; chart.append(xl);
    const cursor = svg("line", { y1: T, y2: H - B, stroke: "#888", visibility: "hidden" });
    chart.append(cursor);
    const readout = el("div", { class: "note", id: "memory-readout", text: "Hover the curve to see which op runs at each step." });
    chart.addEventListener("mousemove", (ev) => {
      const r = chart.getBoundingClientRect();
      const i = Math.round((ev.clientX - r.left - L) / (W - L - 10) * (curve.length - 1));
      if (i < 0 || i >= curve.length) return;
      cursor.setAttribute("x1", X(i)); cursor.setAttribute("x2", X(i)); cursor.setAttribute("visibility", "visible");
      const nid = i >= 1 && m.steps ? m.steps[i - 1] : null;
      const n = nid != null ? byId.get(nid) : null;
      readout.textContent = `step ${i}: ${bytes(curve[i])}` + (n ? ` \u2014 ${n.op} #${n.id} ${n.source} (${n.layer})` :
        i === 0 ? " \u2014 arguments" : " \u2014 results");
    });
    box.append(chart, readout);
  };

  // -- pipeline and verification ---------------------------------------------------------------
  renderers.pipeline = function () {
    const box = document.getElementById("tab-pipeline");
    const pl = plan.pipeline;
    if (!pl || !(pl.timeline || []).length) {
      box.append(el("p", { class: "note", text: "This plan is not pipelined: every device runs the whole step." }));
      return;
    }
    const end = Math.max(...pl.timeline.map((e) => e.end)) || 1;
    const W = 960, rowH = 22, L = 110;
    const chart = svg("svg", { width: W, height: rowH * pl.stages.length + 24, id: "pipeline-chart" });
    pl.stages.forEach((s, i) => { const t = svg("text", { x: 4, y: i * rowH + 15 }); t.textContent = s.name; chart.append(t); });
    for (const e of pl.timeline) {
      const r = svg("rect", { x: L + (W - L - 10) * e.start / end, y: e.stage * rowH + 3, height: rowH - 6,
        width: Math.max(1, (W - L - 10) * (e.end - e.start) / end), fill: /back|bwd/i.test(e.name) ? "#a142f4" : "#4c8bf5" });
      const tip = svg("title", {}); tip.textContent = `${e.name}: ${seconds(e.start)} \u2013 ${seconds(e.end)}`;
      r.append(tip); chart.append(r);
    }
    box.append(el("h2", { text: `Pipeline: ${pl.stages.length} stages, ${seconds(end)}` }), chart,
      el("p", { class: "note", text: "plan.trace.json beside this page holds the same timeline for Perfetto." }));
  };

  renderers.verification = function () {
    const box = document.getElementById("tab-verification");
    const v = plan.verification;
    if (!v) {
      box.append(el("p", { class: "note", text: "Not verified. Pass verification=autoshard.verify(fn, *args) to autoshard.dump to compare the prediction with the compiled program." }));
      return;
    }
    box.append(el("h2", { text: "Predicted vs compiled" }), el("table", { id: "verification-table", style: "max-width:760px" },
      el("thead", {}, el("tr", {}, ["measure", "predicted", "compiled", "ratio"].map((h, i) => el("th", { class: i ? "num" : null, text: h })))),
      el("tbody", {}, v.rows.map((r) => el("tr", {}, el("td", { text: r.name }),
        el("td", { class: "num", text: r.predicted == null ? "" : Math.round(r.predicted).toLocaleString() }),
        el("td", { class: "num", text: Math.round(r.compiled).toLocaleString() }),
        // no ratio for counts (compiled after XLA's combiners) or without a prediction
        el("td", { class: "num", text: r.ratio == null ? "-" : r.ratio.toFixed(2) }))))));
  };

  show("arguments");
  window.autoshardViewer = { select, show, ready: true };
  document.body.dataset.ready = "1";
})();
