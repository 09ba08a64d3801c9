"""Tracing benchmark (issue 4): SmolLM2, "The capital of X is" prompts, k=5 — time per prompt,
peak RSS, kept nodes and edges, against naive references measured in the same run:

* ``adag``      — ``adag.trace`` (batched backward passes, ``--batch-size`` targets per pass);
* ``one_bwd``   — the same code with ``batch_size=1``: one backward pass per target node over a
                  kept forward graph;
* ``naive``     — what one writes with hooks: for every target node a fresh forward and backward
                  pass under its own linearisation (target MLP relp, every other MLP stopped for
                  edges; all relp for input profiles). Its edge weights are compared with adag's.

Each method runs in its own process so that peak RSS is its own.
Run with ``make bench`` or ``python bench/bench_trace.py [--prompts 8] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

COUNTRIES = ["France", "Italy", "Germany", "Japan", "Spain", "Egypt", "Canada", "Russia"]


def _naive(model, g) -> tuple[dict[tuple[int, int], float], np.ndarray]:
    """Edges into every kept neuron and logit, and input attributions, one fresh forward and
    backward per target node."""
    from adag.models.linear import linearize

    L = model.n_layers
    posts = [f"blocks.{i}.mlp.hook_post" for i in range(L)]
    emb = "blocks.0.hook_resid_pre"
    tokens = torch.tensor([g.prompt_ids.tolist()])
    rows = {}
    for r, (kind, layer, pos, idx) in enumerate(
        zip(g.node_kinds, g.node_layer, g.node_position, g.node_index, strict=True)
    ):
        rows[(kind, int(layer), int(pos), int(idx))] = r
    neuron_rows = np.flatnonzero(g.mask("neuron"))
    sources = [r for r in range(g.n_nodes) if g.node_kinds[r] in ("embed", "neuron")]
    edges: dict[tuple[int, int], float] = {}
    in_attr = np.zeros((len(neuron_rows), len(g.prompt_ids)))

    def contributions(grads, e_val, posts_val) -> dict[int, float]:
        out = {}
        for s in sources:
            p = int(g.node_position[s])
            if g.node_kinds[s] == "embed":
                out[s] = float((grads[emb][0, p] * e_val[0, p]).sum())
            else:
                layer, i = int(g.node_layer[s]), int(g.node_index[s])
                if posts[layer] in grads:
                    out[s] = float(grads[posts[layer]][0, p, i] * posts_val[layer][0, p, i])
        return out

    for t in [*neuron_rows, *np.flatnonzero(g.mask("logit"))]:
        lt = int(g.node_layer[t])
        rules = ["stop"] * L
        if g.node_kinds[t] == "neuron":
            rules[lt] = "relp"
        with (
            linearize(model, mlp=rules),
            model.sites(read=[emb, *posts[: min(lt + 1, L)]], grad=[emb, *posts[:lt]]) as run,
        ):
            logits = model(tokens)
            if g.node_kinds[t] == "neuron":
                value = run.value(posts[lt])[0, int(g.node_position[t]), int(g.node_index[t])]
            else:
                value = logits[0, -1, int(g.node_index[t])]
            grads = run.grads(value)
            post_vals = {i: run.cache[posts[i]] for i in range(min(lt, L))}
            e_val = run.cache[emb]
        a_t = float(g.node_activation[t])
        for s, c in contributions(grads, e_val, post_vals).items():
            if int(g.node_layer[s]) < lt:
                edges[(s, t)] = c / a_t
    for j, t in enumerate(neuron_rows):
        lt = int(g.node_layer[t])
        with (
            linearize(model, mlp="relp"),
            model.sites(read=[emb, posts[lt]], grad=[emb]) as run,
        ):
            model(tokens)
            value = run.value(posts[lt])[0, int(g.node_position[t]), int(g.node_index[t])]
            ge = run.grads(value)[emb]
            in_attr[j] = (ge[0] * run.cache[emb][0]).sum(-1).numpy()
    return edges, in_attr


def worker(method: str, n_prompts: int, batch_size: int, threads: int, graphs_dir: str) -> None:
    torch.set_num_threads(threads)
    import adag
    from adag.graphs.graph import Graph
    from adag.graphs.trace import trace

    model = adag.load_model("smollm2-135m")
    prompts = [f"The capital of {c} is" for c in COUNTRIES[:n_prompts]]
    trace(model, prompts[0], k=5)  # warm-up
    out: dict = {"method": method, "per_prompt_s": [], "nodes": [], "edges": []}
    t0 = time.perf_counter()
    if method in ("adag", "one_bwd"):
        for i, p in enumerate(prompts):
            t = time.perf_counter()
            (g,) = trace(model, p, k=5, batch_size=batch_size if method == "adag" else 1)
            out["per_prompt_s"].append(time.perf_counter() - t)
            out["nodes"].append(int(g.mask("neuron").sum()))
            out["edges"].append(g.n_edges)
            g.save(os.path.join(graphs_dir, f"{method}-{i}"))
    else:
        worst, worst_in = 0.0, 0.0
        for i in range(len(prompts)):
            g = Graph.load(os.path.join(graphs_dir, f"adag-{i}"))
            t = time.perf_counter()
            edges, in_attr = _naive(model, g)
            out["per_prompt_s"].append(time.perf_counter() - t)
            ours = {
                (int(s), int(tt)): float(w)
                for s, tt, w in zip(g.edge_source, g.edge_target, g.edge_weight, strict=True)
            }
            scale = max(abs(w) for w in ours.values())
            worst = max(worst, max(abs(edges[e] - w) for e, w in ours.items()) / scale)
            # edges adag dropped are below threshold in the naive computation too
            missing = [w for e, w in edges.items() if e not in ours and abs(w) >= 0.01]
            out.setdefault("naive_edges_above_threshold_missing", 0)
            out["naive_edges_above_threshold_missing"] += len(missing)
            ref = g.input_attr[g.mask("neuron")]
            worst_in = max(worst_in, float(np.abs(in_attr - ref).max() / np.abs(ref).max()))
            out["nodes"].append(int(g.mask("neuron").sum()))
            out["edges"].append(len(ours))
        out["max_edge_diff_rel"] = worst
        out["max_input_attr_diff_rel"] = worst_in
    out["total_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--naive-prompts", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--graphs-dir", default=None)
    args = ap.parse_args()
    if args.worker:
        n = args.naive_prompts if args.worker == "naive" else args.prompts
        worker(args.worker, n, args.batch_size, args.threads, args.graphs_dir)
        return
    import tempfile

    results = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as d:
        for method in ("adag", "one_bwd", "naive"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                "--prompts",
                str(args.prompts),
                "--naive-prompts",
                str(args.naive_prompts),
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
                "--graphs-dir",
                d,
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[method] = json.loads(r.stdout.strip().splitlines()[-1])
    a, b, n = results["adag"], results["one_bwd"], results["naive"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    k = len(n["per_prompt_s"])
    results["speedup_vs_one_backward_per_target"] = mean(b["per_prompt_s"]) / mean(
        a["per_prompt_s"]
    )
    results["speedup_vs_naive_same_prompts"] = mean(n["per_prompt_s"]) / mean(a["per_prompt_s"][:k])
    print(json.dumps(results, indent=1))
    print(
        f"adag {mean(a['per_prompt_s']):.2f} s/prompt ({a['peak_rss_mb']:.0f} MB peak), "
        f"one backward per target {mean(b['per_prompt_s']):.2f} s/prompt "
        f"({b['peak_rss_mb']:.0f} MB) -> {results['speedup_vs_one_backward_per_target']:.1f}x; "
        f"naive fresh pass per target {mean(n['per_prompt_s']):.2f} s/prompt "
        f"({n['peak_rss_mb']:.0f} MB) -> {results['speedup_vs_naive_same_prompts']:.1f}x; "
        f"neurons {mean(a['nodes']):.0f}/prompt, edges {mean(a['edges']):.0f}/prompt; "
        f"naive vs adag edges: max rel diff {n['max_edge_diff_rel']:.2e}"
    )


if __name__ == "__main__":
    main()
