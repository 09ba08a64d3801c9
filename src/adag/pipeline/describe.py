"""The ``describe`` stage (``adag describe RUN_DIR``): an input and an output description of every
cluster, each scored by a simulator against held-out profiles, and a label (ADAG §3.3).

Reads ``RUN_DIR/clusters.json`` and ``RUN_DIR/cluster-profiles.parquet`` (the cluster stage).
Writes ``descriptions.jsonl`` (one line per cluster and side, :class:`adag.describe.Descriptions`)
atomically, with a key sidecar; LLM answers are cached in ``RUN_DIR/llm-cache/`` (SQLite), so a
killed run resumes without repeating a finished call and a rerun of a current stage makes none.

The key is what decides the descriptions: the clusters and their profiles (file digests), the
description settings, the explainer's and the simulator's identity (backend and model: not the
server's address, timeouts or key) and the prompt templates' version. Changing the LLM therefore
redoes this stage (and the report) only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adag.errors import AdagError
from adag.io import file_sha256, remove
from adag.pipeline import rundir
from adag.pipeline.cluster import CLUSTERS
from adag.pipeline.resume import is_current, key_path, write_key

if TYPE_CHECKING:
    from adag.describe.llm import LLMConfig
    from adag.models.model import Model

DESCRIPTIONS = "descriptions.jsonl"
PROFILES = "cluster-profiles.parquet"
CACHE_DIR = "llm-cache"


def describe_stage(
    run_dir: str | Path,
    *,
    llm: LLMConfig | Mapping[str, Any] | None = None,
    simulator: LLMConfig | Mapping[str, Any] | None = None,
    n_samples: int = 5,
    min_highlights: int = 1,
    heldout: float = 0.3,
    sides: Sequence[str] = ("input", "output"),
    seed: int = 0,
    model: Model | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Describe every cluster of the run; returns a summary (path, ``reused``, the LLM usage
    counters, and per cluster its label and scores). ``model``: an already loaded model the local
    backend may reuse when it names the same model."""
    from adag.clusters import Clusters
    from adag.describe import Descriptions, adescribe
    from adag.describe.llm import LLMConfig, make_llm
    from adag.describe.prompts import PROMPT_VERSION

    run_dir = Path(run_dir)
    if not (run_dir / CLUSTERS).exists() or not (run_dir / PROFILES).exists():
        raise AdagError(
            f"run directory {run_dir} has no clusters; run adag cluster {run_dir} first"
        )
    cfg = LLMConfig.model_validate(llm or {})
    sim_cfg = LLMConfig.model_validate(simulator) if simulator is not None else None
    if n_samples < 1:
        raise AdagError(f"n_samples must be at least 1, got {n_samples}")
    key = {
        "stage": "describe",
        "clusters_file": file_sha256(run_dir / CLUSTERS),
        "profiles_file": file_sha256(run_dir / PROFILES),
        "explainer": cfg.identity(),
        "simulator": (sim_cfg or cfg).identity(),
        "n_samples": n_samples,
        "min_highlights": min_highlights,
        "heldout": heldout,
        "sides": list(sides),
        "seed": seed,
        "prompt_version": PROMPT_VERSION,
    }
    path = run_dir / DESCRIPTIONS
    if not force and is_current(path, key):
        return _summary(path, Descriptions.load(path), reused=True, usage={})

    import pyarrow.parquet as pq

    clusters = Clusters.load(run_dir)
    table = pq.read_table(run_dir / PROFILES)
    cache = run_dir / CACHE_DIR
    # what Ctrl-C reports: the finished LLM calls are kept in the cache, so a rerun resumes
    rundir.progress.begin("cluster sides described", clusters.n_clusters * len(sides), cache)

    def done(name: str) -> None:
        rundir.progress.advance()
        if progress is not None:
            progress(name)

    def local_model(c: LLMConfig) -> Model | None:
        return model if model is not None and c.backend == "local" and _same(model, c) else None

    async def go() -> tuple[Any, dict[str, Any]]:
        explainer = make_llm(cfg, cache_dir=cache, model=local_model(cfg))
        sim = (
            make_llm(sim_cfg, cache_dir=cache, model=local_model(sim_cfg))
            if sim_cfg is not None
            else None
        )
        try:
            result = await adescribe(
                clusters,
                table,
                llm=explainer,
                simulator=sim,
                n_samples=n_samples,
                min_highlights=min_highlights,
                heldout=heldout,
                sides=sides,
                seed=seed,
                progress=done,
            )
        finally:
            await explainer.aclose()
            if sim is not None:
                await sim.aclose()
        usage = {"explainer": explainer.usage.as_dict()}
        if sim is not None:
            usage["simulator"] = sim.usage.as_dict()
        return result, usage

    remove(key_path(path))  # new descriptions must never sit beside an old key
    descriptions, usage = asyncio.run(go())
    descriptions.save(path)
    write_key(path, key)
    return _summary(path, descriptions, reused=False, usage=usage)


def _same(model: Model, c: LLMConfig) -> bool:
    """Whether the loaded ``model`` is the one the local backend config names."""
    return c.model == model.name


def _summary(path: Path, d: Any, *, reused: bool, usage: dict[str, Any]) -> dict[str, Any]:
    rows = [
        {
            "cluster": r["cluster"],
            "side": r["side"],
            "label": r.get("label"),
            "status": r.get("status"),
            "score": r.get("score"),
            "shuffled": ((r.get("baselines") or {}).get("shuffled") or {}).get("score"),
            "top_tokens": ((r.get("baselines") or {}).get("top_tokens") or {}).get("score"),
            "explanation": r.get("explanation"),
        }
        for r in d.rows
    ]
    return {"descriptions": str(path), "reused": reused, "usage": usage, "rows": rows}


__all__ = ["CACHE_DIR", "DESCRIPTIONS", "describe_stage"]
