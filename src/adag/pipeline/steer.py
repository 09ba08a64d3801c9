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
) -> dict[str, Any]:
    """Steer every cluster (or the named ones) by every factor on every prompt of the run; write
    the files listed in the module docstring and return a summary."""
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
    if not force and is_current(path, key):
        import pyarrow.parquet as pq

        summary = pq.read_table(run_dir / "steering-summary.parquet")
        return {"steering": str(path), "summary": summary.to_pylist(), "reused": True}
    import pyarrow as pa

    prompts = [g.prompt_ids.tolist() for g in graphs]
    targets = [g.target_ids.tolist() for g in graphs]
    tables = []
    for name in names:
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
    table = pa.concat_tables(tables)
    summary = summarise(table)
    remove(key_path(path))
    write_parquet(summary, run_dir / "steering-summary.parquet")
    plot_steering(summary, run_dir / "steering.png")
    write_parquet(table, path)  # last: it marks the stage done
    write_key(path, key)
    return {"steering": str(path), "summary": summary.to_pylist(), "reused": False}


__all__ = ["STEERING", "parse_scale", "steer_stage"]
