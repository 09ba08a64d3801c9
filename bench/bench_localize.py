"""Localisation benchmark (issue 13): fast exact patching, and AtP / AtP* / AtP-IG / downstream-QK /
``localize`` against exhaustive patching on SmolLM2 IOI — the pairs and node set of the AtP*
benchmark (``bench/bench_patching.py``): every z head at every position and every neuron summed
over positions, 4 pairs.

1. Exact patching speed: every head at every position of the 15-token pair (4,050 patches),
   resumed forwards (now) against full forwards (before; every 10th patch, projected), 1 thread.
2. Ground truth on a subset (all heads + the neurons of ``--neuron-layers``), its full cost
   projected (per-layer neuron time fitted linearly in the layer, since a neuron patch is resumed
   at its layer); estimators on the full node set, ranks among all nodes.
3. The one-pair heads-only case.

``python bench/bench_localize.py [--n-pairs 4] [--neuron-layers 0,15,29] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch


def _metrics(order: np.ndarray, pos_of: dict[str, int], nodes: list[str], truth_top: list[str]):
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    r = [int(rank[pos_of[n]]) for n in truth_top[:20]]
    top10 = {nodes[i] for i in order[:10]}
    return {
        "recall_top20_in_top40": float(np.mean([x < 40 for x in r])),
        "worst_rank_top20": max(r) + 1,
        "top10_hit_rate": float(np.mean([n in top10 for n in truth_top[:10]])),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-pairs", type=int, default=4)
    ap.add_argument("--neuron-layers", default="0,15,29")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--only-speed", action="store_true")
    ap.add_argument("--out", default="bench/results/localize.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import adag
    from adag.patching import atp, exhaustive
    from adag.patching.baselines import rank_by_magnitude
    from adag.patching.dqk import atp_dqk
    from adag.patching.ig import atp_ig
    from adag.patching.localize import atp_linear, localize
    from adag.patching.node_sets import Group, node_set
    from adag.patching.patch import PairPatcher
    from adag.patching.scores import align_ids
    from adag.tasks import make_metric, make_task, tokenize_pairs

    model = adag.load_model("smollm2-135m")
    pairs = tokenize_pairs(model, make_task("ioi", model, args.n_pairs, seed=0))
    res: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "n_pairs": len(pairs),
        "lengths": [p.n_pos for p in pairs],
        "first_differing_position": [int((p.clean != p.noise)[0].nonzero()[0]) for p in pairs],
    }

    # 1. exact patching speed -----------------------------------------------------------------
    if not args.skip_speed:
        tp = next(p for p in pairs if p.n_pos == 15)
        ns = node_set(model, "heads", tp.n_pos)
        pp = PairPatcher(model, tp, ns, make_metric(None))
        rows = [np.array([i]) for i in range(len(ns))]
        t = time.perf_counter()
        fast = pp.effects(rows, batch_size=args.batch_size)
        fast_s = time.perf_counter() - t
        sub = rows[::10]
        t = time.perf_counter()
        full = pp._full_effects(sub, batch_size=32)
        full_s = (time.perf_counter() - t) * len(rows) / len(sub)
        res["speed"] = {
            "patches": len(rows),
            "resumed_s": fast_s,
            "full_forward_s_projected": full_s,
            "speedup": full_s / fast_s,
            "max_abs_diff": float(np.abs(fast[::10] - full).max()),
            "max_abs_effect": float(np.abs(full).max()),
        }
        print("speed", json.dumps(res["speed"]), flush=True)
        if args.only_speed:
            return

    # 2. estimators on the full node set --------------------------------------------------------
    nodes = "heads,neurons"
    est: dict[str, Any] = {}
    t = time.perf_counter()
    star = atp(model, pairs, nodes=nodes, qk_fix=True, grad_drop=True)
    res["atp_star_s"] = time.perf_counter() - t
    t = time.perf_counter()
    plain = atp(model, pairs, nodes=nodes)
    res["atp_s"] = time.perf_counter() - t
    est["atp"], est["atp_star"] = plain, star
    for name, fn in (("atp_ig", atp_ig), ("atp_dqk", atp_dqk), ("atp_linear", atp_linear)):
        t = time.perf_counter()
        est[name] = fn(model, pairs, nodes=nodes)
        res[f"{name}_s"] = time.perf_counter() - t
        print(f"{name}: {res[f'{name}_s']:.1f} s, cost {est[name].cost:.0f}", flush=True)

    layers = [int(x) for x in args.neuron_layers.split(",") if x]

    def subset(t: int) -> list[Group]:
        heads = [Group("head", lay, "z", True, (model.n_heads, t)) for lay in range(model.n_layers)]
        return heads + [Group("neuron", lay, None, False, (model.d_mlp,)) for lay in layers]

    truth_parts: list[list[Any]] = []  # per pair: its exhaustive tables
    head_s = 0.0
    neuron_s = {lay: 0.0 for lay in layers}
    for p in pairs:
        t = time.perf_counter()
        heads = subset(p.n_pos)[: model.n_layers]
        parts = [exhaustive(model, [p], nodes=heads, batch_size=args.batch_size)]
        head_s += time.perf_counter() - t
        for lay in layers:
            t = time.perf_counter()
            g = [Group("neuron", lay, None, False, (model.d_mlp,))]
            parts.append(exhaustive(model, [p], nodes=g, batch_size=args.batch_size))
            neuron_s[lay] += time.perf_counter() - t
        truth_parts.append(parts)
        print(f"truth pair done: heads {head_s:.0f} s, neurons {neuron_s}", flush=True)
    # mean over pairs per node, the ids aligned across pairs as the estimators' are (by role
    # when the pairs differ in length)
    per_pair_ids = [[n for part in parts for n in part.nodes] for parts in truth_parts]
    per_pair_vals = [np.concatenate([part.per_pair[0] for part in parts]) for parts in truth_parts]
    acc: dict[str, float] = {}
    for ids, vals in zip(align_ids(per_pair_ids, pairs), per_pair_vals, strict=True):
        for n, v in zip(ids, vals, strict=True):
            acc[n] = acc.get(n, 0.0) + v / len(pairs)
    truth_nodes = list(acc)
    truth_vals = np.array([acc[n] for n in truth_nodes])
    truth_top = [truth_nodes[i] for i in rank_by_magnitude(truth_vals)[:50]]
    fit = np.polyfit(layers, [neuron_s[lay] for lay in layers], 1) if len(layers) > 1 else None
    all_neurons_s = (
        float(sum(np.polyval(fit, lay) for lay in range(model.n_layers)))
        if fit is not None
        else float("nan")
    )
    n_full = sum(model.n_layers * (model.n_heads * p.n_pos + model.d_mlp) for p in pairs)
    res["truth"] = {
        "measured_s": head_s + sum(neuron_s.values()),
        "heads_s": head_s,
        "neurons_s_by_layer": neuron_s,
        "projected_full_s": head_s + all_neurons_s,
        "full_cost_forwards": n_full + 2 * len(pairs),
        "top20": [(n, acc[n]) for n in truth_top[:20]],
    }
    print("truth", json.dumps(res["truth"])[:400], flush=True)

    ids = star.nodes
    pos_of = {n: i for i, n in enumerate(ids)}
    full_cost = res["truth"]["full_cost_forwards"]
    table: dict[str, Any] = {}
    for name in ("atp", "atp_star", "atp_ig", "atp_dqk", "atp_linear"):
        r = est[name].reindex(ids)
        key = "atp_qk" if name == "atp_qk" else name
        table[key] = {
            **_metrics(rank_by_magnitude(r.estimate), pos_of, ids, truth_top),
            "seconds": res[f"{name}_s"],
            "cost": r.cost,
            "cost_vs_exhaustive": full_cost / r.cost,
        }
    qk = star.columns["atp_qk"]
    table["atp_qk"] = {
        **_metrics(rank_by_magnitude(qk), pos_of, ids, truth_top),
        "seconds": float("nan"),
        "cost": star.cost,
    }
    for budget in (None, 2000.0):
        t = time.perf_counter()
        loc = localize(
            model,
            pairs,
            nodes,
            estimators=("atp_star", "atp_ig", "atp_dqk", "atp_linear"),
            results={k: est[k] for k in ("atp_star", "atp_ig", "atp_dqk", "atp_linear")},
            batch_size=args.batch_size,
            budget=budget,
        )
        secs = (
            time.perf_counter()
            - t
            + sum(res[f"{k}_s"] for k in ("atp_star", "atp_ig", "atp_dqk", "atp_linear"))
        )
        r = loc.reindex(ids)
        name = "localize" if budget is None else f"localize_budget{int(budget)}"
        table[name] = {
            **_metrics(r.order(), pos_of, ids, truth_top),
            "seconds": secs,
            "cost": loc.cost,
            "cost_vs_exhaustive": full_cost / loc.cost,
            "n_checked": loc.meta["n_checked"],
            "stopped": loc.meta["stopped"],
            "cost_parts": loc.meta["cost_parts"],
        }
        print(name, json.dumps(table[name]), flush=True)
    res["table"] = table

    # 3. one pair, heads only -------------------------------------------------------------------
    one = [pairs[0]]
    t = time.perf_counter()
    gt = exhaustive(model, one, nodes="heads", batch_size=args.batch_size)
    one_truth_s = time.perf_counter() - t
    top = [gt.nodes[i] for i in gt.order()[:50]]
    o_ids = gt.nodes
    o_pos = {n: i for i, n in enumerate(o_ids)}
    one_tab: dict[str, Any] = {"exhaustive_s": one_truth_s, "top20": gt.top(20)}
    o_est = {
        "atp_star": atp(model, one, nodes="heads", qk_fix=True, grad_drop=True),
        "atp_ig": atp_ig(model, one, nodes="heads"),
        "atp_dqk": atp_dqk(model, one, nodes="heads"),
    }
    o_est["atp"] = o_est["atp_dqk"]
    for name, r in o_est.items():
        vec = r.reindex(o_ids)
        scores = vec.columns["atp"] if name == "atp" else vec.estimate
        one_tab[name] = _metrics(rank_by_magnitude(scores), o_pos, o_ids, top)
    loc1 = localize(
        model,
        one,
        "heads",
        results=o_est,
        batch_size=args.batch_size,
        estimators=("atp_star", "atp_ig", "atp_dqk"),
    )
    one_tab["localize"] = {
        **_metrics(loc1.reindex(o_ids).order(), o_pos, o_ids, top),
        "cost": loc1.cost,
        "n_checked": loc1.meta["n_checked"],
    }
    one_tab["exhaustive_cost"] = len(o_ids) + 2
    res["one_pair_heads"] = one_tab
    print("one pair", json.dumps(one_tab)[:1500], flush=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
