"""``adag trace``: trace a prompt or a prompt dataset into a run directory.

Writes ``RUN_DIR/graphs/<slug>.safetensors|.json`` (full graphs), ``RUN_DIR/viewer/<slug>.json``
(influence-pruned circuit-tracer JSON, plus ``graph-metadata.json``) and
``RUN_DIR/profiles.parquet``. Every file is written atomically; a graph whose files already exist
with the same settings is loaded instead of traced again, so a killed run resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adag.errors import AdagError
from adag.graphs.export import slugify, write_viewer
from adag.graphs.graph import Graph
from adag.graphs.neurons import (
    Targets,
    assemble_prompt,
    check_settings,
    target_token_id,
    trace_settings,
    trace_tokens,
)
from adag.graphs.prune import prune
from adag.models.model import Model
from adag.profiles import profile, save_profiles
from adag.tasks.prompts import PromptSpec


def slugs_for(prompts: Sequence[PromptSpec]) -> list[str]:
    """File names: the slugified prompt, numbered when there are several."""
    if len(prompts) == 1:
        return [slugify(prompts[0].prompt)]
    return [f"{i:04d}-{slugify(p.prompt, max_len=40)}" for i, p in enumerate(prompts)]


def _reusable(path: Path, settings: Mapping[str, Any], ids: list[int]) -> Graph | None:
    if not (path.with_name(path.name + ".json").exists()):
        return None
    try:
        g = Graph.load(path)
    except (OSError, KeyError, ValueError):  # AdagError and JSONDecodeError are ValueErrors
        return None
    same = all(g.settings.get(key) == value for key, value in settings.items())
    return g if same and g.prompt_ids.tolist() == ids else None


def trace_command(
    model: Model,
    prompts: Sequence[PromptSpec],
    out: str | Path,
    *,
    k: int = 5,
    targets: Targets = None,
    node_threshold: float = 0.005,
    edge_threshold: float = 0.01,
    chat: bool = False,
    batch_size: int = 32,
    max_batch_tokens: int = 1024,
    viewer_node_threshold: float = 0.8,
    viewer_edge_threshold: float = 0.98,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Trace every prompt and write the run directory; returns a summary (paths, counts)."""
    if not prompts:
        raise AdagError("no prompts to trace")
    if k < 1:
        raise AdagError(f"k must be at least 1, got {k}")
    check_settings(node_threshold, edge_threshold, batch_size)
    if targets is not None:
        for t in targets:
            target_token_id(model, t)
    # Assemble and check every prompt before writing anything.
    assembled = []
    for p in prompts:
        text, ids = assemble_prompt(model, p.prompt, chat=chat, seed=p.seed)
        model._check_tokens(torch.tensor([ids]))
        assembled.append((text, ids))
    out = Path(out)
    slugs = slugs_for(prompts)
    graphs, reused = [], 0
    for spec, slug, (text, ids) in zip(prompts, slugs, assembled, strict=True):
        path = out / "graphs" / slug
        settings = {
            **trace_settings(
                model,
                k=k,
                targets=targets,
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
                exclude_bos=True,
            ),
            "chat": chat,
            "seed_response": spec.seed,
        }
        g = _reusable(path, settings, ids)
        if g is None:
            g = trace_tokens(
                model,
                ids,
                prompt=text,
                k=k,
                targets=targets,
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                extra_settings={"chat": chat, "seed_response": spec.seed, "label": spec.label},
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
    table = profile(graphs, prompt_ids=slugs)
    prof = save_profiles(table, out / "profiles.parquet")
    return {
        "graphs": [str(out / "graphs" / f"{s}.json") for s in slugs],
        "viewer": str(out / "viewer"),
        "profiles": str(prof),
        "reused": reused,
        "summaries": [g.summary() for g in graphs],
    }


__all__ = ["slugs_for", "trace_command"]
