"""Clustering at dataset scale (issue 10, "Scale"): ADAG's multi-view similarity and spectral
clustering on synthetic profiles of ``--prompts`` prompts (default 10,000), each with
``--units-per-prompt`` units (400) drawn without replacement from a pool of ``--pool`` units
(50,000) with popularity ∝ 1/rank (real neuron use is that skewed), prompt lengths T of 6-14 and
K = 5 targets. Each unit belongs to one of ``--planted`` hidden groups (each group shares a random
prototype profile per prompt, plus noise), so the clustering's adjusted Rand index says whether the
result means anything.

Reports the time of the similarity and of the spectral clustering, peak RSS
(``resource.getrusage``), the pair occurrences and the number of distinct co-occurring pairs.
``--top-m M`` keeps each unit's M most similar units (the fix for the pair count; 0 = ADAG
exactly) and ``--min-count C`` drops pairs seen on fewer than C prompts.
Prints a one-line summary and writes ``bench/results/clusters.json``.

Run with ``make bench`` or ``OMP_NUM_THREADS=2 python bench/bench_clusters.py [--prompts 10000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_prompts(
    n_prompts: int, per_prompt: int, pool: int, planted: int, seed: int = 0
) -> tuple[list, dict]:
    """Synthetic PromptUnits and each unit's planted group."""
    from adag.clusters.units import PromptUnits

    rng = np.random.default_rng(seed)
    # pool rank -> a unit (layer < 30, neuron < 1536, sign), popularity unrelated to unit order
    space = rng.choice(30 * 1536 * 2, size=pool, replace=False)
    units = [(int(s // 3072), int(s % 3072 // 2), 1 if s % 2 else -1) for s in space]
    group = rng.integers(0, planted, size=pool)
    cdf = np.cumsum(1.0 / np.arange(1, pool + 1))
    cdf /= cdf[-1]
    per_prompt = min(per_prompt, pool)
    prompts = []
    for p in range(n_prompts):
        # the distinct ranks in order of first appearance of i.i.d. draws ∝ 1/rank are exactly
        # successive draws without replacement
        draws = 3 * per_prompt
        while True:
            d = np.searchsorted(cdf, rng.random(draws))
            u, first = np.unique(d, return_index=True)
            if len(u) >= per_prompt:
                break
            draws *= 2
        ranks = np.sort(u[np.argsort(first)[:per_prompt]])
        T, K = int(rng.integers(6, 15)), 5
        g = group[ranks]
        proto_in, proto_out = rng.normal(size=(planted, T)), rng.normal(size=(planted, K))
        proto_in[:, -1] += 2.0
        x = proto_in[g] + 0.8 * rng.normal(size=(len(ranks), T))
        o = proto_out[g] + 0.8 * rng.normal(size=(len(ranks), K))
        order = sorted(range(len(ranks)), key=lambda r: units[ranks[r]])
        prompts.append(
            PromptUnits(
                units=[units[ranks[r]] for r in order],
                inputs=list(x[order]),
                outputs=o[order],
                prompt_id=str(p),
            )
        )
    return prompts, {units[r]: int(group[r]) for r in range(pool)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--units-per-prompt", type=int, default=400)
    ap.add_argument("--pool", type=int, default=50_000)
    ap.add_argument("--n-clusters", type=int, default=16)
    ap.add_argument("--planted", type=int, default=16, help="hidden groups of the synthetic data")
    ap.add_argument("--top-m", type=int, default=64, help="0: ADAG exactly (all pairs)")
    ap.add_argument("--min-count", type=int, default=1)
    ap.add_argument("--diagnostics", action="store_true", help="also time the diagnostics")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "clusters.json"))
    args = ap.parse_args()

    from sklearn.metrics import adjusted_rand_score

    from adag.clusters.similarity import similarity_with_stats
    from adag.clusters.spectral import spectral_labels

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    res: dict = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "omp_num_threads": threads,
        "args": vars(args),
    }
    t = time.perf_counter()
    prompts, group = make_prompts(args.prompts, args.units_per_prompt, args.pool, args.planted)
    res["generate_s"] = time.perf_counter() - t
    res["rss_after_generate_mb"] = peak_mb()

    t = time.perf_counter()
    units, S, stats = similarity_with_stats(
        prompts, top_m=args.top_m or None, min_count=args.min_count
    )
    res["similarity_s"] = time.perf_counter() - t
    res.update({k: v for k, v in stats.items() if k != "seconds"})
    res["stored_nnz"] = int(S.nnz)
    res["S_mb"] = (S.data.nbytes + S.indices.nbytes + S.indptr.nbytes) / 2**20
    res["rss_after_similarity_mb"] = peak_mb()

    t = time.perf_counter()
    labels = spectral_labels(S, args.n_clusters)
    res["spectral_s"] = time.perf_counter() - t
    truth = [group[u] for u in units]
    res["ari_vs_planted"] = float(adjusted_rand_score(truth, labels))
    res["cluster_sizes"] = np.bincount(labels).tolist()
    if args.diagnostics:
        from adag.clusters.diagnostics import diagnostics

        t = time.perf_counter()
        res["diagnostics"] = diagnostics(S, labels, units, prompts)
        res["diagnostics_s"] = time.perf_counter() - t
    res["total_s"] = res["similarity_s"] + res["spectral_s"]
    res["peak_rss_mb"] = peak_mb()
    res["target_met"] = res["total_s"] < 300 and res["peak_rss_mb"] < 8 * 1024

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(
        f"clusters: {args.prompts} prompts x {args.units_per_prompt} units (pool {args.pool}), "
        f"{res['n_units']} units, {res['pair_occurrences']:.3g} pair occurrences, "
        f"{res['distinct_pairs']:.3g} distinct pairs, {res['stored_pairs']:.3g} stored "
        f"(top_m={args.top_m or 'all'}, min_count={args.min_count}); similarity "
        f"{res['similarity_s']:.1f} s + spectral k={args.n_clusters} {res['spectral_s']:.1f} s = "
        f"{res['total_s']:.1f} s, peak RSS {res['peak_rss_mb'] / 1024:.2f} GB, "
        f"ARI vs planted {res['ari_vs_planted']:.3f}, OMP_NUM_THREADS={threads} -> {out}"
    )


if __name__ == "__main__":
    main()
