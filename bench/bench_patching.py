"""Localisation benchmark (issue 3): exhaustive activation patching vs AtP vs AtP* on SmolLM2 IOI.

Nodes: every z head at every position and every neuron summed over positions (30 x 9 x T +
30 x 1536 per pair). Exhaustive patching of all of them costs ~50k forward passes per pair (hours
per pair on a 2-core CPU), so the ground truth is computed on a subset — all z heads plus the
neurons of ``--neuron-layers`` — and its wall time for the full node set is projected from the
measured time per patched forward. The estimators always run on the full node set, and their ranks
are taken among *all* nodes, so recall is not flattered by the subset.

``python bench/bench_patching.py [--n-pairs 5] [--neuron-layers 0,15,29] [--threads T]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-pairs", type=int, default=5)
    ap.add_argument("--neuron-layers", default="0,15,29")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="bench/results/patching.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import adag
    from adag.patching import atp, exhaustive
    from adag.patching.baselines import rank_by_magnitude
    from adag.patching.node_sets import Group
    from adag.tasks import make_task, tokenize_pairs

    model = adag.load_model("smollm2-135m")
    pairs = tokenize_pairs(model, make_task("ioi", model, args.n_pairs, seed=0))
    lengths = sorted({p.clean.shape[1] for p in pairs})
    full_nodes_per_pair = [
        model.n_layers * (model.n_heads * p.clean.shape[1] + model.d_mlp) for p in pairs
    ]
    layers = [int(x) for x in args.neuron_layers.split(",") if x]

    def subset(t: int) -> list[Group]:
        heads = [Group("head", lay, "z", True, (model.n_heads, t)) for lay in range(model.n_layers)]
        return heads + [Group("neuron", lay, None, False, (model.d_mlp,)) for lay in layers]

    res: dict[str, object] = {
        "threads": torch.get_num_threads(),
        "n_pairs": len(pairs),
        "lengths": lengths,
    }
    est = {}
    for name, kw in (
        ("atp", {}),
        ("atp_qk", {"qk_fix": True}),
        ("atp_star", {"qk_fix": True, "grad_drop": True}),
    ):
        t = time.perf_counter()
        est[name] = atp(model, pairs, nodes="heads,neurons", **kw)
        res[f"{name}_s"] = time.perf_counter() - t
        print(f"{name}: {res[f'{name}_s']:.1f} s over {len(est[name].nodes)} nodes", flush=True)

    truth_rows = 0
    t = time.perf_counter()
    per_pair = []
    for p in pairs:
        gt = exhaustive(model, [p], nodes=subset(p.clean.shape[1]), batch_size=args.batch_size)
        per_pair.append(gt)
        truth_rows += len(gt.nodes)
        print(
            f"  exhaustive pair {len(per_pair)}/{len(pairs)}: {len(gt.nodes)} nodes, {gt.seconds:.0f} s",
            flush=True,
        )
    truth_s = time.perf_counter() - t
    s_per_row = truth_s / truth_rows
    res.update(
        exhaustive_subset_s=truth_s,
        exhaustive_subset_nodes=truth_rows,
        seconds_per_patched_forward=s_per_row,
        exhaustive_full_projected_s=s_per_row * sum(full_nodes_per_pair),
        full_nodes=sum(full_nodes_per_pair),
    )
    # mean effect over pairs, by node id (a node absent from a pair counts 0 there, as in NodeScores)
    ids: dict[str, int] = {}
    for gt in per_pair:
        for n in gt.nodes:
            ids.setdefault(n, len(ids))
    effects = np.zeros(len(ids))
    for gt in per_pair:
        effects[[ids[n] for n in gt.nodes]] += gt.estimate / len(pairs)
    truth_ids = list(ids)
    order_true = np.argsort(-np.abs(effects), kind="stable")
    for name, sc in est.items():
        score = np.abs(sc.estimate)
        rank_all = np.empty(len(score), dtype=np.int64)
        rank_all[rank_by_magnitude(score)] = np.arange(len(score))
        pos = {n: i for i, n in enumerate(sc.nodes)}
        ranks = np.array([rank_all[pos[truth_ids[i]]] for i in order_true[:50]])
        res[name] = {
            "seconds": res[f"{name}_s"],
            "recall_top20_in_top40": float((ranks[:20] < 40).mean()),
            "true_top50_ranked_below_500": int((ranks >= 500).sum()),
            "speedup_vs_exhaustive_full_projected": res["exhaustive_full_projected_s"]
            / res[f"{name}_s"],
            "speedup_vs_exhaustive_subset_measured": truth_s / res[f"{name}_s"],
            "worst_rank_of_true_top20": int(ranks[:20].max()),
        }
    res["true_top10"] = [(truth_ids[i], float(effects[i])) for i in order_true[:10]]
    # keep the per-node numbers for analysis (ground truth on the subset, estimates on all nodes)
    import pyarrow as pa

    from adag.io import write_parquet

    base = os.path.splitext(args.out)[0]
    write_parquet(pa.table({"node": truth_ids, "effect": effects}), base + "-truth.parquet")
    for name, sc in est.items():
        sc.save(base + f"-{name}.parquet")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
