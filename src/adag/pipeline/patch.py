"""The ``patch`` stage (``adag patch``): run localisation methods over prompt pairs and write their
tables, plots and (with :func:`evaluate`) the cost-versus-recall evaluation against ground truth
into ``RUN_DIR/patching/``.

Resume: a method's table ``RUN_DIR/patching/<method>.parquet`` is reused when its sidecar key
(:func:`patch_key`) matches — same model, dtype, method, node set, metric and pair tokens.
``batch_size`` is not part of the key: it changes how many patched copies share a forward pass,
not the effects (up to float rounding). ``force`` recomputes a current table. Temp files a killed
run left in ``patching/`` are removed at the start; the directory itself is only created with
its first file, so an interrupted run leaves no empty ``patching/``.

Each table has a ``position`` column naming a node's position by its role and token
(:func:`position_names`: ``IO ' Mary' (varies)``, ``END ' to'``), which the plot shows next to the
id. Over pairs of different lengths the ids themselves are aligned by role
(:func:`adag.patching.scores.merge_pairs`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adag.errors import AdagError
from adag.io import remove, save_figure, write_parquet, write_text
from adag.patching.atp import atp
from adag.patching.baselines import rank_by_magnitude
from adag.patching.patch import PatchingOracle, exhaustive, tokenized
from adag.patching.scores import NodeScores
from adag.pipeline import rundir
from adag.pipeline.dist import Dist
from adag.pipeline.resume import config_hash, is_current, key_path, write_key

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.tasks.pairs import TokenizedPair

ESTIMATORS: dict[str, dict[str, bool]] = {
    "atp": {},
    "atp_qk": {"qk_fix": True},
    "atp_graddrop": {"grad_drop": True},
    "atp_star": {"qk_fix": True, "grad_drop": True},
}
OTHER_ESTIMATORS = ("atp_ig", "layer_ig", "atp_dqk", "atp_linear")
"""Estimators with their own functions: AtP-IG, per-layer IG, the downstream QK fix, AtP under
the linearised backward."""
ABLATIONS = ("ablate_zero", "ablate_mean", "ablate_resample")
METHODS = (
    *ESTIMATORS,
    *OTHER_ESTIMATORS,
    "localize",
    "exhaustive",
    "exhaustive_denoising",
    *ABLATIONS,
)
BASELINES = ("iterative", "subsampling", "blocks", "hierarchical")
SHARDABLE = (*ESTIMATORS, *OTHER_ESTIMATORS, "exhaustive", "exhaustive_denoising")
"""Methods whose per-pair scores depend on that pair alone, so ``torchrun`` ranks can split the
pairs (:func:`patch_command`); the ablations (a mean or a resample over all pairs) and
``localize`` (adaptive over all pairs) run on rank 0."""


def run_method(
    model: Model,
    pairs: Sequence[object],
    method: str,
    *,
    nodes: str = "heads",
    metric: Any = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> NodeScores:
    """One method by name (see :data:`METHODS`)."""
    if method in ESTIMATORS:
        opts = ESTIMATORS[method]
        return atp(
            model,
            pairs,
            nodes=nodes,
            metric=metric,
            progress=progress,
            qk_fix=opts.get("qk_fix", False),
            grad_drop=opts.get("grad_drop", False),
        )
    if method in OTHER_ESTIMATORS:
        from adag.patching.dqk import atp_dqk
        from adag.patching.ig import atp_ig, layer_ig
        from adag.patching.localize import atp_linear

        fn: dict[str, Callable[..., NodeScores]] = {
            "atp_ig": atp_ig,
            "layer_ig": layer_ig,
            "atp_dqk": atp_dqk,
            "atp_linear": atp_linear,
        }
        return fn[method](model, pairs, nodes=nodes, metric=metric, progress=progress)
    if method == "localize":
        from adag.patching.localize import localize

        return localize(
            model, pairs, nodes, metric=metric, batch_size=batch_size, progress=progress
        )
    if method in ABLATIONS:
        from adag.patching.ablate import ablate

        return ablate(
            model,
            pairs,
            nodes=nodes,
            metric=metric,
            kind=method.removeprefix("ablate_"),  # type: ignore[arg-type]
            batch_size=batch_size,
            progress=progress,
        )
    if method in ("exhaustive", "exhaustive_denoising"):
        direction = "denoising" if method.endswith("denoising") else "noising"
        return exhaustive(
            model,
            pairs,
            nodes=nodes,
            metric=metric,
            direction=direction,  # type: ignore[arg-type]
            batch_size=batch_size,
            progress=progress,
        )
    raise AdagError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _token_text(model: Model, token_id: int) -> str:
    if model.tokenizer is None:
        return f"#{token_id}"
    return repr(model.tokenizer.decode([token_id]))


def position_names(
    model: Model, node_ids: Sequence[str], pairs: Sequence[TokenizedPair]
) -> list[str]:
    """The position of each node id in words, for the table's ``position`` column and the plot:
    its role, or else the position as the id writes it, then the clean prompt's token there in
    the first pair, with ``(varies)`` when the pairs' tokens there differ: ``IO ' Mary'
    (varies)`` (``@IO``), ``END ' to'``, ``-3 ' a'``, ``S2 ' John' (varies)`` (an absolute
    position that is ``S2`` in every pair), ``7 ' the'`` (one without a common role). ``*``
    positions are ``all positions``; ids without a position (logits) get ``""``."""
    from adag.nodes import pos_field

    inverse = [{p: r for r, p in (tp.roles or {}).items()} for tp in pairs]
    cache = {"*": "all positions"}

    def name(field: str) -> str:
        where: list[int | None]  # the position in each pair (None: it has none)
        role: str | None
        if field.startswith("@"):
            role = field[1:]
            where = [None if tp.roles is None else tp.roles.get(role) for tp in pairs]
        else:
            k = int(field)
            where = []
            for tp, inv in zip(pairs, inverse, strict=True):
                p = k + tp.n_pos if k < 0 else k
                # -K (aligned) is not a pair's named slot: the table calls that one by its role
                where.append(p if 0 <= p < tp.n_pos and (k >= 0 or p not in inv) else None)
            roles = {inv.get(p) for p, inv in zip(where, inverse, strict=True) if p is not None}
            role = roles.pop() if len(roles) == 1 else None
        tokens = [int(tp.clean[0, p]) for p, tp in zip(where, pairs, strict=True) if p is not None]
        head = role if role is not None else field
        if not tokens:
            return f"{head} (in no pair)"
        text = f"{head} {_token_text(model, tokens[0])}"
        return text + (" (varies)" if len(set(tokens)) > 1 else "")

    out = []
    for node_id in node_ids:
        field = pos_field(node_id)
        if field is None:  # a logit
            out.append("")
            continue
        if field not in cache:
            cache[field] = name(field)
        out.append(cache[field])
    return out


def save_table(scores: NodeScores, path: Path, positions: Sequence[str] | None = None) -> Path:
    """``scores`` as parquet (atomic), with a ``position`` column when ``positions`` (one per
    node, :func:`position_names`) is given."""
    table = scores.to_arrow()
    if positions is not None:
        import pyarrow as pa

        table = table.append_column("position", pa.array(list(positions), pa.string()))
    return write_parquet(table, path)


def plot_top_nodes(
    scores: NodeScores,
    path: Path,
    *,
    k: int = 30,
    positions: Mapping[str, str] | None = None,
) -> Path:
    """A horizontal bar chart of the ``k`` nodes with the largest ``|estimate|`` (PNG, atomic);
    with ``positions`` (node id -> :func:`position_names`), each label names its position too."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = scores.top(k)
    fig = Figure(figsize=(7, 0.25 * len(top) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [f"{n}  {positions[n]}" if positions and positions.get(n) else n for n, _ in top][::-1]
    vals = [v for _, v in top][::-1]
    ax.barh(names, vals, color=["tab:blue" if v >= 0 else "tab:red" for v in vals])
    ax.set_xlabel("estimate (mean over pairs)")
    ax.set_title(f"{scores.method}: top {len(top)} nodes")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def evaluate(
    model: Model,
    pairs: Sequence[object],
    out_dir: Path,
    *,
    nodes: str = "heads",
    metric: Any = None,
    estimators: Sequence[str] = ("atp", "atp_qk", "atp_star", "atp_ig", "atp_dqk", "localize"),
    baselines: Sequence[str] = BASELINES,
    batch_size: int = 32,
    bound_ks: Sequence[int] = (0, 10, 20, 50, 100),
    bound_subsets: int = 200,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Estimators and baselines against exhaustive patching: writes every table, ``curves.parquet``
    / ``curves.png`` (cost to find the true top-x nodes), ``bound.parquet`` (θ against K for the
    AtP*, or else the last estimator before ``localize``) and ``evaluation.json`` (recall, ranks, costs, times).
    ``localize`` reuses the estimators already run here; its curve follows its check order."""
    from adag.patching import baselines as bl
    from adag.patching.bound import bound_curve
    from adag.patching.evaluate import (
        curves,
        curves_table,
        plot_curves,
        rank_of_true_top,
        recall_at,
        write_curves,
    )

    say = progress or (lambda _msg: None)
    toks = tokenized(model, pairs)  # validate before anything is written
    # every table is recomputed: what an interrupted evaluation kept is not reused
    rundir.progress.begin("tables", 1 + len(estimators), out_dir, resumable=False)
    say("ground truth (exhaustive patching)")
    truth = exhaustive(model, toks, nodes=nodes, metric=metric, batch_size=batch_size)
    positions = position_names(model, truth.nodes, toks)
    save_table(truth, out_dir / "exhaustive.parquet", positions)
    rundir.progress.advance()
    effects = truth.estimate
    n_pairs = len(toks)
    results = []
    summary: dict[str, Any] = {
        "n_pairs": n_pairs,
        "n_nodes": len(truth.nodes),
        "nodes": nodes,
        "exhaustive": {"seconds": truth.seconds, "cost": truth.cost},
    }
    done: dict[str, NodeScores] = {}
    for name in estimators:
        say(name)
        if name == "localize":
            from adag.patching.localize import localize

            loc = localize(model, toks, nodes, metric=metric, batch_size=batch_size, results=done)
            est = loc.reindex(truth.nodes)
            seq = [truth.nodes.index(loc.nodes[i]) for i in loc.meta["sequence"]]
            checked = np.zeros(len(truth.nodes), dtype=bool)
            checked[seq] = True
            rest = est.order()[~checked[est.order()]]
            spent = loc.cost - loc.meta["cost_parts"]["verification"]
            cum = np.concatenate(
                [
                    spent + np.asarray(loc.meta["cum_cost"], dtype=np.float64),
                    loc.cost + n_pairs * np.arange(1, rest.size + 1, dtype=np.float64),
                ]
            )
            results.append(
                bl.MethodResult(
                    name, np.concatenate([seq, rest]).astype(np.int64), spent, None, cum
                )
            )
            scores = np.abs(est.estimate)
        else:
            est = run_method(model, toks, name, nodes=nodes, metric=metric)
            done[name] = est
            est = est.reindex(truth.nodes)
            scores = np.abs(est.estimate)
            results.append(bl.estimator(name, scores, est.cost))
        save_table(est, out_dir / f"{name}.parquet", positions)
        rundir.progress.advance()
        top_true = min(20, len(effects))
        ranks = rank_of_true_top(scores, effects, top_true=min(50, len(effects)))
        summary[name] = {
            "seconds": est.seconds,
            "cost": est.cost,
            "speedup_vs_exhaustive": truth.seconds / max(est.seconds, 1e-9),
            "recall_top20_in_top40": recall_at(
                scores, effects, top_true=top_true, within=2 * top_true
            ),
            "true_top50_ranked_below_500": int((ranks >= 500).sum()),
        }
    oracle = PatchingOracle(model, toks, nodes=nodes, metric=metric, batch_size=batch_size)
    for name in baselines:
        say(name)
        if name == "iterative":
            results.append(bl.iterative(oracle, seed=seed))
        elif name == "subsampling":
            results.append(
                bl.subsampling(oracle, n_samples=max(50, oracle.n_nodes // 4), seed=seed)
            )
        elif name == "blocks":
            results.append(bl.blocks(oracle, block_size=16, seed=seed))
        elif name == "hierarchical":
            results.append(bl.hierarchical(oracle, branching=4, seed=seed))
        else:
            raise AdagError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    xs = np.arange(1, min(50, len(effects)) + 1)
    cv = curves(results, effects, n_pairs=n_pairs, xs=xs)
    write_curves(curves_table(cv, xs), out_dir / "curves.parquet")
    plot_curves(
        cv, xs, out_dir / "curves.png", title=f"cost to find the top-x true nodes ({nodes})"
    )
    if estimators:
        say("false-negative bound")
        plain = [e for e in estimators if e != "localize"] or list(estimators)
        which = "atp_star" if "atp_star" in plain else plain[-1]
        first = next(r for r in results if r.name == which)
        ks = [k for k in bound_ks if k <= len(effects)]
        bounds = bound_curve(oracle, first.order, ks, n_subsets=bound_subsets, seed=seed)
        import pyarrow as pa

        table = pa.table(
            {
                "k": [b.k for b in bounds],
                "theta": [b.theta for b in bounds],
                "alpha": [b.alpha for b in bounds],
                "cost": [b.cost for b in bounds],
                "true_max_unverified": [
                    float(np.abs(np.delete(effects, first.order[: b.k])).max())
                    if b.k < len(effects)
                    else 0.0
                    for b in bounds
                ],
            }
        )
        write_parquet(table, out_dir / "bound.parquet")
        summary["bound"] = table.to_pylist()
    write_text(out_dir / "evaluation.json", json.dumps(summary, indent=2, default=float))
    return summary


def pairs_hash(pairs: Sequence[TokenizedPair]) -> str:
    """A hash of what the model sees of the pairs: clean and noise token ids, answer and foil ids
    (the same text under another tokenizer hashes differently), and the roles of the pairs that
    name some (they decide the ids over pairs of different lengths; a pair without roles hashes
    as before roles existed)."""
    rows = []
    for tp in pairs:
        row: list[Any] = [tp.clean.tolist(), tp.noise.tolist(), tp.answer_id, tp.foil_id]
        if tp.roles is not None:
            row.append(dict(tp.roles))
        rows.append(row)
    return config_hash({"pairs": rows})


def patch_key(
    model: Model, pairs: Sequence[TokenizedPair], *, method: str, nodes: str, metric: str | None
) -> dict[str, Any]:
    """The settings that decide a method's table (its resume key)."""
    from adag.tasks.pairs import make_metric

    return {
        "stage": "patch",
        "model": model.name,
        "architecture": model.spec.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
        "method": method,
        "nodes": nodes,
        "metric": make_metric(metric).name,
        "pairs": pairs_hash(pairs),
    }


def _saved_top(path: Path, k: int) -> tuple[list[tuple[str, float]], list[str]] | None:
    """The top-``k`` nodes by ``|estimate|`` of a saved table and their ``position`` names, or
    None if it cannot be read or has no ``position`` column (a table of an older version)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["node", "estimate", "position"])
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None
    nodes = table.column("node").to_pylist()
    est = table.column("estimate").to_numpy()
    pos = table.column("position").to_pylist()
    order = rank_by_magnitude(est)[:k]
    return [(nodes[i], float(est[i])) for i in order], [pos[i] for i in order]


def _merge_shards(
    method: str, shards: Sequence[Sequence[tuple[int, NodeScores]]], toks: Sequence[TokenizedPair]
) -> NodeScores:
    """One table from every rank's single-pair scores: the pairs back in their order, merged as
    the method merges its pairs (:func:`merge_pairs`, aligning ids by role when lengths
    differ); the cost is the sum, the seconds the slowest pair's sum per rank."""
    from adag.patching.scores import merge_pairs

    by_pair = dict(item for shard in shards for item in shard)
    parts = [by_pair[j] for j in range(len(toks))]
    names = list(parts[0].columns)
    out = merge_pairs(
        parts[0].method,
        [(p.nodes, p.per_pair[0]) for p in parts],
        float(sum(p.cost for p in parts)),
        {k: [p.columns[k] for p in parts] for k in names} if names else None,
        pairs=list(toks),
    )
    out.seconds = max(sum(p.seconds for _, p in shard) for shard in shards)
    return out


def patch_command(
    model: Model,
    pairs: Sequence[object],
    out: Path,
    *,
    method: str,
    nodes: str,
    metric: str | None = None,
    batch_size: int = 32,
    evaluate_all: bool = False,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """What ``adag patch`` does: one method's table and plot (reused when current and not
    ``force``: ``"reused": true``), or the whole evaluation (``evaluate_all``, always
    recomputed). ``"stale_temps"``: the temp files of a killed run it deleted; ``"top"``: the
    top 10 (node, estimate), ``"top_positions"``: their positions in words
    (:func:`position_names`).

    ``dist`` (under ``torchrun``; every rank calls this): for a method of :data:`SHARDABLE`,
    rank ``r`` scores the pairs ``j % world == r`` one by one, rank 0 gathers the per-pair
    scores and merges them in pair order with the method's own :func:`merge_pairs`, so the
    table equals one process's; other methods and ``evaluate_all`` run on rank 0 alone. Only
    rank 0 writes; the others return ``{"shard": [rank, world], "pairs": n}``."""
    d = dist or Dist()
    if d.active and (evaluate_all or method not in SHARDABLE):
        if not d.main:
            d.barrier()
            return {"shard": [d.rank, d.world], "pairs": 0}
        try:
            return patch_command(
                model,
                pairs,
                out,
                method=method,
                nodes=nodes,
                metric=metric,
                batch_size=batch_size,
                evaluate_all=evaluate_all,
                progress=progress,
                force=force,
            )
        finally:
            d.barrier()
    started = time.time()
    if method not in METHODS:
        raise AdagError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    out_dir = rundir.check_writable(out, dirs=("patching",)) / "patching"
    temps = [str(p) for p in rundir.remove_stale_temps(out_dir, started)]
    t0 = time.perf_counter()
    if evaluate_all:
        summary = evaluate(
            model,
            pairs,
            out_dir,
            nodes=nodes,
            metric=metric,
            batch_size=batch_size,
            progress=progress,
        )
        return {**summary, "stale_temps": temps}
    toks = tokenized(model, pairs)  # validate before anything is written
    key = patch_key(model, toks, method=method, nodes=nodes, metric=metric)
    table, plot = out_dir / f"{method}.parquet", out_dir / f"{method}.png"
    current = not force and is_current(table, key) and plot.exists()
    saved = _saved_top(table, 10) if current else None
    if d.active:
        reused_on_0 = d.gather(saved is not None)[0]
        if reused_on_0 and not d.main:
            return {"shard": [d.rank, d.world], "pairs": 0}
        if not reused_on_0:
            saved = None
    reused = saved is not None
    rundir.progress.begin("tables", 1, out_dir, kept=int(reused))
    if saved is None:
        if d.active:
            mine = [
                (
                    j,
                    run_method(
                        model, [tp], method, nodes=nodes, metric=metric, batch_size=batch_size
                    ),
                )
                for j, tp in enumerate(toks)
                if d.owns(j)
            ]
            shards = d.gather(mine)
            if not d.main:
                return {"shard": [d.rank, d.world], "pairs": len(mine)}
            scores = _merge_shards(method, shards, toks)
        else:
            scores = run_method(
                model, toks, method, nodes=nodes, metric=metric, batch_size=batch_size
            )
        positions = position_names(model, scores.nodes, toks)
        where = dict(zip(scores.nodes, positions, strict=True))
        remove(key_path(table))  # a new table must never sit beside an old key
        save_table(scores, table, positions)
        plot_top_nodes(scores, plot, positions=where)
        write_key(table, key)
        rundir.progress.advance()
        top = scores.top(10)
        saved = top, [where[n] for n, _ in top]
    return {
        "table": str(table),
        "plot": str(plot),
        "reused": reused,
        "stale_temps": temps,
        "seconds": time.perf_counter() - t0,
        "top": saved[0],
        "top_positions": saved[1],
    }
