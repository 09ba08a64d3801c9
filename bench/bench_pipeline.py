"""The real pipeline on SmolLM2 (issue 10): the capitals dataset -> trace -> cluster (k=8, k=16)
-> steer every cluster at factors 0 and 2. Prints the time per stage and the steering table
(which clusters move the traced targets, e.g. " Paris", most).

``python bench/bench_pipeline.py [--n 40] [--threads T] [--out bench/results/pipeline]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="capitals prompts")
    ap.add_argument("--ks", default="8,16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="bench/results/pipeline")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import adag
    from adag.graphs.config import TraceConfig
    from adag.pipeline.cluster import cluster_stage
    from adag.pipeline.steer import steer_stage
    from adag.pipeline.trace import trace_stage
    from adag.tasks.datasets import make_dataset

    times: dict[str, float] = {}
    t = time.perf_counter()
    model = adag.load_model("smollm2-135m")
    times["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    prompts = make_dataset("capitals", model, args.n)
    times["dataset_s"] = time.perf_counter() - t
    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    trace_stage(model, prompts, args.out, TraceConfig(k=5))
    times["trace_s"] = time.perf_counter() - t
    results: dict = {"threads": args.threads, "n_prompts": len(prompts), "times": times}
    for k in [int(x) for x in args.ks.split(",")]:
        t = time.perf_counter()
        c = cluster_stage(args.out, n_clusters=k, force=True)
        times[f"cluster_k{k}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        s = steer_stage(model, args.out, scale=(0.0, 2.0), force=True)
        times[f"steer_k{k}_s"] = time.perf_counter() - t
        results[f"k{k}"] = {
            "n_units": c["n_units"],
            "sizes": c["sizes"],
            "diagnostics": c["diagnostics"],
            "steering": s["summary"],
        }
        print(
            f"k={k}: {c['n_units']} units; cluster {times[f'cluster_k{k}_s']:.1f} s, steer {times[f'steer_k{k}_s']:.1f} s"
        )
        rows = sorted(s["summary"], key=lambda r: r.get("dprob", 0.0))
        for r in rows[:6]:
            print("  ", {key: (round(v, 4) if isinstance(v, float) else v) for key, v in r.items()})
    print(json.dumps(times, indent=1))
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/pipeline.json", "w") as f:
        json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
