"""The ``cluster`` stage (``adag cluster RUN_DIR``): group the neurons of a run's graphs into
functional clusters (ADAG §3) and write what the later stages and a person read.

Reads ``RUN_DIR/graphs/`` (written by the trace stage). Writes, atomically:

- ``clusters.json`` / ``clusters.parquet``: the assignment, settings and diagnostics
  (:class:`adag.clusters.Clusters`);
- ``cluster-profiles.parquet``: each cluster's summed input and output profile per prompt;
- ``clusters-similarity.png`` (the similarity matrix ordered by cluster) and
  ``clusters-by-layer.png`` (cluster sizes by layer);
- ``behaviour.parquet`` / ``behaviour-units.parquet`` when every prompt carries a ``score``: each
  cluster's (and unit's) attribution correlated with it;
- ``viewer/<slug>.json`` again, with the clusters as supernodes.

The stage is skipped when ``clusters.json`` is current: written under the same settings from the
same graphs (their JSON digests), so a rerun recomputes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adag.errors import AdagError
from adag.graphs.export import INDEX_FILE, to_circuit_tracer, write_index
from adag.graphs.graph import Graph
from adag.graphs.prune import prune
from adag.io import remove, write_parquet, write_text
from adag.pipeline.resume import is_current, key_path, write_key
from adag.pipeline.rundir import graphs_key

CLUSTERS = "clusters.json"
OUTPUTS = (
    "clusters.json",
    "clusters.parquet",
    "cluster-profiles.parquet",
    "clusters-similarity.png",
    "clusters-by-layer.png",
    "behaviour.parquet",
    "behaviour-units.parquet",
)


def run_graphs(run_dir: Path) -> tuple[list[str], list[Graph]]:
    """The slugs and graphs of a run directory (``graphs/*.json``, sorted); one-line errors for
    a directory without graphs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdagError(f"run directory {run_dir} does not exist; create it with adag trace")
    gdir = run_dir / "graphs"
    slugs = (
        sorted(p.stem for p in gdir.glob("*.json") if not p.name.startswith("."))
        if gdir.is_dir()
        else []
    )
    if not slugs:
        raise AdagError(
            f"run directory {run_dir} has no graphs; trace prompts into it first "
            f"(adag trace MODEL --prompts FILE --out {run_dir})"
        )
    return slugs, [Graph.load(gdir / s) for s in slugs]


def scores_of(graphs: list[Graph]) -> list[float] | None:
    """The prompts' behaviour scores (``settings["score"]``) when every graph has one."""
    scores = [g.settings.get("score") for g in graphs]
    if all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
        return [float(s) for s in scores]  # type: ignore[arg-type]
    return None


def cluster_stage(
    run_dir: str | Path,
    *,
    n_clusters: int,
    method: str = "multiview",
    seed: int = 42,
    top_m: int | None = None,
    force: bool = False,
    viewer_node_threshold: float = 0.8,
    viewer_edge_threshold: float = 0.98,
) -> dict[str, Any]:
    """Cluster the run's graphs and write the files listed in the module docstring. Returns a
    summary (paths, sizes, diagnostics, ``"reused"``)."""
    from adag.clusters import METHODS, Clusters, cluster
    from adag.clusters.behaviour import correlate
    from adag.clusters.plots import plot_similarity, plot_sizes_by_layer

    if method not in METHODS:
        raise AdagError(f"unknown clustering method {method!r}; choose from {', '.join(METHODS)}")
    if n_clusters < 2:
        raise AdagError(f"--n-clusters must be at least 2, got {n_clusters}")
    run_dir = Path(run_dir)
    slugs, graphs = run_graphs(run_dir)
    key = {
        "stage": "cluster",
        "n_clusters": n_clusters,
        "method": method,
        "seed": seed,
        "top_m": top_m,
        "graphs": graphs_key(run_dir / "graphs", slugs),
    }
    path = run_dir / CLUSTERS
    if not force and is_current(path, key):
        c = Clusters.load(run_dir)
        # a rerun of the trace stage rewrites the viewer files without supernodes: put them back
        # (cheap, and identical bytes when they are there)
        _write_viewer(run_dir, slugs, graphs, c, viewer_node_threshold, viewer_edge_threshold)
        return _summary(run_dir, c, reused=True)
    c = cluster(
        graphs, n_clusters=n_clusters, method=method, seed=seed, prompt_ids=slugs, top_m=top_m
    )
    remove(key_path(path))  # a new clusters.json must never sit beside an old key
    for name in OUTPUTS:
        remove(run_dir / name)
    write_parquet(c.profile(graphs, prompt_ids=slugs), run_dir / "cluster-profiles.parquet")
    plot_similarity(c.similarity, c.units, c.labels, run_dir / "clusters-similarity.png")
    plot_sizes_by_layer(c, int(graphs[0].node_layer.max()), run_dir / "clusters-by-layer.png")
    scores = scores_of(graphs)
    if scores is not None and len(graphs) >= 3 and len(set(scores)) > 1:
        per_cluster, per_unit = correlate(c, graphs, scores)
        write_parquet(per_cluster, run_dir / "behaviour.parquet")
        write_parquet(per_unit, run_dir / "behaviour-units.parquet")
    _write_viewer(run_dir, slugs, graphs, c, viewer_node_threshold, viewer_edge_threshold)
    c.save(run_dir)  # clusters.json last: it marks the stage done
    write_key(path, key)
    return _summary(run_dir, c, reused=False)


def _write_viewer(
    run_dir: Path,
    slugs: list[str],
    graphs: list[Graph],
    c: Any,
    node_threshold: float,
    edge_threshold: float,
) -> None:
    """The viewer files with the clusters as supernodes, and the index; a file that already
    holds exactly that is left alone (so a reused stage rewrites nothing)."""
    viewer = run_dir / "viewer"
    changed = not (viewer / INDEX_FILE).exists()
    for slug, g in zip(slugs, graphs, strict=True):
        pruned = prune(g, node_threshold=node_threshold, edge_threshold=edge_threshold)
        data = to_circuit_tracer(pruned, slug=slug, supernodes=c.supernodes(pruned), full_graph=g)
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        path = viewer / f"{slug}.json"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)
            changed = True
    if changed:
        write_index(viewer, slugs)


def _summary(run_dir: Path, c: Any, *, reused: bool) -> dict[str, Any]:
    sizes = {name: len(c.members(name)) for name in c.names}
    return {
        "clusters": str(run_dir / CLUSTERS),
        "method": c.method,
        "n_clusters": c.n_clusters,
        "n_units": len(c.units),
        "sizes": sizes,
        "diagnostics": c.diagnostics,
        "reused": reused,
        "files": [str(run_dir / n) for n in OUTPUTS if (run_dir / n).exists()],
    }


__all__ = ["cluster_stage", "run_graphs", "scores_of"]
