"""adag: find and explain the circuits inside language models.

The front door is small and imported lazily, so ``import adag`` is cheap::

    import adag
    model = adag.load_model()                   # SmolLM2-135M-Instruct, offline
    model.top_k("The capital of France is")     # [TokenProb(token=' Paris', ...), ...]
    graph, = adag.trace(model, "The capital of France is")

Where things live (each layer imports only from the ones above it):

- ``errors``            AdagError: the one-line user error (exit 2 from the CLI)
- ``io``                atomic writes (temp file + rename) used by every writer
- ``nodes``             node ids as code: format, parse, to_patch, the circuit-tracer id mapping
- ``models.specs``      one data row per architecture (module paths, norm, MLP, activation, softcaps)
- ``models.load``       load_model: aliases, hub ids, local dirs, GGUF → safetensors cache
- ``models.model``      Model: tokens, forward, top_k, run_with_cache, run-time sites, sessions
- ``models.ops``        norm formulas and activation ratios
- ``models.attention``  the attention score formula (scale, GQA, softcap), used by the model and the QK fix
- ``models.sites``      named sites: read / patch / differentiate anything in one forward; the hooks
- ``models.linear``     the linearised backward (frozen norms and patterns; the relp half rule in
                        ``post_partials``) and the linear replica
- ``tasks``             prompts, prompt pairs, metrics, built-in tasks (ioi, capitals), JSONL readers
- ``patching.node_sets`` patchable node sets (heads, qkv, neurons, sublayers) and their patches
- ``patching.patch``    exhaustive activation patching (ground truth), PatchingOracle
- ``patching.atp``      AtP, the QK fix, GradDrop, AtP*
- ``patching.ig``       AtP-IG (integrated gradients on the inputs) and per-layer IG
- ``patching.dqk``      the downstream QK fix (later queries and keys, one hop)
- ``patching.localize`` adaptive verification (``localize``, ``verify``), AtP under the
                        linearised backward
- ``patching.ablate``   zero / mean / resample ablation, the faithfulness curve
- ``patching.scores``   NodeScores tables; ``oracle``, ``bound`` (false-negative bound),
                        ``baselines``, ``evaluate`` (cost-to-find-top-x curves)
- ``graphs.config``     TraceConfig: every tracing setting; its content fields are the resume key
- ``graphs.family``     the node-family interface (where a node kind is read, seeded, written)
- ``graphs.neurons``    MLP neurons as a node family (closed-form relp seeds)
- ``graphs.features``   transcoder features and error nodes as node families: the local
                        replacement model of circuit tracing (frozen patterns, norms and errors)
- ``graphs.scores``     circuit-tracer's replacement and completeness scores
- ``graphs.trace``      trace: clean run, node attribution, input attribution, edges, assembly
- ``graphs.graph``      Graph: the one graph type, lossless save/load (safetensors + JSON)
- ``graphs.prune``      influence pruning (circuit-tracer's rule)
- ``graphs.export``     circuit-tracer / Neuronpedia viewer JSON (write-only) and its index
- ``transcoders``       PLT/CLT transcoders (encode, decode), readers of circuit-tracer, SAELens,
                        GemmaScope and our own layouts (``formats``), training (``train``)
- ``profiles``          attribution profiles of graph nodes (long table)
- ``clusters``          ADAG's multi-view similarity (``similarity``), spectral clustering and
                        baselines (``spectral``), diagnostics, the Clusters type, behaviour
                        correlation, plots
- ``describe.llm``      one async LLM client protocol (chat; candidate distributions per line) and
                        its backends: OpenAI-compatible, Anthropic, local; retries, usage
- ``describe.cache``    the on-disk (SQLite) cache of LLM answers keyed by the whole request
- ``describe``          ADAG's explainer–simulator on both sides (``records``: activation records,
                        quantile highlights, rescaling; ``prompts``: the versioned templates and
                        few-shot data; ``scoring``: Pearson r), baselines, labels; ``judge``
- ``steer``             steering units and clusters by a factor, steered generation, the summary;
                        ``steer.intervene``: transcoder feature interventions
- ``pipeline.resume``   resume keys: a stage skips outputs written under the same key
- ``pipeline.trace``    the trace stage: graphs/, viewer/, profiles.parquet of a run directory
- ``pipeline.patch``    the patch stage: patching/ tables, plots and evaluation
- ``pipeline.cluster``  the cluster stage: clusters.json, cluster profiles, plots, supernodes
- ``pipeline.steer``    the steer stage: steering.parquet and its summary; judged generations
- ``pipeline.describe`` the describe stage: descriptions.jsonl, llm-cache/
- ``pipeline.report``   report.html (self-contained) and summary.json
- ``pipeline.config``   RunConfig: every stage's settings, validated (pydantic)
- ``pipeline.run``      adag run: the stages in order, each skipped when current
- ``cli``               the ``adag`` command (typer), one error handler for every command
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "adag.models.load",
    "Model": "adag.models.model",
    "Patch": "adag.models.sites",
    "SiteRun": "adag.models.sites",
    "linearize": "adag.models.linear",
    "AdagError": "adag.errors",
    "atp": "adag.patching.atp",
    "atp_star": "adag.patching.atp",
    "atp_ig": "adag.patching.ig",
    "atp_dqk": "adag.patching.dqk",
    "localize": "adag.patching.localize",
    "ablate": "adag.patching.ablate",
    "faithfulness": "adag.patching.ablate",
    "NodeScores": "adag.patching.scores",
    "PromptPair": "adag.tasks.pairs",
    "trace": "adag.graphs.trace",
    "Graph": "adag.graphs.graph",
    "profile": "adag.profiles",
    "TraceConfig": "adag.graphs.config",
    "cluster": "adag.clusters",
    "Clusters": "adag.clusters",
    "steer": "adag.steer",
    "generate": "adag.steer",
    "describe": "adag.describe",
    "Descriptions": "adag.describe",
    "judge": "adag.describe",
    "make_llm": "adag.describe.llm",
    "LLMConfig": "adag.describe.llm",
    "run": "adag.pipeline.run",
    "Transcoders": "adag.transcoders",
    "load_transcoders": "adag.transcoders",
    "save_transcoders": "adag.transcoders",
    "intervene": "adag.steer.intervene",
    "graph_scores": "adag.graphs.scores",
    "RunConfig": "adag.pipeline.config",
}

__all__ = [
    "AdagError",
    "Clusters",
    "Descriptions",
    "Graph",
    "LLMConfig",
    "Model",
    "NodeScores",
    "Patch",
    "PromptPair",
    "RunConfig",
    "SiteRun",
    "TraceConfig",
    "Transcoders",
    "__version__",
    "ablate",
    "atp",
    "atp_dqk",
    "atp_ig",
    "atp_star",
    "cluster",
    "describe",
    "faithfulness",
    "generate",
    "graph_scores",
    "intervene",
    "judge",
    "linearize",
    "load_model",
    "load_transcoders",
    "localize",
    "make_llm",
    "profile",
    "run",
    "save_transcoders",
    "steer",
    "trace",
]

if TYPE_CHECKING:
    from adag.clusters import Clusters, cluster
    from adag.describe import Descriptions, describe, judge
    from adag.describe.llm import LLMConfig, make_llm
    from adag.errors import AdagError
    from adag.graphs.config import TraceConfig
    from adag.graphs.graph import Graph
    from adag.graphs.scores import graph_scores
    from adag.graphs.trace import trace
    from adag.models.linear import linearize
    from adag.models.load import load_model
    from adag.models.model import Model
    from adag.models.sites import Patch, SiteRun
    from adag.patching.ablate import ablate, faithfulness
    from adag.patching.atp import atp, atp_star
    from adag.patching.dqk import atp_dqk
    from adag.patching.ig import atp_ig
    from adag.patching.localize import localize
    from adag.patching.scores import NodeScores
    from adag.pipeline.config import RunConfig
    from adag.pipeline.run import run
    from adag.profiles import profile
    from adag.steer import generate, steer
    from adag.steer.intervene import intervene
    from adag.tasks.pairs import PromptPair
    from adag.transcoders import Transcoders, load_transcoders, save_transcoders


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adag' has no attribute {name!r}")
