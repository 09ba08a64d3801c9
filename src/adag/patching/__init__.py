"""Localisation: activation patching (ground truth), AtP and AtP* (Kramár et al. 2024), the
false-negative bound, the baselines and the cost-versus-recall evaluation."""

from __future__ import annotations

from adag.patching.atp import atp, atp_star
from adag.patching.node_sets import NODE_SETS, Group, NodeSet, node_set
from adag.patching.patch import PatchingOracle, exhaustive
from adag.patching.scores import NodeScores

__all__ = [
    "NODE_SETS",
    "Group",
    "NodeScores",
    "NodeSet",
    "PatchingOracle",
    "atp",
    "atp_star",
    "exhaustive",
    "node_set",
]
