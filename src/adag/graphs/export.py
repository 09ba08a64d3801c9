"""Viewer JSON: write a :class:`~adag.graphs.graph.Graph` in the graph format of circuit-tracer's
frontend and Neuronpedia. Write-only: the lossless format of a graph is
:meth:`~adag.graphs.graph.Graph.save`; this file is for looking at it.

Followed from the ``circuit-tracer`` library (``circuit_tracer/frontend/graph_models.py`` and
``circuit_tracer/utils/create_graph_files.py``, ``circuit_tracer/frontend/utils.py``):

- The file is ``{"metadata", "qParams", "nodes", "links"}`` (pydantic ``Model``), keys in the
  library's order. ``metadata`` (``Metadata``): ``slug``, ``scan``, ``transcoder_list``,
  ``prompt_tokens`` (passed through ``process_token``: ``\\n`` → ``⏎``, ``\\t`` → ``→``,
  ``\\r`` → ``↵``), ``prompt``, ``node_threshold``, ``schema_version`` (1). ``qParams``
  (``QParams``): ``pinnedIds``, ``supernodes`` (``[[name, node_id, ...], ...]``), ``linkType``
  ``"both"``, ``clickedId`` ``""``, ``sg_pos`` ``""``.
- Every node has the ``Node`` fields ``node_id``, ``feature``, ``layer``, ``ctx_idx``,
  ``feature_type``, ``token_prob``, ``is_target_logit``, ``run_idx`` (0), ``reverse_ctx_idx``
  (0), ``jsNodeId``, ``clerp``, ``influence``, ``activation``, built as the classmethods do.
  ``node_id``, ``feature``, ``layer``, ``feature_type`` and ``jsNodeId`` of each kind come from
  :func:`adag.nodes.circuit_tracer_fields` (the one place that maps adag ids to circuit-tracer's;
  its docstring lists the rules); ``ctx_idx`` is the position. Neuron and feature nodes get
  their activation; logit nodes get ``token_prob`` from ``target_probs``, ``clerp``
  ``Output "tok" (p=0.123)`` and ``influence``/``activation`` null; embedding and error nodes
  get ``activation`` null. ``influence`` is the node's cumulative influence fraction
  (``prune_graph``'s ``cumulative_scores``, see :func:`adag.graphs.prune.cumulative_influence`).
- Links are ``{"source": node_id, "target": node_id, "weight": w}`` with the source upstream;
  ``w`` is the raw direct effect of the source on the target, circuit-tracer's adjacency entry
  (:meth:`~adag.graphs.graph.Graph.adjacency` ``"raw"``: ``edge_weight · node_activation[t]``),
  so its sign and colour mean what the frontend shows them as.
- The index ``graph-metadata.json`` is ``{"graphs": [metadata, ...]}`` holding each graph's
  ``metadata`` (``add_graph_metadata``). :func:`write_index` builds it in one step from the graph
  files of a directory, after all of them are written; :func:`write_viewer` writes only the graph
  file, so writing many graphs never read-modify-writes the index.

Deviations, each deliberate:

- ``is_target_logit`` is true for every target of the metric (circuit-tracer marks only its
  top-1 logit; every adag target is part of the metric).
- A list ``scan`` becomes ``"custom-"`` + a SHA-256 digest (circuit-tracer uses Python's
  ``hash``, which changes between processes).
- Graph files are written compactly (``separators=(",", ":")``), not indented; both parse alike.
- The order of nodes and links is the graph's row and edge order.
- ``influence`` is the cumulative fraction over the unpruned graph when ``full_graph=`` is given
  (what the pipeline writes, as circuit-tracer computes it before pruning), else over the nodes
  of the graph given; ``influence=`` chooses the scores.
- Error nodes use the current library's jsNodeId ``L_-1-P`` (older releases wrote ``L_P-0``,
  which could alias a feature node's jsNodeId).

adag additions, ignored by circuit-tracer's viewer and shown by adag's: ``metadata`` gets
``adag_targets`` (the graph's targets in its order, the order of every node's ``output_attr``:
``token``, ``token_id``, ``prob``, ``logit``, ``coef``, the metric's coefficient); a transcoder graph's
``metadata`` also gets ``transcoder_kind`` (``"plt"`` or ``"clt"``; every feature keeps circuit-tracer's
``feature_type`` ``"cross layer transcoder"``, which its frontend relies on, and error nodes
``"mlp reconstruction error"``); every node gets
``adag_id`` (the DESIGN.md id), ``adag_kind``, ``adag_layer`` and ``adag_index`` (the graph's
integer layer and index: ``-1`` / the token id for embeddings, ``n_layers`` / the token id for
logits, which circuit-tracer's fields hold only as strings or not at all), ``adag_activation``
(the graph's activation, also for embeddings, errors and logits, whose ``activation`` is null),
``attribution``, ``token``, ``input_attr`` (T floats) and ``output_attr`` (K floats); every link
gets ``adag_weight`` (the graph's ``edge_weight``: the direct effect over the target's
activation) and ``flow``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adag.errors import AdagError
from adag.graphs.graph import ARRAY_FIELDS, Graph
from adag.graphs.prune import cumulative_influence, node_influence
from adag.io import write_text
from adag.nodes import circuit_tracer_fields

SCHEMA_VERSION = 1  # circuit-tracer's Metadata.schema_version
INDEX_FILE = "graph-metadata.json"
_SLUG = re.compile(r"[A-Za-z0-9._-]+")  # fullmatch: "$" would accept a final "\n"


def _process_token(token: str) -> str:
    """circuit-tracer's ``process_token``: make whitespace tokens visible."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def check_slug(slug: str) -> str:
    """Return ``slug`` if it matches ``^[A-Za-z0-9._-]+$`` (it names a file and a URL), else raise
    :class:`AdagError`."""
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        raise AdagError(
            f"viewer slug {slug!r} may contain only letters, digits, '.', '_' and '-'; "
            "make one with adag.graphs.export.slugify"
        )
    return slug


def slugify(text: str, max_len: int = 48) -> str:
    """A valid slug from any text: lower-cased, every run of characters other than ``a-z0-9``
    turned into one ``-``, trimmed of ``-`` at both ends, cut to ``max_len``; ``"graph"`` if
    nothing is left."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = slug[: max(max_len, 1)].strip("-")
    return slug or "graph"


def _ct_fields(graph: Graph) -> list[dict[str, Any]]:
    """:func:`adag.nodes.circuit_tracer_fields` of every row; raises :class:`AdagError` if two
    rows map to the same ``node_id``."""
    layer = graph.node_layer.tolist()
    pos = graph.node_position.tolist()
    index = graph.node_index.tolist()
    fields = [
        circuit_tracer_fields(kind, layer[row], pos[row], index[row])
        for row, kind in enumerate(graph.node_kinds)
    ]
    seen: dict[str, int] = {}
    for row, f in enumerate(fields):
        nid = f["node_id"]
        if nid in seen:
            raise AdagError(
                f"nodes {graph.node_ids[seen[nid]]!r} and {graph.node_ids[row]!r} both export "
                f"to circuit-tracer id {nid!r}; keep neurons and features in separate graphs"
            )
        seen[nid] = row
    return fields


def viewer_node_ids(graph: Graph) -> list[str]:
    """circuit-tracer ``node_id`` of every row (:func:`adag.nodes.circuit_tracer_fields`).
    Raises :class:`AdagError` if two rows map to the same id."""
    return [f["node_id"] for f in _ct_fields(graph)]


def _check_finite(graph: Graph) -> None:
    for name in ARRAY_FIELDS:
        arr = getattr(graph, name)
        if arr.dtype.kind == "f" and arr.size and not np.all(np.isfinite(arr)):
            raise AdagError(
                f"graph field {name} holds NaN or inf, which JSON cannot store; fix or prune the "
                "graph before exporting"
            )
    if not np.isfinite(graph.metric):
        raise AdagError("graph metric is NaN or inf, which JSON cannot store; re-trace the graph")


def _scan_fields(scan: str | Sequence[str]) -> tuple[str, list[str]]:
    if isinstance(scan, str):
        return scan, []
    transcoders = [str(s) for s in scan]
    digest = hashlib.sha256("-".join(transcoders).encode("utf-8")).hexdigest()[:16]
    return f"custom-{digest}", transcoders


def _node_threshold(settings: Mapping[str, Any]) -> float | None:
    pruning = settings.get("pruning")
    value = pruning.get("node_threshold") if isinstance(pruning, Mapping) else None
    if value is None:
        value = settings.get("node_threshold")
    if value is None:
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if not math.isfinite(threshold):
        raise AdagError(
            f"graph setting node_threshold is {value!r}, not a finite number; JSON cannot store it"
        )
    return threshold


def to_circuit_tracer(
    graph: Graph,
    *,
    slug: str,
    scan: str | Sequence[str] | None = None,
    influence: np.ndarray | None = None,
    supernodes: Sequence[Sequence[str]] = (),
    pinned_ids: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    full_graph: Graph | None = None,
) -> dict[str, Any]:
    """The graph as a circuit-tracer / Neuronpedia graph dict (layout in the module docstring).

    ``scan`` defaults to ``graph.settings["model"]`` (or ``"adag"``); a list of transcoder names
    becomes a ``custom-`` scan with that ``transcoder_list``. ``influence`` (N,) is each node's
    raw influence (default :func:`adag.graphs.prune.node_influence`); the file stores its
    cumulative fraction, as circuit-tracer does. ``full_graph``: ``graph`` is a pruned copy of
    it, and the influence is computed on it, before pruning, as circuit-tracer computes it
    (recomputed on the pruned graph, the same nodes would look far less influential and a
    viewer's pruning slider would hide most of them). ``supernodes`` are ``[name, adag id, ...]``
    lists and ``pinned_ids`` adag ids, both written with the exported node ids; ``labels``
    maps adag ids to ``clerp`` strings (ids not in the graph are ignored). Raises
    :class:`AdagError` for NaN / inf anywhere, unknown ids or a bad slug."""
    check_slug(slug)
    n = graph.n_nodes
    _check_finite(graph)
    if full_graph is not None:
        if influence is not None:
            raise AdagError("give influence= or full_graph=, not both")
        full_cum = cumulative_influence(node_influence(full_graph))
        known = set(full_graph.node_ids)
        missing = [i for i in graph.node_ids if i not in known]
        if missing:
            raise AdagError(
                f"node {missing[0]!r} is not in full_graph; pass the graph this one was pruned from"
            )
        cumulative = full_cum[[full_graph.index_of(i) for i in graph.node_ids]].tolist()
    else:
        infl = np.asarray(
            node_influence(graph) if influence is None else influence, dtype=np.float64
        )
        if infl.shape != (n,):
            raise AdagError(f"influence has shape {infl.shape}, expected ({n},)")
        if not np.all(np.isfinite(infl)):
            raise AdagError("influence holds NaN or inf, which JSON cannot store")
        cumulative = cumulative_influence(infl).tolist()
    scan_name, transcoders = _scan_fields(
        scan if scan is not None else str(graph.settings.get("model", "adag"))
    )
    ct = _ct_fields(graph)
    ids = [f["node_id"] for f in ct]
    labels = labels or {}

    probs = graph.target_probs.tolist()
    target_of: dict[int, int] = {}
    for j, tid in enumerate(graph.target_ids.tolist()):
        target_of.setdefault(int(tid), j)

    layer = graph.node_layer.tolist()
    pos = graph.node_position.tolist()
    index = graph.node_index.tolist()
    activation = graph.node_activation.tolist()
    attribution = graph.node_attribution.tolist()
    input_attr = graph.input_attr.tolist()
    output_attr = graph.output_attr.tolist()

    nodes: list[dict[str, Any]] = []
    for row, kind in enumerate(graph.node_kinds):
        fields = ct[row]
        token_prob, is_target, clerp = 0.0, False, ""
        node_influence_value: float | None = cumulative[row]
        node_activation: float | None = None
        if kind in ("neuron", "feature"):
            node_activation = activation[row]
        elif kind == "logit":
            target = target_of.get(int(index[row]))
            if target is not None:
                token_prob, is_target = float(probs[target]), True
            node_influence_value = None
            clerp = f'Output "{_process_token(graph.node_tokens[row])}" (p={token_prob:.3f})'
        clerp = labels.get(graph.node_ids[row], clerp)
        nodes.append(
            {
                "node_id": fields["node_id"],
                "feature": fields["feature"],
                "layer": fields["layer"],
                "ctx_idx": pos[row],
                "feature_type": fields["feature_type"],
                "token_prob": token_prob,
                "is_target_logit": is_target,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": fields["jsNodeId"],
                "clerp": clerp,
                "influence": node_influence_value,
                "activation": node_activation,
                "adag_id": graph.node_ids[row],
                "adag_kind": kind,
                "adag_layer": layer[row],
                "adag_index": index[row],
                "adag_activation": activation[row],
                "attribution": attribution[row],
                "token": graph.node_tokens[row],
                "input_attr": input_attr[row],
                "output_attr": output_attr[row],
            }
        )

    # circuit-tracer's link weight is the raw direct effect (its adjacency entry); adag's
    # weight normalised by the target's activation is kept as ``adag_weight``
    # (in float64, as Graph.adjacency("raw"): exact for float32 graphs)
    raw = (
        graph.edge_weight.astype(np.float64)
        * graph.node_activation.astype(np.float64)[graph.edge_target]
    )
    links = [
        {"source": ids[s], "target": ids[t], "weight": r, "adag_weight": w, "flow": f}
        for s, t, r, w, f in zip(
            graph.edge_source.tolist(),
            graph.edge_target.tolist(),
            raw.tolist(),
            graph.edge_weight.tolist(),
            graph.edge_flow.tolist(),
            strict=True,
        )
    ]

    def exported(adag_id: str) -> str:
        return ids[graph.index_of(adag_id)]

    groups: list[list[str]] = []
    for group in supernodes:
        members = list(group)
        if len(members) < 2:
            raise AdagError(
                f"supernode {members!r} needs a name and at least one node id: [name, id, ...]"
            )
        groups.append([str(members[0]), *(exported(m) for m in members[1:])])

    metadata: dict[str, Any] = {
        "slug": slug,
        "scan": scan_name,
        "transcoder_list": transcoders,
        "prompt_tokens": [_process_token(t) for t in graph.prompt_tokens],
        "prompt": graph.prompt,
        "node_threshold": _node_threshold(graph.settings),
        "schema_version": SCHEMA_VERSION,
        "adag_targets": [
            {"token": tok, "token_id": tid, "prob": pr, "logit": lg, "coef": cf}
            for tok, tid, pr, lg, cf in zip(
                graph.target_tokens,
                graph.target_ids.tolist(),
                probs,
                graph.target_logits.tolist(),
                graph.target_coef.tolist(),
                strict=True,
            )
        ],
    }
    tc = graph.settings.get("transcoders")
    if isinstance(tc, Mapping) and "kind" in tc:
        # circuit-tracer writes "cross layer transcoder" for every feature, PLT or CLT alike
        # (its frontend relies on the string): which one it was is recorded here
        metadata["transcoder_kind"] = tc["kind"]
    return {
        "metadata": metadata,
        "qParams": {
            "pinnedIds": [exported(p) for p in pinned_ids],
            "supernodes": groups,
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }


def write_viewer(
    graph: Graph,
    directory: str | os.PathLike[str],
    *,
    slug: str,
    scan: str | Sequence[str] | None = None,
    influence: np.ndarray | None = None,
    supernodes: Sequence[Sequence[str]] = (),
    pinned_ids: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    full_graph: Graph | None = None,
) -> Path:
    """Write ``directory/<slug>.json``, the compact JSON of :func:`to_circuit_tracer`, atomically
    (nothing is written if the export fails), and return its path. The index is not touched: call
    :func:`write_index` once after writing every graph of the directory."""
    data = to_circuit_tracer(
        graph,
        slug=slug,
        scan=scan,
        influence=influence,
        supernodes=supernodes,
        pinned_ids=pinned_ids,
        labels=labels,
        full_graph=full_graph,
    )
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return write_text(Path(directory) / f"{slug}.json", text)


def _graph_metadata(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdagError(f"viewer graph {path} does not exist; write it with write_viewer") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdagError(
            f"{path} is not valid JSON ({e}); write it again with write_viewer"
        ) from None
    meta = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        raise AdagError(
            f"{path} is not a circuit-tracer graph file (no metadata object); move it out of the "
            "viewer directory or write it again with write_viewer"
        )
    return meta


def write_index(directory: str | os.PathLike[str], slugs: Sequence[str] | None = None) -> Path:
    """Write ``directory/graph-metadata.json``, the index circuit-tracer's local server reads
    (``{"graphs": [metadata, ...]}``), in one atomic step from the ``metadata`` of the graph
    files ``directory/<slug>.json`` of ``slugs`` (in that order), or of every ``*.json`` file
    of the directory but the index (sorted by name). Returns the index's path. Raises
    :class:`AdagError` for a missing, unreadable or non-graph file, and writes nothing then."""
    root = Path(directory)
    if slugs is None:
        if not root.is_dir():
            raise AdagError(
                f"viewer directory {root} does not exist; write graphs with write_viewer"
            )
        paths = sorted(
            p
            for p in root.glob("*.json")
            if p.name != INDEX_FILE and not p.name.startswith(".") and p.is_file()
        )
    else:
        if isinstance(slugs, str):
            slugs = [slugs]
        paths = [root / f"{check_slug(slug)}.json" for slug in dict.fromkeys(slugs)]
    index = {"graphs": [_graph_metadata(p) for p in paths]}
    return write_text(root / INDEX_FILE, json.dumps(index, indent=2, ensure_ascii=False))


__all__ = [
    "INDEX_FILE",
    "SCHEMA_VERSION",
    "check_slug",
    "slugify",
    "to_circuit_tracer",
    "viewer_node_ids",
    "write_index",
    "write_viewer",
]
