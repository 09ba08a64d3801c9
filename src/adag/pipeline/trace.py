"""The ``trace`` stage (``adag trace``): trace a prompt or a prompt dataset into a run directory.

Writes ``RUN_DIR/graphs/<slug>.safetensors|.json`` (full graphs, lossless), ``RUN_DIR/viewer/<slug>.json``
(influence-pruned circuit-tracer JSON) and, once all graphs exist, the viewer index
``RUN_DIR/viewer/graph-metadata.json`` and ``RUN_DIR/profiles.parquet``. Every file is written
atomically; a graph whose files exist with the same content key (:meth:`TraceConfig.content`, the
seed and the token ids) is loaded instead of traced again, so a killed run resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adag.errors import AdagError
from adag.graphs.export import slugify, write_index, write_viewer
from adag.graphs.graph import Graph
from adag.graphs.prune import prune
from adag.graphs.trace import TraceConfig, prepare, trace_tokens
from adag.models.model import Model
from adag.pipeline.resume import matches
from adag.profiles import profile, save_profiles
from adag.tasks.prompts import PromptSpec


def slugs_for(prompts: Sequence[PromptSpec]) -> list[str]:
    """File names: the slugified prompt, numbered when there are several."""
    if len(prompts) == 1:
        return [slugify(prompts[0].prompt)]
    return [f"{i:04d}-{slugify(p.prompt, max_len=40)}" for i, p in enumerate(prompts)]


def _current(path: Path, key: dict[str, Any], ids: list[int]) -> Graph | None:
    """The graph at ``path`` if it was traced with ``key`` from the same tokens."""
    if not path.with_name(path.name + ".json").exists():
        return None
    try:
        g = Graph.load(path)
    except (OSError, KeyError, ValueError):  # AdagError and JSONDecodeError are ValueErrors
        return None
    return g if matches(g.settings, key) and g.prompt_ids.tolist() == ids else None


def trace_stage(
    model: Model,
    prompts: Sequence[PromptSpec],
    out: str | Path,
    config: TraceConfig | None = None,
    *,
    viewer_node_threshold: float = 0.8,
    viewer_edge_threshold: float = 0.98,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Trace every prompt and write the run directory; returns a summary (paths, counts)."""
    config = config or TraceConfig()
    if not prompts:
        raise AdagError("no prompts to trace")
    seeds = [p.seed for p in prompts]
    # Assemble and check every prompt before writing anything.
    assembled = prepare(model, [p.prompt for p in prompts], seeds, config)
    out = Path(out)
    slugs = slugs_for(prompts)
    graphs, reused = [], 0
    for spec, slug, (text, ids) in zip(prompts, slugs, assembled, strict=True):
        path = out / "graphs" / slug
        key = {**config.content(model), "seed_response": spec.seed}
        g = _current(path, key, ids)
        if g is None:
            g = trace_tokens(
                model,
                ids,
                config,
                prompt=text,
                extra_settings={"seed_response": spec.seed, "label": spec.label},
            )
            g.save(path)
        else:
            reused += 1
        pruned = prune(
            g, node_threshold=viewer_node_threshold, edge_threshold=viewer_edge_threshold
        )
        write_viewer(pruned, out / "viewer", slug=slug)
        graphs.append(g)
        if progress is not None:
            progress(1)
    write_index(out / "viewer", slugs)
    table = profile(graphs, prompt_ids=slugs)
    prof = save_profiles(table, out / "profiles.parquet")
    return {
        "graphs": [str(out / "graphs" / f"{s}.json") for s in slugs],
        "viewer": str(out / "viewer"),
        "profiles": str(prof),
        "reused": reused,
        "summaries": [g.summary() for g in graphs],
    }


__all__ = ["slugs_for", "trace_stage"]
