"""Attribution profiles of graph nodes (ADAG, Arora et al. 2026, §3.1).

For every kept neuron (or transcoder feature) ``v`` of a graph:

* the **input profile** over prompt positions ``p``: ``Σ_d e_{p,d} · da_v/de_{p,d} / a_v`` — which
  tokens the node's activation comes from (total effect under the linearised backward; sums to 1
  when the model has no bias terms);
* the **output profile** over the graph's targets ``j``: ``a_v · dlogit_j/da_v / logit_j`` — which
  target logits the node pushes, as a fraction of each logit.

The raw numerators are stored on the :class:`~adag.graphs.graph.Graph` (``input_attr``,
``output_attr``); this module normalises them and lays them out as one long table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.io import write_parquet

PROFILE_KINDS = ("neuron", "feature")
COLUMNS = (
    "prompt_id",
    "node",
    "layer",
    "activation",
    "side",
    "position",
    "target_id",
    "token",
    "value",
    "raw",
)


def profile(graphs: Graph | Sequence[Graph], *, prompt_ids: Sequence[Any] | None = None) -> Any:
    """The attribution profiles of every neuron/feature node of ``graphs`` as a pyarrow table,
    one row per (prompt, node, side, position-or-target):

    ``prompt_id`` (the graph's index, or ``prompt_ids[i]`` as a string), ``node`` (id), ``layer``,
    ``activation`` (the node's activation ``a_v``, the same on all of its rows; its sign decides
    the node's clustering unit ``(layer, neuron, sign)``, see :mod:`adag.clusters`),
    ``side`` (``input`` | ``output``), ``position`` (input side; -1 on the output side),
    ``target_id`` (output side; -1 on the input side), ``token`` (the prompt token or the target
    token), ``value`` (the normalised profile) and ``raw`` (its numerator). Positions a graph
    excluded from its nodes (a leading BOS) are left out of the input side.
    """
    import pyarrow as pa

    gs = [graphs] if isinstance(graphs, Graph) else list(graphs)
    if not gs:
        raise AdagError("no graphs to profile; trace some prompts first")
    if prompt_ids is not None and len(prompt_ids) != len(gs):
        raise AdagError(f"got {len(prompt_ids)} prompt ids for {len(gs)} graphs")
    cols: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    for gi, g in enumerate(gs):
        pid = str(prompt_ids[gi]) if prompt_ids is not None else str(gi)
        rows = np.flatnonzero(np.isin(np.array(g.node_kinds), PROFILE_KINDS))
        if not len(rows):
            continue
        act = g.node_activation[rows].astype(np.float64)
        excluded = set(g.settings.get("excluded_positions", []))
        pos = np.array([p for p in range(len(g.prompt_ids)) if p not in excluded], dtype=np.int64)
        ids = np.array(g.node_ids, dtype=object)[rows]
        # input side: (n, P)
        raw_in = g.input_attr[rows][:, pos].astype(np.float64)
        n, P = raw_in.shape
        _append(
            cols,
            pid,
            np.repeat(ids, P),
            np.repeat(g.node_layer[rows], P),
            np.repeat(act, P),
            "input",
            np.tile(pos, n),
            np.full(n * P, -1),
            np.tile(np.array(g.prompt_tokens, dtype=object)[pos], n),
            (raw_in / act[:, None]).ravel(),
            raw_in.ravel(),
        )
        # output side: (n, K)
        raw_out = g.output_attr[rows].astype(np.float64)
        K = raw_out.shape[1]
        _append(
            cols,
            pid,
            np.repeat(ids, K),
            np.repeat(g.node_layer[rows], K),
            np.repeat(act, K),
            "output",
            np.full(n * K, -1),
            np.tile(g.target_ids, n),
            np.tile(np.array(g.target_tokens, dtype=object), n),
            (raw_out / g.target_logits.astype(np.float64)[None, :]).ravel(),
            raw_out.ravel(),
        )
    data: dict[str, Any] = {}
    for c in COLUMNS:
        parts = cols[c]
        data[c] = np.concatenate(parts) if parts else np.zeros(0)
    return pa.table(
        {
            "prompt_id": pa.array(data["prompt_id"].tolist(), pa.string()),
            "node": pa.array(data["node"].tolist(), pa.string()),
            "layer": pa.array(data["layer"], pa.int64()),
            "activation": pa.array(data["activation"], pa.float64()),
            "side": pa.array(data["side"].tolist(), pa.string()).dictionary_encode(),
            "position": pa.array(data["position"], pa.int64()),
            "target_id": pa.array(data["target_id"], pa.int64()),
            "token": pa.array(data["token"].tolist(), pa.string()),
            "value": pa.array(data["value"], pa.float64()),
            "raw": pa.array(data["raw"], pa.float64()),
        }
    )


def _append(
    cols: dict[str, list[np.ndarray]],
    pid: str,
    node: np.ndarray,
    layer: np.ndarray,
    activation: np.ndarray,
    side: str,
    position: np.ndarray,
    target: np.ndarray,
    token: np.ndarray,
    value: np.ndarray,
    raw: np.ndarray,
) -> None:
    n = len(node)
    cols["prompt_id"].append(np.full(n, pid, dtype=object))
    cols["node"].append(node)
    cols["layer"].append(layer.astype(np.int64))
    cols["activation"].append(activation)
    cols["side"].append(np.full(n, side, dtype=object))
    cols["position"].append(position.astype(np.int64))
    cols["target_id"].append(target.astype(np.int64))
    cols["token"].append(token)
    cols["value"].append(value)
    cols["raw"].append(raw)


def save_profiles(table: Any, path: str | os.PathLike[str]) -> Path:
    """Write a profile table as parquet (atomically)."""
    return write_parquet(table, path)


__all__ = ["profile", "save_profiles"]
