"""The ``trace`` stage (``adag trace``): trace a prompt or a prompt dataset into a run directory.

Writes ``RUN_DIR/graphs/<slug>.safetensors|.json`` (full graphs, lossless), ``RUN_DIR/viewer/<slug>.json``
(influence-pruned circuit-tracer JSON) and, once all graphs exist, the viewer index
``RUN_DIR/viewer/graph-metadata.json`` and ``RUN_DIR/profiles.parquet``. Every file is written
atomically.

The stage owns ``graphs/``, ``viewer/`` and ``profiles.parquet``, and a finished run leaves them
describing exactly the current prompt list under the current settings:

- a graph whose pair of files loads (:meth:`Graph.load` checks that they belong together) and
  records the same content key (:meth:`TraceConfig.content`, the seed) and token ids is reused;
  any other is traced again, so a killed run resumes and a changed setting redoes what it decides;
- graphs and viewer files of slugs not in the current prompt list are removed, and the index and
  ``profiles.parquet`` are removed before anything changes and rewritten at the end (the profiles
  are reused when their sidecar key, the slugs and the digests of their graphs, is current), so
  an index or a profile table never lists a graph that is not there;
- temp files left by a killed run in the stage's directories are removed at the start.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adag.errors import AdagError
from adag.graphs.export import INDEX_FILE, slugify, write_index, write_viewer
from adag.graphs.graph import FORMAT as GRAPH_FORMAT
from adag.graphs.graph import Graph
from adag.graphs.prune import prune
from adag.graphs.trace import TraceConfig, prepare, trace_tokens
from adag.io import remove
from adag.models.model import Model
from adag.pipeline import rundir
from adag.pipeline.dist import Dist
from adag.pipeline.resume import is_current, key_path, matches, write_key
from adag.profiles import profile, save_profiles
from adag.tasks.prompts import PromptSpec

if TYPE_CHECKING:
    from adag.transcoders import Transcoders

logger = logging.getLogger(__name__)

PROFILES = "profiles.parquet"
GRAPH_SUFFIXES = (".json", ".safetensors")


def slugs_for(prompts: Sequence[PromptSpec]) -> list[str]:
    """File names: the slugified prompt, numbered when there are several."""
    if len(prompts) == 1:
        return [slugify(prompts[0].prompt)]
    return [f"{i:04d}-{slugify(p.prompt, max_len=40)}" for i, p in enumerate(prompts)]


def _current(path: Path, key: dict[str, Any], ids: list[int]) -> Graph | None:
    """The graph at ``path`` if its two files load as one graph traced with ``key`` from the same
    tokens."""
    try:
        g = Graph.load(path)
    except (OSError, KeyError, ValueError):  # AdagError is a ValueError
        return None
    return g if matches(g.settings, key) and g.prompt_ids.tolist() == ids else None


def _ours(path: Path) -> bool:
    """Whether ``path`` is a file this stage writes: a graph's JSON (``format: adag-graph``) or
    tensors beside one, or a viewer graph JSON (``metadata`` and ``nodes``). Anything else a user
    keeps in these folders is never removed."""
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
        if not path.exists():
            return True  # the tensors of a pair whose JSON a killed run never wrote
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    return data.get("format") == GRAPH_FORMAT or ("metadata" in data and "nodes" in data)


def _stale(graphs: Path, viewer: Path, slugs: Sequence[str]) -> list[str]:
    """Slugs with a graph file or a viewer file of this stage that are not in ``slugs``
    (sorted)."""
    keep = set(slugs)
    found = set()
    for directory, suffixes in ((graphs, GRAPH_SUFFIXES), (viewer, (".json",))):
        if not directory.is_dir():
            continue
        for p in directory.iterdir():
            if p.name.startswith(".") or p.name == INDEX_FILE or p.suffix not in suffixes:
                continue
            if p.stem not in keep and p.is_file() and _ours(p):
                found.add(p.stem)
    return sorted(found)


def trace_stage(
    model: Model,
    prompts: Sequence[PromptSpec],
    out: str | Path,
    config: TraceConfig | None = None,
    *,
    viewer_node_threshold: float = 0.8,
    viewer_edge_threshold: float = 0.98,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
    transcoders: Transcoders | None = None,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Trace every prompt and write the run directory (``force``: trace every graph again even
    when it is current; ``transcoders``: trace feature graphs of the local replacement model, as
    :func:`adag.trace` does, the transcoders' :meth:`~adag.transcoders.Transcoders.fingerprint`
    joining the resume key). Returns a summary: paths, the slugs ``"reused"``, ``"traced"`` and
    ``"removed"`` (graphs of an earlier run not in this prompt list), ``"stale_temps"`` (temp
    files of a killed run it deleted) and each graph's summary.

    ``dist`` (:func:`adag.pipeline.dist.context` under ``torchrun``): every rank calls this;
    rank ``r`` traces the prompts ``i % world == r`` and writes their graph and viewer files;
    rank 0 alone removes stale files before and writes the index and the profiles after (from
    the files), so the run directory is the one a single process writes. Rank 0 returns the
    whole summary (``"reused"``/``"traced"`` of every rank), the others their shard's, with
    ``"summaries"`` empty."""
    started = time.time()
    config = config or TraceConfig()
    families = None
    extra: dict[str, Any] = {}
    if transcoders is not None:
        from adag.graphs.features import replacement_families

        if config.targets is None and config.desired_logit_prob is None:
            config = config.updated(desired_logit_prob=0.95)
        transcoders.check(model)
        families = replacement_families(
            model, transcoders, max_feature_nodes=config.max_feature_nodes
        )
        extra["transcoders_fingerprint"] = transcoders.fingerprint()
    if not prompts:
        raise AdagError("no prompts to trace")
    seeds = [p.seed for p in prompts]
    # Assemble and check every prompt before writing anything.
    assembled = prepare(
        model, [p.prompt for p in prompts], seeds, config, where=[p.where for p in prompts]
    )
    out = rundir.check_writable(out, dirs=("graphs", "viewer"), files=(PROFILES,))
    graphs_dir, viewer_dir, prof = out / "graphs", out / "viewer", out / PROFILES
    slugs = slugs_for(prompts)

    d = dist or Dist()
    temps = (
        [
            *rundir.remove_stale_temps(graphs_dir, started),
            *rundir.remove_stale_temps(viewer_dir, started),
            *rundir.remove_stale_temps(out, started, names=(PROFILES, key_path(prof).name)),
        ]
        if d.main  # before the barrier below: no rank has started writing yet
        else []
    )
    if temps:
        logger.info("removed %d stale temp file(s) of a killed run", len(temps))

    base_key = {**config.content(model), **extra}
    mine = [d.owns(i) for i in range(len(prompts))]
    current = [
        None
        if force or not own
        else _current(graphs_dir / slug, {**base_key, "seed_response": p.seed}, ids)
        for p, slug, (_, ids), own in zip(prompts, slugs, assembled, mine, strict=True)
    ]
    rundir.progress.begin("graphs", sum(mine), out, kept=sum(g is not None for g in current))
    changing = d.any(force or any(g is None for g, own in zip(current, mine, strict=True) if own))
    removed: list[str] = []
    if d.main:
        removed = _stale(graphs_dir, viewer_dir, slugs)
        if changing or removed:
            # The index and the profiles describe the whole set of graphs: drop them before the
            # set changes, so that an interrupted run never leaves them listing graphs that are
            # gone.
            for p in (viewer_dir / INDEX_FILE, key_path(prof), prof):
                remove(p)
        for slug in removed:
            files = [graphs_dir / f"{slug}{sfx}" for sfx in GRAPH_SUFFIXES] + [
                viewer_dir / f"{slug}.json"
            ]
            for f in [f for f in files if f.is_file() and _ours(f)]:  # the graph's JSON (its
                remove(f)  # commit mark) goes first: a kill here leaves no JSON without tensors
    d.barrier()  # no rank writes before rank 0 has cleaned up

    graphs: list[Graph | None] = []
    reused, traced = [], []
    for spec, slug, (text, ids), g, own in zip(
        prompts, slugs, assembled, current, mine, strict=True
    ):
        if not own:
            graphs.append(None)
            continue
        path = graphs_dir / slug
        if g is None:
            g = trace_tokens(
                model,
                ids,
                config,
                prompt=text,
                families=families,
                extra_settings={
                    **extra,
                    "seed_response": spec.seed,
                    "label": spec.label,
                    "score": spec.score,
                },
            )
            g.save(path)
            traced.append(slug)
            rundir.progress.advance()
        else:
            notes = {"label": spec.label, "score": spec.score}  # not content: do not retrace
            if any(g.settings.get(n) != v for n, v in notes.items()):
                g.settings.update(notes)
                g.save(path)
            reused.append(slug)
        pruned = prune(
            g, node_threshold=viewer_node_threshold, edge_threshold=viewer_edge_threshold
        )
        write_viewer(pruned, viewer_dir, slug=slug, full_graph=g)
        graphs.append(g)
        if progress is not None:
            progress(1)
    if d.active:
        d.barrier()  # every shard is on disk
        shards = d.gather((reused, traced))
        if not d.main:
            return {
                "graphs": [
                    str(graphs_dir / f"{s}.json") for s, own in zip(slugs, mine, strict=True) if own
                ],
                "viewer": str(viewer_dir),
                "profiles": str(prof),
                "reused": reused,
                "traced": traced,
                "removed": [],
                "stale_temps": [str(p) for p in temps],
                "summaries": [],
                "shard": [d.rank, d.world],
            }
        done = {s for r, t in shards for s in (*r, *t)}
        reused = [s for s in slugs if any(s in r for r, _ in shards)]
        traced = [s for s in slugs if any(s in t for _, t in shards)]
        missing = [s for s in slugs if s not in done]
        if missing:
            raise AdagError(f"no rank traced {missing[0]!r}; run the stage again")
        graphs = [
            g if g is not None else Graph.load(graphs_dir / s)
            for g, s in zip(graphs, slugs, strict=True)
        ]
    all_graphs = [g for g in graphs if g is not None]
    write_index(viewer_dir, slugs)
    pkey = {
        "stage": "trace",
        "profiles_version": 2,  # 2: the activation column
        "graphs": rundir.graphs_key(graphs_dir, slugs),
    }
    if force or not is_current(prof, pkey):
        remove(key_path(prof))  # a new table must never sit beside an old key
        save_profiles(profile(all_graphs, prompt_ids=slugs), prof)
        write_key(prof, pkey)
    return {
        "graphs": [str(graphs_dir / f"{s}.json") for s in slugs],
        "viewer": str(viewer_dir),
        "profiles": str(prof),
        "reused": reused,
        "traced": traced,
        "removed": removed,
        "stale_temps": [str(p) for p in temps],
        "summaries": [g.summary() for g in all_graphs],
    }


__all__ = ["slugs_for", "trace_stage"]
