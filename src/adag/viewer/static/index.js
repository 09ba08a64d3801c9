// The run's index page: every graph of RUN_DIR/viewer with its prompt, targets and counts
// (from the server's /api/run), each linking to the graph viewer, and the run's report.
"use strict";

(function () {
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  async function main() {
    const res = await fetch("/api/run");
    if (!res.ok) throw new Error(`/api/run answered ${res.status}`);
    const run = await res.json();
    document.title = `adag: ${run.run}`;
    document.getElementById("title").textContent = `adag run ${run.run}`;
    const n = run.graphs.length;
    document.getElementById("sub").textContent =
      `${run.model || "unknown model"} · ${n} graph${n === 1 ? "" : "s"}` +
      (run.read_only ? " · read-only" : "");
    if (run.report) {
      document.getElementById("report").append(
        el("p", {}, el("a", { href: "/" + run.report, id: "report-link" }, "Open the run's report")));
    }
    const body = document.querySelector("#graphs tbody");
    run.graphs.forEach((g, i) => {
      const targets = (g.targets || [])
        .map((t) => `${JSON.stringify(t.token)} ${(100 * (t.prob || 0)).toFixed(1)}%`)
        .join(", ");
      const href = `/graph.html?slug=${encodeURIComponent(g.slug)}`;
      body.append(
        el("tr", { "data-slug": g.slug },
          el("td", { class: "num" }, i),
          el("td", {}, el("a", { href, class: "graph-link" }, g.prompt || g.slug)),
          el("td", { class: "mono" }, targets),
          el("td", { class: "num" }, g.n_nodes),
          el("td", { class: "num" }, g.n_links),
          el("td", { class: "num" }, g.n_supernodes)));
    });
  }

  main().catch((e) => {
    document.getElementById("error").textContent = String(e);
  });
})();
