"""``Graph``: the one attribution-graph type of adag (neuron graphs from :func:`adag.trace`, and
transcoder graphs later), with lossless save/load (safetensors + JSON, no pickle).

Layout (``N`` nodes, ``E`` edges, ``T`` prompt positions, ``K`` targets):

======================  ===============  =========================================================
field                   shape / type     meaning
======================  ===============  =========================================================
``node_ids``            list[str] (N)    DESIGN.md ids: ``embed:P``, ``neuron:L:P:I``,
                                         ``feature:L:P:I``, ``error:L:P``, ``logit:T``
``node_kinds``          list[str] (N)    ``embed`` | ``neuron`` | ``feature`` | ``error`` | ``logit``
``node_layer``          int64 (N)        layer; ``-1`` for embeddings, ``n_layers`` for logits
``node_position``       int64 (N)        prompt position (logits: the traced position)
``node_index``          int64 (N)        neuron / feature index; token id for embeds and logits
``node_activation``     float (N)        neuron / feature activation ``a``; the logit for logit
                                         nodes; ``‖e_P‖`` for embeddings, ``‖err‖`` for errors
``node_attribution``    float (N)        attribution to the metric ``m`` (RelP ``a · dm/da`` for
                                         neurons and embeddings ``Σ_d e·dm/de``; ``c_j · logit_j``
                                         for the target logit ``j`` with coefficient ``c_j``)
``node_tokens``         list[str] (N)    the prompt token at the node's position (logits: target)
``edge_source``         int32 (E)        row of the source node
``edge_target``         int32 (E)        row of the target node
``edge_weight``         float (E)        direct effect of the source on the target, normalised by
                                         the target: ``a_s · ∂a_t/∂a_s / a_t`` (the MLPs strictly
                                         between are stop-gradded); into logits
                                         ``contribution / logit``
``edge_flow``           float (E)        ``edge_weight · node_attribution[target] / metric``
``input_attr``          float (N, T)     ``Σ_d e_{P,d} · da_v/de_{P,d}`` for each node and prompt
                                         position (total effect under the linearised backward);
                                         zeros for nodes with none
``output_attr``         float (N, K)     ``a_v · dlogit_j/da_v`` (total effect) for each target
``target_ids``          int64 (K)        target token ids
``target_tokens``       list[str] (K)    their strings
``target_coef``         float (K)        ``m = Σ_j target_coef[j] · logit_j``
``target_logits``       float (K)        target logits at the traced position
``target_probs``        float (K)        their probabilities (softmax over the whole vocabulary)
``prompt_ids``          int64 (T)        the assembled input (chat template and seed included)
``prompt_tokens``       list[str] (T)    its tokens as strings
``prompt``              str              the assembled input text (``""`` if given as ids)
``metric``              float            ``m`` at the traced position (``T - 1``)
``settings``            dict             how the graph was made (model, k, thresholds, rules, ...)
======================  ===============  =========================================================

Edges point from earlier to later nodes (sources: embeddings, neurons; targets: neurons, logits)
and form a DAG. Node rows are in the order embeddings, neurons (by layer, position, index), logits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from adag.errors import AdagError
from adag.io import digest, shown, write_bytes, write_text

FORMAT = "adag-graph"
FORMAT_VERSION = 2
"""2: the JSON records the size and SHA-256 of its tensor file (version 1 did not)."""

ARRAY_FIELDS = (
    # every array field of Graph (stored in the .safetensors file)
    "node_layer",
    "node_position",
    "node_index",
    "node_activation",
    "node_attribution",
    "edge_source",
    "edge_target",
    "edge_weight",
    "edge_flow",
    "input_attr",
    "output_attr",
    "target_ids",
    "target_coef",
    "target_logits",
    "target_probs",
    "prompt_ids",
)
_JSON = ("node_ids", "node_kinds", "node_tokens", "target_tokens", "prompt_tokens", "prompt")
NODE_KINDS = ("embed", "neuron", "feature", "error", "logit")


@dataclass(eq=False)
class Graph:
    """An attribution graph for one prompt; see the module docstring for the exact layout."""

    node_ids: list[str]
    node_kinds: list[str]
    node_layer: np.ndarray
    node_position: np.ndarray
    node_index: np.ndarray
    node_activation: np.ndarray
    node_attribution: np.ndarray
    node_tokens: list[str]
    edge_source: np.ndarray
    edge_target: np.ndarray
    edge_weight: np.ndarray
    edge_flow: np.ndarray
    input_attr: np.ndarray
    output_attr: np.ndarray
    target_ids: np.ndarray
    target_tokens: list[str]
    target_coef: np.ndarray
    target_logits: np.ndarray
    target_probs: np.ndarray
    prompt_ids: np.ndarray
    prompt_tokens: list[str]
    prompt: str = ""
    metric: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    logit_mean_effect: np.ndarray | None = None
    """``(N,)`` or None: each node's raw direct effect on the vocabulary mean of the logits
    (``a_s · ∂ mean_v(logit_v) / ∂a_s``, 0 for logit nodes), traced for transcoder graphs so that
    :meth:`adjacency` can give circuit-tracer's demeaned logit rows."""

    def __post_init__(self) -> None:
        # edge rows are int32 (graphs of millions of edges; rows < 2**31): saved graphs with
        # int64 rows load the same
        self.edge_source = np.ascontiguousarray(self.edge_source, dtype=np.int32)
        self.edge_target = np.ascontiguousarray(self.edge_target, dtype=np.int32)
        n, e = len(self.node_ids), len(self.edge_source)
        t, k = len(self.prompt_ids), len(self.target_ids)
        want = {
            "node_kinds": (n,),
            "node_layer": (n,),
            "node_position": (n,),
            "node_index": (n,),
            "node_activation": (n,),
            "node_attribution": (n,),
            "node_tokens": (n,),
            "edge_target": (e,),
            "edge_weight": (e,),
            "edge_flow": (e,),
            "input_attr": (n, t),
            "output_attr": (n, k),
            "target_tokens": (k,),
            "target_coef": (k,),
            "target_logits": (k,),
            "target_probs": (k,),
            "prompt_tokens": (t,),
        }
        if self.logit_mean_effect is not None:
            want["logit_mean_effect"] = (n,)
        for name, shape in want.items():
            v = getattr(self, name)
            got = tuple(v.shape) if isinstance(v, np.ndarray) else (len(v),)
            if got != shape:
                raise AdagError(f"Graph field {name} has shape {got}, expected {shape}")
        bad = sorted(set(self.node_kinds) - set(NODE_KINDS))
        if bad:
            raise AdagError(f"unknown node kinds {bad}; kinds are {', '.join(NODE_KINDS)}")
        if e and (
            self.edge_source.min() < 0 or max(self.edge_source.max(), self.edge_target.max()) >= n
        ):
            raise AdagError("Graph edges refer to node rows that do not exist")

    # -- views -------------------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        return len(self.node_ids)

    @property
    def n_edges(self) -> int:
        return len(self.edge_source)

    def index_of(self, node_id: str) -> int:
        """Row of a node id."""
        try:
            return self._rows()[node_id]
        except KeyError:
            raise AdagError(f"node {node_id!r} is not in this graph") from None

    def _rows(self) -> dict[str, int]:
        rows = self.__dict__.get("_row_cache")
        if rows is None or len(rows) != len(self.node_ids):
            rows = {n: i for i, n in enumerate(self.node_ids)}
            self.__dict__["_row_cache"] = rows
        return rows

    def mask(self, kind: str) -> np.ndarray:
        """Boolean mask of the nodes of one kind."""
        return np.array([k == kind for k in self.node_kinds], dtype=bool)

    def edge_dict(self) -> dict[tuple[str, str], float]:
        """``{(source id, target id): weight}``."""
        ids = self.node_ids
        return {
            (ids[s], ids[t]): float(w)
            for s, t, w in zip(
                self.edge_source.tolist(),
                self.edge_target.tolist(),
                self.edge_weight.tolist(),
                strict=True,
            )
        }

    def adjacency(self, kind: str = "raw") -> Any:
        """The edges as a sparse ``(N, N)`` float64 ``scipy.sparse.csr_matrix``, rows = targets,
        columns = sources (circuit-tracer's orientation); absent edges are 0.

        - ``kind="raw"``: the un-normalised direct effect ``A[t, s] = edge_weight ·
          node_activation[t] = a_s · ∂a_t/∂a_s`` (into a logit: the source's contribution to
          the logit). For transcoder graphs this is circuit-tracer's adjacency entry
          (``adjacency_matrix[target, source]``) for feature, error and embedding sources into
          feature targets: a feature's activation is ``r · pre`` with ``r = 1`` on every active
          feature, so ``A[t, s] = a_s · ∂pre_t/∂a_s``, the direct effect on the target's
          pre-activation. Two differences remain: circuit-tracer's logit rows are the direct
          effects on the logit *minus the vocabulary mean of the logits* (its unembedding
          directions are demeaned), ours on the logit itself; and circuit-tracer zeroes features
          at a BOS position but keeps that position's embedding and error nodes, while adag
          (``exclude_bos``) leaves the whole position out.
        - ``kind="circuit_tracer"``: ``"raw"`` with circuit-tracer's logit rows: the direct
          effect on the logit minus the vocabulary mean of the logits,
          ``A[t, s] − logit_mean_effect[s]`` (needs :attr:`logit_mean_effect`, traced for
          transcoder graphs; with ``edge_threshold=0`` every source of a logit row is present).
        - ``kind="weight"``: ``edge_weight`` itself, ``A[t, s] / node_activation[t]``.

        Only the edges the graph holds are present (those with ``|w| >= edge_threshold``)."""
        import scipy.sparse as sp

        if kind not in ("raw", "weight", "circuit_tracer"):
            raise AdagError(
                f"adjacency kind must be 'raw', 'circuit_tracer' or 'weight', got {kind!r}"
            )
        w = self.edge_weight.astype(np.float64)
        if kind != "weight":
            w = w * self.node_activation.astype(np.float64)[self.edge_target]
        if kind == "circuit_tracer":
            if self.logit_mean_effect is None:
                raise AdagError(
                    "this graph has no logit_mean_effect (neuron graphs do not trace it); "
                    "use adjacency('raw') or trace with transcoders"
                )
            into_logit = self.mask("logit")[self.edge_target]
            w = w - np.where(into_logit, self.logit_mean_effect[self.edge_source], 0.0)
        n = self.n_nodes
        return sp.csr_matrix((w, (self.edge_target, self.edge_source)), shape=(n, n))

    def node_table(self) -> Any:
        """The nodes as a pyarrow table (id, kind, layer, position, index, activation,
        attribution, token)."""
        import pyarrow as pa

        return pa.table(
            {
                "id": self.node_ids,
                "kind": self.node_kinds,
                "layer": self.node_layer,
                "position": self.node_position,
                "index": self.node_index,
                "activation": self.node_activation,
                "attribution": self.node_attribution,
                "token": self.node_tokens,
            }
        )

    def edge_table(self) -> Any:
        """The edges as a pyarrow table (source id, target id, weight, flow)."""
        import pyarrow as pa

        ids = np.array(self.node_ids, dtype=object)
        return pa.table(
            {
                "source": ids[self.edge_source].tolist(),
                "target": ids[self.edge_target].tolist(),
                "weight": self.edge_weight,
                "flow": self.edge_flow,
            }
        )

    def summary(self) -> dict[str, Any]:
        """Counts and coverage: nodes by kind and layer, edges, the metric, and the fraction of
        ``m`` carried by the kept embeddings' attributions and by the edges into the logits."""
        kinds = {k: int(sum(1 for x in self.node_kinds if x == k)) for k in NODE_KINDS}
        neuron = self.mask("neuron")
        layers = {
            int(k): int(v)
            for k, v in zip(*np.unique(self.node_layer[neuron], return_counts=True), strict=True)
        }
        logit_rows = np.flatnonzero(self.mask("logit"))
        into_logits = np.isin(self.edge_target, logit_rows)
        m = self.metric if self.metric != 0 else float("nan")
        return {
            "prompt": self.prompt,
            "targets": list(self.target_tokens),
            "metric": float(self.metric),
            "nodes": self.n_nodes,
            "nodes_by_kind": {k: v for k, v in kinds.items() if v},
            "neurons_by_layer": layers,
            "edges": self.n_edges,
            "embed_attribution_fraction": float(
                self.node_attribution[self.mask("embed")].sum() / m
            ),
            "logit_flow_fraction": float(self.edge_flow[into_logits].sum()),
        }

    def prune(self, *, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
        """A new graph keeping the nodes and edges that carry the given fractions of cumulative
        influence on the logits (circuit tracing; see :func:`adag.graphs.prune.prune`)."""
        from adag.graphs.prune import prune

        return prune(self, node_threshold=node_threshold, edge_threshold=edge_threshold)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
                    return False
                if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``PATH.safetensors`` (the arrays) and ``PATH.json`` (ids, strings, settings);
        ``path`` may end in either suffix or none. Returns the JSON path.

        The two files are one unit: each is written atomically, the tensors first, and the JSON
        (written last) records the size and SHA-256 of the tensors it belongs to, which
        :meth:`load` checks. A run killed between the two writes therefore leaves a pair that
        does not load (new tensors beside an old or missing JSON), never a mixed graph."""
        from safetensors.numpy import save

        base = _base(path)
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in ARRAY_FIELDS}
        if self.logit_mean_effect is not None:  # optional: transcoder graphs only
            arrays["logit_mean_effect"] = np.ascontiguousarray(self.logit_mean_effect)
        # one metadata entry: safetensors writes its metadata in a Rust HashMap's random order,
        # so two entries would make equal graphs differ byte for byte between saves
        data = save(arrays, metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
        write_bytes(_with(base, ".safetensors"), data)
        meta: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
        meta["tensors"] = digest(data)
        meta.update({name: getattr(self, name) for name in _JSON})
        meta["metric"] = self.metric
        meta["settings"] = self.settings
        return write_text(_with(base, ".json"), json.dumps(meta, ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Graph:
        """Read a graph written by :meth:`save`. Raises a one-line :class:`AdagError` for a
        missing file, a malformed one, or tensors that are not the ones the JSON records (the two
        files of different saves)."""
        from safetensors.numpy import load

        base = _base(path)
        js, st = _with(base, ".json"), _with(base, ".safetensors")
        for p in (js, st):
            if not p.exists():
                raise AdagError(
                    f"graph file {shown(p)} does not exist; write graphs with Graph.save"
                )
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
            data = st.read_bytes()
        except OSError as e:
            raise AdagError(f"cannot read graph {shown(base)} ({e.strerror or e})") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise AdagError(
                f"{shown(js)} is not valid JSON ({e}); re-create it with Graph.save"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise AdagError(f"{shown(js)} is not an adag graph")
        if meta.get("version") != FORMAT_VERSION:
            raise AdagError(
                f"{shown(js)} has graph format version {meta.get('version')}; this adag reads "
                f"version {FORMAT_VERSION}; trace the graph again"
            )
        record = meta.get("tensors")
        if not isinstance(record, dict) or record != digest(data):
            raise AdagError(
                f"{shown(st)} is not the tensor file {shown(js.name)} was saved with (a run "
                "stopped between writing the two?); trace the graph again"
            )
        arrays = load(data)
        missing = [n for n in ARRAY_FIELDS if n not in arrays]
        missing += [n for n in (*_JSON, "metric") if n not in meta]
        if missing:
            raise AdagError(f"graph {shown(base)} lacks {missing}; re-create it with Graph.save")
        kwargs: dict[str, Any] = {n: arrays[n] for n in ARRAY_FIELDS}
        kwargs["logit_mean_effect"] = arrays.get("logit_mean_effect")
        kwargs.update({n: meta[n] for n in _JSON})
        return cls(**kwargs, metric=float(meta["metric"]), settings=meta.get("settings", {}))


def _base(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def _with(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)


__all__ = ["ARRAY_FIELDS", "NODE_KINDS", "Graph"]
