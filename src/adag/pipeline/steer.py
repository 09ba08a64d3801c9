"""The ``steer`` stage (``adag steer RUN_DIR``): validate each cluster causally, as ADAG does, by
multiplying its neurons by each factor at every position of the run's prompts.

Reads ``RUN_DIR/graphs/`` (the exact token ids and traced targets of every prompt) and
``RUN_DIR/clusters.json``. Writes ``steering.parquet`` (one row per cluster, prompt, factor and
token: :func:`adag.steer.steer`'s layout with the cluster in ``label``),
``steering-summary.parquet`` (:func:`adag.steer.summarise`: effect on the mean target probability
with bootstrap and binomial error bars) and ``steering.png``. Skipped when current (same clusters
file, clusters, factors and graphs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adag.errors import AdagError
from adag.io import file_sha256, remove, write_parquet
from adag.models.model import Model
from adag.pipeline.cluster import CLUSTERS, run_graphs
from adag.pipeline.dist import Dist
from adag.pipeline.resume import is_current, key_path, write_key
from adag.pipeline.rundir import graphs_key

STEERING = "steering.parquet"


def parse_scale(text: str) -> tuple[float, ...]:
    """``"0,2"`` -> ``(0.0, 2.0)``: comma-separated finite factors, at least one."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        out = tuple(float(p) for p in parts if p)
    except ValueError:
        out = ()
    if not out or len(out) != len(parts) or not all(math.isfinite(x) for x in out):
        raise AdagError(f"bad --scale {text!r}; give comma-separated numbers, e.g. 0,2")
    return out


def steer_stage(
    model: Model,
    run_dir: str | Path,
    *,
    clusters: Sequence[str] | None = None,
    scale: Sequence[float] = (0.0, 2.0),
    k: int = 5,
    batch_size: int = 16,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Steer every cluster (or the named ones) by every factor on every prompt of the run; write
    the files listed in the module docstring and return a summary.

    ``dist`` (under ``torchrun``; every rank calls this): rank ``r`` steers the clusters
    ``i % world == r`` (of the names in order), rank 0 gathers their tables, concatenates them
    in cluster order and writes the files, which equal one process's; the other ranks return
    ``{"shard": [rank, world], "clusters": [...]}``."""
    d = dist or Dist()
    from adag.clusters import Clusters
    from adag.steer import steer, summarise
    from adag.steer.plots import plot_steering

    run_dir = Path(run_dir)
    slugs, graphs = run_graphs(run_dir)
    if not (run_dir / CLUSTERS).exists():
        raise AdagError(
            f"run directory {run_dir} has no clusters; run adag cluster {run_dir} first"
        )
    c = Clusters.load(run_dir)
    names = list(clusters) if clusters else list(c.names)
    unknown = [n for n in names if n not in c.names]
    if unknown:
        raise AdagError(f"unknown cluster {unknown[0]!r}; this run has {c.names[0]}..{c.names[-1]}")
    if not scale:
        raise AdagError("no steering factors; give e.g. --scale 0,2")
    for g in graphs:
        model_name = g.settings.get("model")
        if model_name not in (None, model.name):
            raise AdagError(
                f"graph {g.prompt[:30]!r} was traced with {model_name!r}, not {model.name!r}"
            )
    key = {
        "stage": "steer",
        "clusters_file": file_sha256(run_dir / CLUSTERS),
        "clusters": names,
        "scale": [float(x) for x in scale],
        "k": k,
        "graphs": graphs_key(run_dir / "graphs", slugs),
    }
    path = run_dir / STEERING
    current = not force and is_current(path, key)
    if d.active:
        current = d.gather(current)[0]  # rank 0 decides
        if current and not d.main:
            return {"shard": [d.rank, d.world], "clusters": []}
    if current:
        import pyarrow.parquet as pq

        summary = pq.read_table(run_dir / "steering-summary.parquet")
        return {"steering": str(path), "summary": summary.to_pylist(), "reused": True}
    import pyarrow as pa

    prompts = [g.prompt_ids.tolist() for g in graphs]
    targets = [g.target_ids.tolist() for g in graphs]
    tables = []
    mine = [name for i, name in enumerate(names) if d.owns(i)]
    for name in mine:
        t = steer(
            model,
            prompts,
            c.members(name),
            scale=tuple(scale),
            targets=targets,
            k=k,
            batch_size=batch_size,
            label=name,
        )
        slug_col = pa.array([slugs[i] for i in t.column("prompt").to_pylist()])
        tables.append(t.append_column("prompt_id", slug_col))
        if progress is not None:
            progress(1)
    if d.active:
        parts = d.gather(list(zip(mine, tables, strict=True)))
        if not d.main:
            return {"shard": [d.rank, d.world], "clusters": mine}
        by_name = dict(item for part in parts for item in part)
        tables = [by_name[name] for name in names]
    table = pa.concat_tables(tables)
    summary = summarise(table)
    remove(key_path(path))
    write_parquet(summary, run_dir / "steering-summary.parquet")
    plot_steering(summary, run_dir / "steering.png")
    write_parquet(table, path)  # last: it marks the stage done
    write_key(path, key)
    return {"steering": str(path), "summary": summary.to_pylist(), "reused": False}


JUDGED = "steering-judged.parquet"


def judge_stage(
    model: Model,
    run_dir: str | Path,
    *,
    llm: Any,
    rubric: str,
    incoherence: str | None = None,
    n: int = 8,
    scale: Sequence[float] = (0.0, 2.0),
    clusters: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    force: bool = False,
) -> dict[str, Any]:
    """ADAG's free-form steering check: for every cluster and factor (and the unsteered model),
    ``n`` sampled generations (sample ``i`` continues the run's prompt ``i mod P`` with seed
    ``i``), each judged by ``llm`` against ``rubric`` (yes/no) and, when given, ``incoherence``.

    Writes ``steering-judged.parquet`` (one row per generation: ``cluster`` ("none" for the
    unsteered model), ``factor``, ``sample``, ``prompt_id``, ``response``, ``judged``,
    ``incoherent`` (null when not judged or failed) and ``failure``) and
    ``steering-judged-summary.parquet`` (per condition: ``n``, ``k`` and ``rate`` of yes with
    Wilson 95% bounds ``lo``/``hi``, and the incoherence rate). The generations are cached in the
    table's key (model, clusters, factors, prompts, sampling); the judge's answers in
    ``llm-cache/``."""
    import asyncio

    import pyarrow as pa

    from adag.clusters import Clusters
    from adag.describe import ajudge
    from adag.describe.judge import rate
    from adag.describe.llm import LLMConfig, make_llm
    from adag.pipeline.describe import CACHE_DIR
    from adag.steer import generate_ids

    run_dir = Path(run_dir)
    if not rubric or not rubric.strip():
        raise AdagError("the judge needs a rubric, e.g. --judge 'Does the text mention Paris?'")
    if n < 1:
        raise AdagError(f"--generate must be at least 1, got {n}")
    slugs, graphs = run_graphs(run_dir)
    if not (run_dir / CLUSTERS).exists():
        raise AdagError(
            f"run directory {run_dir} has no clusters; run adag cluster {run_dir} first"
        )
    c = Clusters.load(run_dir)
    names = list(clusters) if clusters else list(c.names)
    unknown = [x for x in names if x not in c.names]
    if unknown:
        raise AdagError(f"unknown cluster {unknown[0]!r}; this run has {c.names[0]}..{c.names[-1]}")
    cfg = LLMConfig.model_validate(llm or {})
    key = {
        "stage": "judge",
        "clusters_file": file_sha256(run_dir / CLUSTERS),
        "clusters": names,
        "scale": [float(x) for x in scale],
        "n": n,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "rubric": rubric,
        "incoherence": incoherence,
        "judge": cfg.identity(),
        "graphs": graphs_key(run_dir / "graphs", slugs),
    }
    path = run_dir / JUDGED
    summary_path = run_dir / "steering-judged-summary.parquet"
    if not force and is_current(path, key) and summary_path.exists():
        import pyarrow.parquet as pq

        return {
            "judged": str(path),
            "summary": pq.read_table(summary_path).to_pylist(),
            "reused": True,
            "usage": {},
        }
    tok = model.tok()
    conditions: list[tuple[str, float]] = [("none", 1.0)]
    conditions += [(name, float(f)) for name in names for f in scale]
    rows: list[dict[str, Any]] = []
    for name, factor in conditions:
        steer = None if name == "none" else (c.members(name), factor)
        for i in range(n):
            g = graphs[i % len(graphs)]
            new = generate_ids(
                model,
                g.prompt_ids.tolist(),
                steer=steer,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=i,
            )
            rows.append(
                {
                    "cluster": name,
                    "factor": factor,
                    "sample": i,
                    "prompt_id": slugs[i % len(graphs)],
                    "response": str(tok.decode(new)),
                }
            )

    async def go() -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
        client = make_llm(
            cfg, cache_dir=run_dir / CACHE_DIR, model=model if _local(cfg, model) else None
        )
        try:
            responses = [r["response"] for r in rows]
            judged = await ajudge(responses, rubric, llm=client)
            incoherent = await ajudge(responses, incoherence, llm=client) if incoherence else None
        finally:
            await client.aclose()
        return judged, incoherent, client.usage.as_dict()

    judged, incoherent, usage = asyncio.run(go())
    for i, r in enumerate(rows):
        r["judged"] = judged[i]["answer"] if judged[i]["failure"] is None else None
        r["incoherent"] = (
            incoherent[i]["answer"]
            if incoherent is not None and incoherent[i]["failure"] is None
            else None
        )
        r["failure"] = judged[i]["failure"]
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("cluster", pa.string()),
                ("factor", pa.float64()),
                ("sample", pa.int64()),
                ("prompt_id", pa.string()),
                ("response", pa.string()),
                ("judged", pa.bool_()),
                ("incoherent", pa.bool_()),
                ("failure", pa.string()),
            ]
        ),
    )
    summary_rows = []
    for name, factor in conditions:
        sel = [r for r in rows if r["cluster"] == name and r["factor"] == factor]
        k, m, p, lo, hi = rate([r["judged"] for r in sel])
        _, mi, pi, _, _ = rate([r["incoherent"] for r in sel])
        summary_rows.append(
            {
                "cluster": name,
                "factor": factor,
                "n": m,
                "k": k,
                "rate": p if m else None,
                "lo": lo if m else None,
                "hi": hi if m else None,
                "incoherent_rate": pi if mi else None,
                "failures": sum(r["failure"] is not None for r in sel),
            }
        )
    summary = pa.Table.from_pylist(summary_rows)
    remove(key_path(path))
    write_parquet(summary, summary_path)
    write_parquet(table, path)  # last: it marks the stage done
    write_key(path, key)
    return {"judged": str(path), "summary": summary_rows, "reused": False, "usage": usage}


def _local(cfg: Any, model: Model) -> bool:
    return bool(cfg.backend == "local" and cfg.model == model.name)


__all__ = ["JUDGED", "STEERING", "judge_stage", "parse_scale", "steer_stage"]
