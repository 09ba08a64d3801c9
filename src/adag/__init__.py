"""adag: find and explain the circuits inside language models.

The front door is small and imported lazily, so ``import adag`` is cheap::

    import adag
    model = adag.load_model()                   # SmolLM2-135M-Instruct, offline
    model.top_k("The capital of France is")     # [TokenProb(token=' Paris', ...), ...]
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
    "NodeScores": "adag.patching.scores",
    "PromptPair": "adag.tasks.pairs",
    "trace": "adag.graphs.neurons",
    "Graph": "adag.graphs.graph",
    "profile": "adag.profiles",
}

__all__ = [
    "AdagError",
    "Graph",
    "Model",
    "NodeScores",
    "Patch",
    "PromptPair",
    "SiteRun",
    "__version__",
    "atp",
    "atp_star",
    "linearize",
    "load_model",
    "profile",
    "trace",
]

if TYPE_CHECKING:
    from adag.errors import AdagError
    from adag.graphs.graph import Graph
    from adag.graphs.neurons import trace
    from adag.models.linear import linearize
    from adag.models.load import load_model
    from adag.models.model import Model
    from adag.models.sites import Patch, SiteRun
    from adag.patching.atp import atp, atp_star
    from adag.patching.scores import NodeScores
    from adag.profiles import profile
    from adag.tasks.pairs import PromptPair


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adag' has no attribute {name!r}")
