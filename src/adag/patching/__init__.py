"""Localisation: activation patching (ground truth, resumed at the patched layer and position),
AtP and AtP* (Kramár et al. 2024), AtP-IG and per-layer IG, the downstream QK fix, adaptive
verification (``localize``), ablations and faithfulness, the false-negative bound, the baselines
and the cost-versus-recall evaluation."""

from __future__ import annotations

from adag.patching.ablate import ablate, faithfulness
from adag.patching.atp import atp, atp_star
from adag.patching.dqk import atp_dqk
from adag.patching.ig import atp_ig, layer_ig
from adag.patching.localize import localize, verify
from adag.patching.node_sets import NODE_SETS, Group, NodeSet, node_set
from adag.patching.patch import PatchingOracle, exhaustive
from adag.patching.scores import NodeScores

__all__ = [
    "NODE_SETS",
    "Group",
    "NodeScores",
    "NodeSet",
    "PatchingOracle",
    "ablate",
    "atp",
    "atp_dqk",
    "atp_ig",
    "atp_star",
    "exhaustive",
    "faithfulness",
    "layer_ig",
    "localize",
    "node_set",
    "verify",
]
