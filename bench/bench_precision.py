"""Half precision against float32 (issue 15, item 4): SmolLM2 neuron graphs traced in bfloat16
and float16, compared with float32 graphs of the same prompts and the same targets.

Per dtype, over ``--prompts`` capitals prompts (default 8, k = 2 targets, the default
thresholds), it reports:

- **completeness error** ``|1 − Σ embedding attributions / m|`` (SmolLM2 has no biases, so the
  linearised attributions of the embeddings sum to the metric ``m`` exactly in exact
  arithmetic; float32 shows the rounding floor), mean and max;
- **metric error** ``|m_half − m_32| / |m_32|``, mean;
- **node agreement**: the Jaccard index of the kept node sets; Spearman's rank correlation of the
  attributions of the nodes kept in both; the overlap of the 20 most attributed nodes;
- **edge error** over the edges kept in both graphs: ``‖w_half − w_32‖ / ‖w_32‖`` and the median
  of ``|w_half − w_32| / |w_32|``;
- seconds per prompt (on this CPU, half precision is not faster; on a GPU it is the point).

Writes ``bench/results/precision.json``. Run with ``python bench/bench_precision.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(ref: Any, g: Any, top: int = 20) -> dict[str, float]:
    """Agreement of graph ``g`` with the reference ``ref`` (same prompt and targets)."""
    ra = dict(zip(ref.node_ids, ref.node_attribution.astype(np.float64), strict=True))
    ga = dict(zip(g.node_ids, g.node_attribution.astype(np.float64), strict=True))
    units = {i for i, k in zip(ref.node_ids, ref.node_kinds, strict=True) if k == "neuron"}
    units_g = {i for i, k in zip(g.node_ids, g.node_kinds, strict=True) if k == "neuron"}
    both = sorted(units & units_g)
    jac = len(both) / max(1, len(units | units_g))
    rho = spearman(np.array([ra[i] for i in both]), np.array([ga[i] for i in both]))

    def top_ids(d: dict[str, float], keep: set[str]) -> set[str]:
        return set(sorted(keep, key=lambda i: -abs(d[i]))[:top])

    overlap = len(top_ids(ra, units) & top_ids(ga, units_g)) / max(1, min(top, len(units)))

    def edges(x: Any) -> dict[tuple[str, str], float]:
        ids = x.node_ids
        return {
            (ids[s], ids[t]): float(w)
            for s, t, w in zip(x.edge_source, x.edge_target, x.edge_weight, strict=True)
        }

    er, eg = edges(ref), edges(g)
    common = sorted(set(er) & set(eg))
    w32 = np.array([er[e] for e in common])
    wh = np.array([eg[e] for e in common])
    norm = float(np.linalg.norm(wh - w32) / max(np.linalg.norm(w32), 1e-30))
    med = float(np.median(np.abs(wh - w32) / np.maximum(np.abs(w32), 1e-30))) if common else 0.0
    return {
        "metric_err": abs(g.metric - ref.metric) / abs(ref.metric),
        "node_jaccard": jac,
        "node_spearman": rho,
        "top_overlap": overlap,
        "edge_rel_err": norm,
        "edge_median_rel_err": med,
        "edges_common_share": len(common) / max(1, len(er)),
    }


def completeness_err(g: Any) -> float:
    return abs(1.0 - g.summary()["embed_attribution_fraction"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from adag import load_model
    from adag.graphs.config import TraceConfig
    from adag.graphs.trace import prepare, trace_tokens
    from adag.tasks.datasets import make_dataset

    config = TraceConfig(k=2)
    ref_model = load_model("smollm2-135m", dtype="float32")
    specs = make_dataset("capitals", ref_model, args.prompts)
    assembled = prepare(ref_model, [p.prompt for p in specs], [p.seed for p in specs], config)
    t0 = time.perf_counter()
    refs = [trace_tokens(ref_model, ids, config, prompt=text) for text, ids in assembled]
    results: dict[str, Any] = {
        "float32": {
            "s_per_prompt": (time.perf_counter() - t0) / len(refs),
            "completeness_err_mean": float(np.mean([completeness_err(g) for g in refs])),
            "completeness_err_max": float(np.max([completeness_err(g) for g in refs])),
        }
    }
    del ref_model
    for dt in args.dtypes.split(","):
        m = load_model("smollm2-135m", dtype=dt)
        t0 = time.perf_counter()
        graphs = [
            trace_tokens(m, ids, config.updated(targets=[int(t) for t in r.target_ids]), prompt=x)
            for (x, ids), r in zip(assembled, refs, strict=True)
        ]
        secs = (time.perf_counter() - t0) / len(graphs)
        rows = [compare(r, g) for r, g in zip(refs, graphs, strict=True)]
        results[dt] = {
            "s_per_prompt": secs,
            "completeness_err_mean": float(np.mean([completeness_err(g) for g in graphs])),
            "completeness_err_max": float(np.max([completeness_err(g) for g in graphs])),
            **{k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]},
            "worst_edge_rel_err": float(np.max([r["edge_rel_err"] for r in rows])),
        }
        del m
    out = Path(__file__).parent / "results" / "precision.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "prompts": args.prompts,
        "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    print(f"SmolLM2, {args.prompts} capitals prompts, k=2, {args.threads} threads")
    cols = list(results[args.dtypes.split(",")[0]])
    print("dtype     " + " ".join(f"{c:>20}" for c in cols))
    for dt, r in results.items():
        print(f"{dt:<9} " + " ".join(f"{r.get(c, float('nan')):>20.4g}" for c in cols))


if __name__ == "__main__":
    main()
