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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from adag import load_model
    from adag.graphs.compare import compare_graphs, completeness_err
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
            "completeness_err": float(np.mean([completeness_err(g) for g in refs])),
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
        rows = [compare_graphs(r, g) for r, g in zip(refs, graphs, strict=True)]
        results[dt] = {
            "s_per_prompt": secs,
            "completeness_err_max": float(np.max([completeness_err(g) for g in graphs])),
            **{
                k: float(np.nanmean([r[k] for r in rows]))
                for k in rows[0]
                if not k.endswith("_ref")
            },
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
