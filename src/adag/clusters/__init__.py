"""Functional groups of graph nodes: ADAG's multi-view clustering (Arora et al. 2026, §3).

A **unit** is ``(layer, neuron, sign of the activation)``: the same MLP neuron firing positively
and negatively is two units, because its two signs push the logits in opposite directions. On each
prompt a unit's input profile (over prompt positions, divided by the neuron's activation) and
output profile (over the targets, each divided by its logit) are summed over the positions where
it is a graph node (:mod:`adag.profiles`). Two units are similar when, on the prompts where both
occur, their input profiles and, separately, their output profiles point the same way (cosine,
averaged over the prompts, clamped at 0); the two views are combined by their harmonic mean.
Spectral clustering of that matrix gives the groups; :class:`Clusters` holds them.

Where things live:

- ``units``        ``Unit``, ``unit_name`` / ``parse_unit``, ``PromptUnits`` (one prompt's units
                   and their summed normalised profiles) and ``prompt_units(graph)``
- ``similarity``   the multi-view similarity ``S`` (sparse, accumulated prompt by prompt)
- ``spectral``     spectral clustering of ``S``; the baselines (k-means and agglomerative on
                   concatenated profiles, random assignment)
- ``diagnostics``  silhouette on ``1 - S``, size balance, intra/inter similarity, sign conflicts
- ``behaviour``    clusters' and units' attribution correlated with a per-prompt score
- ``plots``        the similarity matrix ordered by cluster, cluster sizes by layer
- this module      :func:`cluster` and :class:`Clusters` (assignment, save/load, cluster
                   profiles, viewer supernodes, attribution per prompt)
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adag.clusters.units import PromptUnits, Unit, parse_unit, prompt_units, unit_name
from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.io import digest, shown, write_bytes, write_text
from adag.profiles import COLUMNS as NODE_PROFILE_COLUMNS

METHODS = ("multiview", "kmeans", "agglomerative", "random")
"""``multiview``: ADAG's spectral clustering of the multi-view similarity; the others are the
baselines of ADAG's ablations (on concatenated profiles, and a random assignment)."""

FORMAT = "adag-clusters"
FORMAT_VERSION = 1
JSON_FILE = "clusters.json"
PARQUET_FILE = "clusters.parquet"
PROFILE_COLUMNS = (
    "cluster",
    "prompt_id",
    "side",
    "position",
    "target_id",
    "token",
    "value",
    "n_units",
)


@dataclass(eq=False)
class _Prompt:
    """One prompt as clustering reads it: its units and where its profile entries belong."""

    units: PromptUnits
    positions: np.ndarray
    """(T,) prompt position of each entry of an input profile"""
    tokens: list[str]
    """(T,) the prompt tokens at those positions"""
    target_ids: np.ndarray
    """(K,) target token id of each entry of an output profile"""
    target_tokens: list[str]
    """(K,) their strings"""


@dataclass(eq=False)
class Clusters:
    """A clustering of units ``(layer, neuron, sign)`` into ``n_clusters`` groups.

    ``units[i]`` belongs to cluster ``labels[i]`` (0-based), named ``names[labels[i]]``
    (``"C0"`` .. ``"C{k-1}"``). ``n_prompts[i]`` is the number of prompts unit ``i`` occurs in
    (in the data it was clustered on); ``similarity`` is the matrix it was clustered on, kept in
    memory only. ``settings`` says how the clustering was made (method,
    seed, prompts, similarity definition); ``diagnostics`` are
    :func:`adag.clusters.diagnostics.diagnostics` of the result on the multi-view similarity,
    whatever the method.
    """

    units: list[Unit]
    labels: np.ndarray
    method: str
    n_clusters: int
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)
    n_prompts: np.ndarray | None = None
    similarity: Any = field(default=None, repr=False)
    """the multi-view similarity (scipy sparse, n_units x n_units, rows in the order of
    ``units``) when the clustering was computed in this process; not saved (None after
    :meth:`load`)"""

    def __post_init__(self) -> None:
        self.units = [(int(a), int(b), int(c)) for a, b, c in self.units]
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.units),):
            raise AdagError(
                f"Clusters has {len(self.labels)} labels for {len(self.units)} units; "
                "give one label per unit"
            )
        if self.n_clusters < 1 or (
            len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.n_clusters)
        ):
            raise AdagError(f"Clusters labels must lie in 0..{self.n_clusters - 1}")
        if len(set(self.units)) != len(self.units):
            raise AdagError("Clusters lists a unit twice; each unit belongs to one cluster")
        if self.n_prompts is not None:
            self.n_prompts = np.asarray(self.n_prompts, dtype=np.int64)
            if self.n_prompts.shape != (len(self.units),):
                raise AdagError("Clusters.n_prompts needs one count per unit")

    # -- the assignment ----------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Cluster names ``"C0"`` .. ``"C{k-1}"``."""
        return [f"C{i}" for i in range(self.n_clusters)]

    @property
    def sizes(self) -> list[int]:
        """Number of units of each cluster."""
        return np.bincount(self.labels, minlength=self.n_clusters).tolist()

    def _index(self, name: str) -> int:
        if isinstance(name, str) and name.startswith("C") and name[1:].isdigit():
            i = int(name[1:])
            if i < self.n_clusters and name == f"C{i}":
                return i
        raise AdagError(f"no cluster {name!r}; clusters are C0..C{self.n_clusters - 1}")

    def _lookup(self) -> dict[Unit, int]:
        cache = self.__dict__.get("_label_of")
        if cache is None or len(cache) != len(self.units):
            cache = dict(zip(self.units, self.labels.tolist(), strict=True))
            self.__dict__["_label_of"] = cache
        return cache

    def members(self, name: str) -> list[Unit]:
        """The units of cluster ``name``, in the order of :attr:`units`."""
        i = self._index(name)
        return [u for u, lab in zip(self.units, self.labels.tolist(), strict=True) if lab == i]

    def cluster_of(self, unit: Unit | str) -> str | None:
        """The name of the cluster of ``unit`` (a tuple or a name like ``"12:873:+"``), or None
        if it was not clustered."""
        u = parse_unit(unit) if isinstance(unit, str) else tuple(int(x) for x in unit)
        lab = self._lookup().get(u)  # type: ignore[arg-type]
        return None if lab is None else f"C{lab}"

    def unit_table(self) -> Any:
        """The units as a pyarrow table: ``unit`` (name), ``layer``, ``neuron``, ``sign``,
        ``cluster`` (name), ``n_prompts`` (prompts the unit occurs in; -1 if unknown)."""
        import pyarrow as pa

        arr = np.array(self.units, dtype=np.int64).reshape(-1, 3)
        counts = self.n_prompts if self.n_prompts is not None else np.full(len(self.units), -1)
        return pa.table(
            {
                "unit": pa.array([unit_name(u) for u in self.units], pa.string()),
                "layer": pa.array(arr[:, 0], pa.int64()),
                "neuron": pa.array(arr[:, 1], pa.int64()),
                "sign": pa.array(arr[:, 2], pa.int8()),
                "cluster": pa.array([f"C{i}" for i in self.labels.tolist()], pa.string()),
                "n_prompts": pa.array(np.asarray(counts, dtype=np.int64), pa.int64()),
            }
        )

    # -- files -------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/clusters.parquet`` (:meth:`unit_table`) and then
        ``directory/clusters.json`` (format, method, ``n_clusters``, seed, settings, diagnostics,
        names, sizes and ``assignment``: ``{unit name: cluster name}`` in the order of
        :attr:`units`), each atomically; returns the JSON path. The JSON records the parquet
        file's size and SHA-256, which :meth:`load` checks, so a run stopped between the two
        writes leaves files that do not load rather than a mixed clustering."""
        import pyarrow.parquet as pq

        d = Path(directory)
        buf = io.BytesIO()
        pq.write_table(self.unit_table(), buf)
        data = buf.getvalue()
        write_bytes(d / PARQUET_FILE, data)
        labels = self.labels.tolist()
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "n_clusters": self.n_clusters,
            "seed": self.seed,
            "settings": self.settings,
            "diagnostics": {k: _json_float(v) for k, v in self.diagnostics.items()},
            "names": self.names,
            "sizes": self.sizes,
            "assignment": {
                unit_name(u): f"C{lab}" for u, lab in zip(self.units, labels, strict=True)
            },
            "n_prompts": None if self.n_prompts is None else self.n_prompts.tolist(),
            "unit_table": {"file": PARQUET_FILE, **digest(data)},
        }
        text = json.dumps(meta, ensure_ascii=False, indent=1, allow_nan=False)
        return write_text(d / JSON_FILE, text)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Clusters:
        """Read what :meth:`save` wrote into ``directory``. Raises a one-line
        :class:`AdagError` for a missing or malformed file, or a unit table that is not the one
        the JSON was saved with."""
        d = Path(directory)
        js, pq_path = d / JSON_FILE, d / PARQUET_FILE
        for p in (js, pq_path):
            if not p.is_file():
                raise AdagError(
                    f"{shown(p)} does not exist; cluster the graphs first (adag.cluster, then "
                    "Clusters.save)"
                )
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
            data = pq_path.read_bytes()
        except OSError as e:
            raise AdagError(f"cannot read clusters in {shown(d)} ({e.strerror or e})") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise AdagError(f"{shown(js)} is not valid JSON ({e}); cluster again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise AdagError(f"{shown(js)} is not an adag clusters file")
        if meta.get("version") != FORMAT_VERSION:
            raise AdagError(
                f"{shown(js)} has clusters format version {meta.get('version')}; this adag "
                f"reads version {FORMAT_VERSION}; cluster again"
            )
        record = meta.get("unit_table")
        if not isinstance(record, dict) or {k: record.get(k) for k in ("size", "sha256")} != digest(
            data
        ):
            raise AdagError(
                f"{shown(pq_path)} is not the unit table {shown(js.name)} was saved with (a run "
                "stopped between writing the two?); cluster again"
            )
        try:
            k = meta["n_clusters"]
            assignment = meta["assignment"]
            if not isinstance(k, int) or isinstance(k, bool) or not isinstance(assignment, dict):
                raise TypeError("n_clusters or assignment")
            units = [parse_unit(name) for name in assignment]
            probe = cls(units=[], labels=np.zeros(0), method="", n_clusters=max(k, 1), seed=0)
            labels = [probe._index(c) for c in assignment.values()]
            clusters = cls(
                units=units,
                labels=np.array(labels, dtype=np.int64),
                method=str(meta["method"]),
                n_clusters=k,
                seed=int(meta["seed"]),
                settings=dict(meta.get("settings") or {}),
                diagnostics={
                    str(a): float("nan") if b is None else _read_float(b)
                    for a, b in (meta.get("diagnostics") or {}).items()
                },
                n_prompts=None if meta.get("n_prompts") is None else meta["n_prompts"],
            )
        except (KeyError, TypeError, ValueError) as e:
            detail = f"lacks {e}" if isinstance(e, KeyError) else f"is malformed ({e})"
            raise AdagError(f"{shown(js)} {detail}; cluster again") from None
        return clusters

    # -- reading graphs through the clusters --------------------------------------------------

    def profile(
        self,
        graphs_or_profiles: Sequence[Graph] | Any,
        prompt_ids: Sequence[Any] | None = None,
    ) -> Any:
        """Each cluster's summed input and output profile per prompt, as a pyarrow table (what
        descriptions read), one row per (cluster, prompt, side, position-or-target):

        ``cluster`` (name), ``prompt_id``, ``side`` (``input`` | ``output``), ``position`` (input
        side; -1 on the output side), ``target_id`` (output side; -1 on the input side),
        ``token`` (prompt or target token), ``value`` (the sum, over the cluster's units that
        occur in the prompt, of their normalised profiles summed over positions, the profiles the
        similarity compares) and ``n_units`` (how many of the cluster's units occur there).
        A cluster none of whose units occurs in a prompt has no rows for it. Accepts graphs or a
        profile table of :func:`adag.profile`, as :func:`cluster` does."""
        import pyarrow as pa

        prompts = _prompts(graphs_or_profiles, prompt_ids)
        lookup = self._lookup()
        cols: dict[str, list[Any]] = {c: [] for c in PROFILE_COLUMNS}
        for pr in prompts:
            pu = pr.units
            labs = np.array([lookup.get(u, -1) for u in pu.units], dtype=np.int64)
            if not len(labs):
                continue
            keep = labs >= 0
            if not keep.any():
                continue
            inputs = np.stack([np.asarray(x, dtype=np.float64) for x in pu.inputs])  # (n, T)
            outputs = np.asarray(pu.outputs, dtype=np.float64).reshape(len(labs), -1)  # (n, K)
            T, K = inputs.shape[1], outputs.shape[1]
            present, which, n_units = np.unique(labs[keep], return_inverse=True, return_counts=True)
            c_in = np.zeros((len(present), T))  # (clusters present, T)
            c_out = np.zeros((len(present), K))  # (clusters present, K)
            np.add.at(c_in, which.reshape(-1), inputs[keep])
            np.add.at(c_out, which.reshape(-1), outputs[keep])
            names = np.array([f"C{c}" for c in present.tolist()], dtype=object)
            m = len(present)
            for side, values, pos, tid, tok in (
                ("input", c_in, pr.positions, np.full(T, -1), pr.tokens),
                ("output", c_out, np.full(K, -1), pr.target_ids, pr.target_tokens),
            ):
                width = values.shape[1]
                cols["cluster"].append(np.repeat(names, width))
                cols["prompt_id"].append(np.full(m * width, pu.prompt_id, dtype=object))
                cols["side"].append(np.full(m * width, side, dtype=object))
                cols["position"].append(np.tile(np.asarray(pos, dtype=np.int64), m))
                cols["target_id"].append(np.tile(np.asarray(tid, dtype=np.int64), m))
                cols["token"].append(np.tile(np.array(tok, dtype=object), m))
                cols["value"].append(values.ravel())
                cols["n_units"].append(np.repeat(n_units.astype(np.int64), width))
        data = {c: np.concatenate(v) if v else np.zeros(0, dtype=object) for c, v in cols.items()}
        return pa.table(
            {
                "cluster": pa.array(data["cluster"].tolist(), pa.string()),
                "prompt_id": pa.array(data["prompt_id"].tolist(), pa.string()),
                "side": pa.array(data["side"].tolist(), pa.string()).dictionary_encode(),
                "position": pa.array(data["position"].astype(np.int64), pa.int64()),
                "target_id": pa.array(data["target_id"].astype(np.int64), pa.int64()),
                "token": pa.array(data["token"].tolist(), pa.string()),
                "value": pa.array(data["value"].astype(np.float64), pa.float64()),
                "n_units": pa.array(data["n_units"].astype(np.int64), pa.int64()),
            }
        )

    def node_clusters(self, graph: Graph) -> np.ndarray:
        """(N,) the cluster index of each node of ``graph``: its unit ``(layer, index, sign of
        the activation)`` for neuron nodes; -1 for other nodes and for units not clustered."""
        lookup = self._lookup()
        out = np.full(graph.n_nodes, -1, dtype=np.int64)
        for row, u in zip(*node_units(graph), strict=True):
            out[row] = lookup.get(u, -1)
        return out

    def supernodes(self, graph: Graph) -> list[list[str]]:
        """The viewer grouping of ``graph``: ``[[cluster name, adag node id, ...], ...]`` for the
        clusters with at least one neuron node in the graph, in cluster order, node ids in row
        order — the ``supernodes`` of :func:`adag.graphs.export.to_circuit_tracer`."""
        labs = self.node_clusters(graph)
        groups = []
        for c in range(self.n_clusters):
            rows = np.flatnonzero(labs == c)
            if len(rows):
                groups.append([f"C{c}", *(graph.node_ids[r] for r in rows.tolist())])
        return groups

    def attribution(self, graphs: Graph | Sequence[Graph]) -> np.ndarray:
        """(n_graphs, n_clusters) each cluster's summed node attribution (``node_attribution``
        of its neuron nodes) on each graph; 0 where none of its units is a node."""
        gs = [graphs] if isinstance(graphs, Graph) else list(graphs)
        out = np.zeros((len(gs), self.n_clusters), dtype=np.float64)
        for i, g in enumerate(gs):
            labs = self.node_clusters(g)
            keep = labs >= 0
            np.add.at(out[i], labs[keep], g.node_attribution[keep].astype(np.float64))
        return out


def node_units(graph: Graph) -> tuple[list[int], list[Unit]]:
    """The neuron nodes of ``graph``: their rows and their units ``(layer, index, sign of the
    activation)``."""
    rows = np.flatnonzero(graph.mask("neuron"))
    layer = graph.node_layer[rows].tolist()
    index = graph.node_index[rows].tolist()
    sign = [_sign(a) for a in graph.node_activation[rows].tolist()]
    return rows.tolist(), [(int(a), int(b), s) for a, b, s in zip(layer, index, sign, strict=True)]


def _sign(activation: float) -> int:
    # as adag.clusters.units.prompt_units: a zero activation counts as positive
    return -1 if activation < 0 else 1


def _read_float(v: Any) -> float:
    if isinstance(v, str) and v not in ("nan", "inf", "-inf"):
        raise ValueError(f"diagnostic value {v!r} is not a number")
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise TypeError(f"diagnostic value {v!r} is not a number")
    return float(v)


def _json_float(v: Any) -> float | str:
    # strict JSON has no NaN or inf: those are written as the strings "nan", "inf", "-inf"
    f = float(v)
    return f if math.isfinite(f) else str(f)


# -- inputs: graphs or a profile table --------------------------------------------------------


def _prompts(graphs_or_profiles: Any, prompt_ids: Sequence[Any] | None) -> list[_Prompt]:
    """Graphs (or one graph) or a profile table of :func:`adag.profile` as :class:`_Prompt`s."""
    if isinstance(graphs_or_profiles, Graph):
        graphs_or_profiles = [graphs_or_profiles]
    if hasattr(graphs_or_profiles, "column_names") and hasattr(graphs_or_profiles, "num_rows"):
        return _table_prompts(graphs_or_profiles, prompt_ids)
    gs = list(graphs_or_profiles)
    if not gs:
        raise AdagError("no graphs to cluster; trace some prompts first")
    bad = [type(g).__name__ for g in gs if not isinstance(g, Graph)]
    if bad:
        raise AdagError(
            f"expected graphs or a profile table of adag.profile, got a list of {bad[0]}"
        )
    if prompt_ids is not None and len(prompt_ids) != len(gs):
        raise AdagError(f"got {len(prompt_ids)} prompt ids for {len(gs)} graphs")
    out = []
    for i, g in enumerate(gs):
        pid = str(prompt_ids[i]) if prompt_ids is not None else str(i)
        excluded = set(g.settings.get("excluded_positions", []))
        pos = np.array([p for p in range(len(g.prompt_ids)) if p not in excluded], dtype=np.int64)
        pu = prompt_units(g, prompt_id=pid)
        out.append(
            _Prompt(
                units=pu,
                positions=pos,
                tokens=[g.prompt_tokens[p] for p in pos.tolist()],
                target_ids=np.asarray(g.target_ids, dtype=np.int64),
                target_tokens=list(g.target_tokens),
            )
        )
    return out


_TABLE_NEEDS = tuple(c for c in NODE_PROFILE_COLUMNS if c != "raw")


def _table_prompts(table: Any, prompt_ids: Sequence[Any] | None) -> list[_Prompt]:
    """A profile table as prompts: each neuron node's unit is ``(layer, index, sign of its
    activation)``; its normalised input and output profiles are summed per unit, as
    :func:`adag.clusters.units.prompt_units` does on a graph. ``prompt_ids`` selects and orders
    the prompts (default: all, in the table's order)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [c for c in _TABLE_NEEDS if c not in table.column_names]
    if missing:
        hint = (
            " (written before profiles had one; trace again)" if missing == ["activation"] else ""
        )
        raise AdagError(f"the profile table lacks the columns {missing}{hint}")
    if table.num_rows == 0:
        raise AdagError("the profile table is empty; trace some prompts first")
    table = table.filter(pc.starts_with(table["node"].cast(pa.string()), "neuron:"))

    def codes(name: str) -> tuple[np.ndarray, list[str]]:
        enc = table[name].cast(pa.string()).combine_chunks().dictionary_encode()
        return enc.indices.to_numpy(zero_copy_only=False), enc.dictionary.to_pylist()

    prompt_code, prompt_names = codes("prompt_id")
    node_code, node_names = codes("node")
    side_code, side_names = codes("side")
    is_input = np.isin(side_code, [i for i, x in enumerate(side_names) if x == "input"])
    try:
        node_index = np.array([int(n.split(":")[3]) for n in node_names], dtype=np.int64)
    except (IndexError, ValueError):
        raise AdagError(
            "the profile table has a malformed neuron id; it is not one of adag.profile"
        ) from None
    num = {c: table[c].to_numpy() for c in ("layer", "activation", "position", "target_id")}
    value = table["value"].to_numpy()
    # prompt_units takes a ratio with a zero denominator (activation or logit) as 0
    value = np.where(np.isfinite(value), value, 0.0)
    token = table["token"].to_numpy(zero_copy_only=False)
    # the unit of each row as one int64 that sorts like the tuple (layer, index, sign)
    unit_key = (num["layer"].astype(np.int64) << 33) | (node_index[node_code] << 1)
    unit_key |= (num["activation"] >= 0).astype(np.int64)

    # table order of first appearance; prompt_ids selects and reorders
    first = np.unique(prompt_code, return_index=True)[1] if len(prompt_code) else np.zeros(0)
    order = [prompt_names[prompt_code[i]] for i in np.sort(first).tolist()]
    if prompt_ids is not None:
        known = set(order)
        want = [str(p) for p in prompt_ids]
        unknown = [p for p in want if p not in known]
        if unknown:
            more = ", ..." if len(order) > 5 else ""
            raise AdagError(
                f"prompt {unknown[0]!r} has no neuron rows in the profile table; "
                f"its prompts are {', '.join(order[:5])}{more}"
            )
        order = want
    code_of = {name: i for i, name in enumerate(prompt_names)}
    sort = np.argsort(prompt_code, kind="stable")
    bounds = np.searchsorted(prompt_code[sort], np.arange(len(prompt_names) + 1))

    out = []
    for pid in order:
        c = code_of[pid]
        rows = sort[bounds[c] : bounds[c + 1]]  # in table order
        rin, rout = rows[is_input[rows]], rows[~is_input[rows]]
        positions, pos_first, pos_col = np.unique(
            num["position"][rin], return_index=True, return_inverse=True
        )
        # the targets: one output row per target for each node, in the graph's target order
        out_node = node_code[rout]
        by_node = np.argsort(out_node, kind="stable")
        starts = np.searchsorted(out_node[by_node], out_node[by_node])
        rank = np.empty(len(rout), dtype=np.int64)
        rank[by_node] = np.arange(len(rout)) - starts
        per_node = np.bincount(out_node)
        per_node = per_node[per_node > 0]
        K = int(per_node[0]) if len(per_node) else 0
        if len(per_node) and np.any(per_node != K):
            raise AdagError(
                f"the nodes of prompt {pid!r} have different numbers of output rows; the "
                "profile table is not one of adag.profile"
            )
        t_rows = rout[out_node == out_node[0]] if len(rout) else rout
        keys, slot = np.unique(unit_key[rows], return_inverse=True)  # slot: unit of each row
        inputs = np.zeros((len(keys), len(positions)))
        outputs = np.zeros((len(keys), K))
        mask = is_input[rows]
        np.add.at(inputs, (slot[mask], pos_col.reshape(-1)), value[rin])
        np.add.at(outputs, (slot[~mask], rank), value[rout])
        pu = PromptUnits(
            units=[(k >> 33, (k >> 1) & 0xFFFFFFFF, 1 if k & 1 else -1) for k in keys.tolist()],
            inputs=list(inputs),
            outputs=outputs,
            prompt_id=pid,
        )
        out.append(
            _Prompt(
                units=pu,
                positions=positions.astype(np.int64),
                tokens=[str(t) for t in token[rin][pos_first]],
                target_ids=num["target_id"][t_rows].astype(np.int64),
                target_tokens=[str(t) for t in token[t_rows]],
            )
        )
    return out


# -- clustering --------------------------------------------------------------------------------


def cluster(
    graphs_or_profiles: Sequence[Graph] | Any,
    *,
    n_clusters: int,
    method: str = "multiview",
    seed: int = 42,
    prompt_ids: Sequence[Any] | None = None,
    top_m: int | None = None,
) -> Clusters:
    """Cluster the neuron units of ``graphs_or_profiles`` (a list of :class:`Graph`, or a profile
    table of :func:`adag.profile`) into ``n_clusters`` groups.

    ``method``: ``multiview`` (ADAG: spectral clustering of the multi-view similarity), or a
    baseline: ``kmeans`` / ``agglomerative`` (on concatenated profiles) or ``random``.
    ``seed`` fixes k-means and the random assignment. ``prompt_ids`` names the graphs' prompts
    (default ``"0"``, ``"1"``, ...); with a table it selects and orders its prompts.
    Diagnostics are computed on the multi-view similarity for every method. ``top_m``: keep only
    each unit's ``top_m`` most similar neighbours (a pair stays when either end keeps it), for
    datasets whose exact similarity has too many pairs (see :func:`adag.clusters.similarity`
    and BENCHMARKS.md); ``None`` is ADAG's exact definition.

    Raises a one-line :class:`AdagError` for no graphs, no neuron units, ``n_clusters`` out of
    ``2..n_units`` or an unknown method.
    """
    from adag.clusters.diagnostics import diagnostics
    from adag.clusters.similarity import similarity
    from adag.clusters.spectral import baseline_labels, spectral_labels

    if method not in METHODS:
        raise AdagError(f"unknown clustering method {method!r}; methods are {', '.join(METHODS)}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer):
        raise AdagError(f"n_clusters must be a whole number, got {n_clusters!r}")
    if n_clusters < 2:
        raise AdagError(f"n_clusters must be at least 2, got {n_clusters}")
    given = [p.units for p in _prompts(graphs_or_profiles, prompt_ids)]
    # a prompt without neuron nodes adds nothing to any similarity (nor is it in a profile table)
    prompts = [pu for pu in given if pu.units]
    if not prompts:
        raise AdagError("the graphs have no neuron nodes to cluster; trace with a lower threshold")
    if top_m is not None and top_m < 1:
        raise AdagError(f"top_m must be at least 1 (or None for the exact similarity), got {top_m}")
    units, S = similarity(prompts, top_m=top_m)
    n = len(units)
    if n_clusters > n:
        raise AdagError(
            f"n_clusters {n_clusters} is larger than the number of units ({n}); ask for at most {n}"
        )
    if method == "multiview":
        labels = spectral_labels(S, int(n_clusters), seed=seed)
    else:
        labels = baseline_labels(method, prompts, units, int(n_clusters), seed=seed)
    labels = np.asarray(labels, dtype=np.int64)
    index = {u: i for i, u in enumerate(units)}
    counts = np.zeros(n, dtype=np.int64)
    for pu in prompts:
        for u in set(pu.units):
            counts[index[u]] += 1
    diag = diagnostics(S, labels, units, prompts)
    settings = {
        "method": method,
        "n_clusters": int(n_clusters),
        "seed": int(seed),
        "top_m": top_m,
        "n_units": n,
        "n_prompts": len(given),
        "prompt_ids": [pu.prompt_id for pu in given],
        "prompts_without_units": [pu.prompt_id for pu in given if not pu.units],
        "unit": "(layer, neuron, sign of activation)",
        "similarity": "multiview: harmonic mean of input and output profile cosines, "
        "averaged over co-occurrences, clamped at 0",
    }
    return Clusters(
        units=list(units),
        labels=labels,
        method=method,
        n_clusters=int(n_clusters),
        seed=int(seed),
        settings=settings,
        diagnostics={str(k): float(v) for k, v in diag.items()},
        n_prompts=counts,
        similarity=S,
    )


__all__ = ["METHODS", "Clusters", "cluster", "node_units"]
