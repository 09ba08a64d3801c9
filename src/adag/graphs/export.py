"""Viewer JSON: write a :class:`~adag.graphs.graph.Graph` in the graph format of circuit-tracer's
frontend and Neuronpedia, and read back the files adag wrote.

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
  (0), ``jsNodeId``, ``clerp``, ``influence``, ``activation``, built as the classmethods do:

  - ``neuron`` and ``feature`` (``Node.feature_node``): node_id ``L_I_P``, feature
    ``cantor(L, I)``, layer ``"L"``, feature_type ``"cross layer transcoder"``, jsNodeId
    ``L_I-0``, activation the node's activation;
  - ``error`` (``Node.error_node``): node_id ``L_-1_P``, feature -1, layer ``"L"``,
    feature_type ``"mlp reconstruction error"``, jsNodeId ``L_-1-P``;
  - ``embed`` (``Node.token_node``): node_id ``E_tok_P``, feature P, layer ``"E"``,
    feature_type ``"embedding"``, jsNodeId ``E_tok-P``;
  - ``logit`` (``Node.logit_node``): node_id ``{n+1}_tok_P``, feature tok, layer ``"{n+1}"``,
    feature_type ``"logit"``, jsNodeId ``L_tok-P``;

  (L layer, P position, I neuron / feature index, tok token id, n the number of layers, which is
  a logit node's ``node_layer`` here.) ``feature`` is the Cantor pairing ``(L+I)(L+I+1)/2 + I``
  that the frontend unpairs for ``schema_version > 0``. Logit nodes get ``token_prob`` from
  ``target_probs``, ``clerp`` ``Output "tok" (p=0.123)`` and ``influence``/``activation`` null;
  embedding and error nodes get ``activation`` null. ``influence`` is the node's cumulative
  influence fraction (``prune_graph``'s ``cumulative_scores``, see
  :func:`adag.graphs.prune.cumulative_influence`).
- Links are ``{"source": node_id, "target": node_id, "weight": w}`` with the source upstream.
- The index ``graph-metadata.json`` is ``{"graphs": [metadata, ...]}`` holding each graph's
  ``metadata`` (``add_graph_metadata``): an existing entry with the same slug is removed and the
  new one appended.

Deviations, each deliberate:

- ``is_target_logit`` is true for every target of the metric (circuit-tracer marks only its
  top-1 logit; every adag target is part of the metric).
- A list ``scan`` becomes ``"custom-"`` + a SHA-256 digest (circuit-tracer uses Python's
  ``hash``, which changes between processes).
- Graph files are written compactly (``separators=(",", ":")``), not indented; both parse alike.
- The order of nodes and links is the graph's row and edge order.
- ``influence`` is the cumulative fraction over the nodes of the graph given; circuit-tracer
  computes it on the unpruned graph before pruning. Pass ``influence=`` to choose the scores.
- Error nodes use the current library's jsNodeId ``L_-1-P`` (older releases wrote ``L_P-0``,
  which could alias a feature node's jsNodeId).

adag additions, ignored by the viewer, make a written graph re-import unchanged (floats are
written with ``repr``, exact for float64, and cast back to the recorded dtypes): every node gets
``adag_id``, ``adag_kind``, ``adag_layer``, ``adag_position``, ``adag_index``,
``adag_activation``, ``attribution``, ``token``, ``input_attr`` (T floats), ``output_attr``
(K floats); every link ``flow``; ``metadata.adag`` holds ``format_version``, ``dtypes`` (of each
array field), ``node_ids`` (row order), ``prompt_tokens`` (unprocessed), ``prompt_ids``,
``target_ids``, ``target_tokens``, ``target_coef``, ``target_logits``, ``target_probs``,
``metric`` and ``settings``.
"""

from __future__ import annotations

import hashlib
import json
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

SCHEMA_VERSION = 1  # circuit-tracer's Metadata.schema_version
FORMAT_VERSION = 1  # of the metadata.adag block
INDEX_FILE = "graph-metadata.json"
_SLUG = re.compile(r"[A-Za-z0-9._-]+")  # fullmatch: "$" would accept a final "\n"

_NOT_ADAG = (
    "was not written by adag (it has no metadata.adag block); only adag-written viewer files "
    "can be re-imported"
)


def _process_token(token: str) -> str:
    """circuit-tracer's ``process_token``: make whitespace tokens visible."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


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


def viewer_node_ids(graph: Graph) -> list[str]:
    """circuit-tracer ``node_id`` of every row (see the list in the module docstring). Raises
    :class:`AdagError` if two rows map to the same id."""
    layer = graph.node_layer.tolist()
    pos = graph.node_position.tolist()
    index = graph.node_index.tolist()
    ids: list[str] = []
    for row, kind in enumerate(graph.node_kinds):
        if kind in ("neuron", "feature"):
            ids.append(f"{layer[row]}_{index[row]}_{pos[row]}")
        elif kind == "error":
            ids.append(f"{layer[row]}_-1_{pos[row]}")
        elif kind == "embed":
            ids.append(f"E_{index[row]}_{pos[row]}")
        else:  # logit
            ids.append(f"{layer[row] + 1}_{index[row]}_{pos[row]}")
    if len(set(ids)) != len(ids):
        seen: dict[str, int] = {}
        for row, nid in enumerate(ids):
            if nid in seen:
                raise AdagError(
                    f"nodes {graph.node_ids[seen[nid]]!r} and {graph.node_ids[row]!r} both export "
                    f"to circuit-tracer id {nid!r}; keep neurons and features in separate graphs"
                )
            seen[nid] = row
    return ids


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


def _settings_copy(settings: dict[str, Any]) -> dict[str, Any]:
    try:
        out: dict[str, Any] = json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise AdagError(
            f"graph settings cannot be written as JSON ({e}); keep settings to plain JSON values"
        ) from None
    return out


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
    return None if value is None else float(value)


def to_circuit_tracer(
    graph: Graph,
    *,
    slug: str,
    scan: str | Sequence[str] | None = None,
    influence: np.ndarray | None = None,
    supernodes: Sequence[Sequence[str]] = (),
    pinned_ids: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The graph as a circuit-tracer / Neuronpedia graph dict (layout in the module docstring).

    ``scan`` defaults to ``graph.settings["model"]`` (or ``"adag"``); a list of transcoder names
    becomes a ``custom-`` scan with that ``transcoder_list``. ``influence`` (N,) is each node's
    raw influence (default :func:`adag.graphs.prune.node_influence`); the file stores its
    cumulative fraction, as circuit-tracer does. ``supernodes`` are ``[name, adag id, ...]``
    lists and ``pinned_ids`` adag ids, both written with the exported node ids; ``labels``
    maps adag ids to ``clerp`` strings (ids not in the graph are ignored). Raises
    :class:`AdagError` for NaN / inf anywhere, unknown ids or a bad slug."""
    check_slug(slug)
    n = graph.n_nodes
    _check_finite(graph)
    infl = np.asarray(node_influence(graph) if influence is None else influence, dtype=np.float64)
    if infl.shape != (n,):
        raise AdagError(f"influence has shape {infl.shape}, expected ({n},)")
    if not np.all(np.isfinite(infl)):
        raise AdagError("influence holds NaN or inf, which JSON cannot store")
    settings = _settings_copy(graph.settings)
    scan_name, transcoders = _scan_fields(
        scan if scan is not None else str(graph.settings.get("model", "adag"))
    )
    ids = viewer_node_ids(graph)
    labels = labels or {}

    probs = graph.target_probs.tolist()
    target_of: dict[int, int] = {}
    for j, tid in enumerate(graph.target_ids.tolist()):
        target_of.setdefault(int(tid), j)

    cumulative = cumulative_influence(infl).tolist()
    layer = graph.node_layer.tolist()
    pos = graph.node_position.tolist()
    index = graph.node_index.tolist()
    activation = graph.node_activation.tolist()
    attribution = graph.node_attribution.tolist()
    input_attr = graph.input_attr.tolist()
    output_attr = graph.output_attr.tolist()

    nodes: list[dict[str, Any]] = []
    for row, kind in enumerate(graph.node_kinds):
        nid, L, P, idx = ids[row], layer[row], pos[row], index[row]
        token_prob, is_target, clerp = 0.0, False, ""
        node_influence_value: float | None = cumulative[row]
        node_activation: float | None = None
        if kind in ("neuron", "feature"):
            feature, layer_s, ftype = _cantor(L, idx), str(L), "cross layer transcoder"
            js = f"{L}_{idx}-0"
            node_activation = activation[row]
        elif kind == "error":
            feature, layer_s, ftype = -1, str(L), "mlp reconstruction error"
            js = f"{L}_-1-{P}"
        elif kind == "embed":
            feature, layer_s, ftype, js = P, "E", "embedding", f"E_{idx}-{P}"
        else:  # logit
            feature, layer_s, ftype, js = idx, str(L + 1), "logit", f"L_{idx}-{P}"
            target = target_of.get(int(idx))
            if target is not None:
                token_prob, is_target = float(probs[target]), True
            node_influence_value = None
            clerp = f'Output "{_process_token(graph.node_tokens[row])}" (p={token_prob:.3f})'
        clerp = labels.get(graph.node_ids[row], clerp)
        nodes.append(
            {
                "node_id": nid,
                "feature": feature,
                "layer": layer_s,
                "ctx_idx": P,
                "feature_type": ftype,
                "token_prob": token_prob,
                "is_target_logit": is_target,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": js,
                "clerp": clerp,
                "influence": node_influence_value,
                "activation": node_activation,
                "adag_id": graph.node_ids[row],
                "adag_kind": kind,
                "adag_layer": L,
                "adag_position": P,
                "adag_index": idx,
                "adag_activation": activation[row],
                "attribution": attribution[row],
                "token": graph.node_tokens[row],
                "input_attr": input_attr[row],
                "output_attr": output_attr[row],
            }
        )

    links = [
        {"source": ids[s], "target": ids[t], "weight": w, "flow": f}
        for s, t, w, f in zip(
            graph.edge_source.tolist(),
            graph.edge_target.tolist(),
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
        "adag": {
            "format_version": FORMAT_VERSION,
            "dtypes": {name: str(getattr(graph, name).dtype) for name in ARRAY_FIELDS},
            "node_ids": list(graph.node_ids),
            "prompt_tokens": list(graph.prompt_tokens),
            "prompt_ids": graph.prompt_ids.tolist(),
            "target_ids": graph.target_ids.tolist(),
            "target_tokens": list(graph.target_tokens),
            "target_coef": graph.target_coef.tolist(),
            "target_logits": graph.target_logits.tolist(),
            "target_probs": graph.target_probs.tolist(),
            "metric": float(graph.metric),
            "settings": settings,
        },
    }
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


def _dtype(name: Any) -> np.dtype[Any]:
    dt = np.dtype(str(name))
    if dt.kind not in "biuf":
        raise AdagError(f"adag viewer JSON records a non-numeric dtype {name!r}; re-export it")
    return dt


def _array(values: Any, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(shape)


def _from_block(data: Mapping[str, Any], meta: Mapping[str, Any], block: Any) -> Graph:
    dtypes = {name: _dtype(block["dtypes"][name]) for name in ARRAY_FIELDS}
    node_ids = [str(x) for x in block["node_ids"]]
    n = len(node_ids)
    by_id: dict[str, Mapping[str, Any]] = {}
    for node in data["nodes"]:
        by_id[str(node["adag_id"])] = node
    missing = [i for i in node_ids if i not in by_id]
    if missing or len(by_id) != n:
        raise AdagError(
            f"adag viewer JSON lists {n} node ids but has {len(by_id)} adag nodes "
            f"(missing e.g. {missing[:3]}); re-export it"
        )
    nodes = [by_id[i] for i in node_ids]
    row_of = {str(node["node_id"]): row for row, node in enumerate(nodes)}
    links = data["links"]
    t, k, e = len(block["prompt_ids"]), len(block["target_ids"]), len(links)

    def column(key: str, name: str) -> np.ndarray:
        return _array([node[key] for node in nodes], dtypes[name], (n,))

    return Graph(
        node_ids=node_ids,
        node_kinds=[str(node["adag_kind"]) for node in nodes],
        node_layer=column("adag_layer", "node_layer"),
        node_position=column("adag_position", "node_position"),
        node_index=column("adag_index", "node_index"),
        node_activation=column("adag_activation", "node_activation"),
        node_attribution=column("attribution", "node_attribution"),
        node_tokens=[str(node["token"]) for node in nodes],
        edge_source=_array([row_of[link["source"]] for link in links], dtypes["edge_source"], (e,)),
        edge_target=_array([row_of[link["target"]] for link in links], dtypes["edge_target"], (e,)),
        edge_weight=_array([link["weight"] for link in links], dtypes["edge_weight"], (e,)),
        edge_flow=_array([link["flow"] for link in links], dtypes["edge_flow"], (e,)),
        input_attr=_array([node["input_attr"] for node in nodes], dtypes["input_attr"], (n, t)),
        output_attr=_array([node["output_attr"] for node in nodes], dtypes["output_attr"], (n, k)),
        target_ids=_array(block["target_ids"], dtypes["target_ids"], (k,)),
        target_tokens=[str(x) for x in block["target_tokens"]],
        target_coef=_array(block["target_coef"], dtypes["target_coef"], (k,)),
        target_logits=_array(block["target_logits"], dtypes["target_logits"], (k,)),
        target_probs=_array(block["target_probs"], dtypes["target_probs"], (k,)),
        prompt_ids=_array(block["prompt_ids"], dtypes["prompt_ids"], (t,)),
        prompt_tokens=[str(x) for x in block["prompt_tokens"]],
        prompt=str(meta["prompt"]),
        metric=float(block["metric"]),
        settings=dict(block["settings"]),
    )


def from_circuit_tracer(data: Mapping[str, Any]) -> Graph:
    """The exact inverse of :func:`to_circuit_tracer` for files adag wrote: the same rows, edges,
    values and dtypes. Raises :class:`AdagError` for other files or malformed ones."""
    meta = data.get("metadata") if isinstance(data, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("adag"), Mapping):
        raise AdagError(f"this viewer JSON {_NOT_ADAG}")
    block = meta["adag"]
    if block.get("format_version") != FORMAT_VERSION:
        raise AdagError(
            f"adag viewer JSON has format_version {block.get('format_version')!r}; this adag "
            f"reads version {FORMAT_VERSION}"
        )
    try:
        return _from_block(data, meta, block)
    except AdagError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise AdagError(
            f"malformed adag viewer JSON ({type(e).__name__}: {e}); re-export the graph with "
            "adag.graphs.export.write_viewer"
        ) from None


def _read_index(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"graphs": []}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdagError(f"{path} is not valid JSON ({e}); delete it to start a new index") from None
    if not isinstance(index, dict) or not isinstance(index.get("graphs"), list):
        raise AdagError(
            f"{path} is not a circuit-tracer graph index ({{'graphs': [...]}}); delete it to "
            "start a new index"
        )
    return index


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
) -> Path:
    """Write ``directory/<slug>.json`` (compact JSON of :func:`to_circuit_tracer`) and add or
    replace this slug's entry in ``directory/graph-metadata.json``, the index circuit-tracer's
    local server reads (``{"graphs": [metadata, ...]}``). Both files are written atomically;
    nothing is written if the export fails. Returns the graph file's path."""
    data = to_circuit_tracer(
        graph,
        slug=slug,
        scan=scan,
        influence=influence,
        supernodes=supernodes,
        pinned_ids=pinned_ids,
        labels=labels,
    )
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    root = Path(directory)
    index_path = root / INDEX_FILE
    index = _read_index(index_path)
    path = write_text(root / f"{slug}.json", text)
    entry = {key: value for key, value in data["metadata"].items() if key != "adag"}
    graphs = [g for g in index["graphs"] if not (isinstance(g, dict) and g.get("slug") == slug)]
    index["graphs"] = [*graphs, entry]
    write_text(index_path, json.dumps(index, indent=2, ensure_ascii=False))
    return path


def read_viewer(path: str | os.PathLike[str]) -> Graph:
    """Read a graph file written by :func:`write_viewer`."""
    p = Path(path)
    if not p.is_file():
        raise AdagError(f"viewer file {p} does not exist; write one with write_viewer")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdagError(f"{p} is not valid JSON ({e}); re-export it with write_viewer") from None
    if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
        raise AdagError(f"{p} {_NOT_ADAG}")
    if "adag" not in data["metadata"]:
        raise AdagError(f"{p} {_NOT_ADAG}")
    return from_circuit_tracer(data)


__all__ = [
    "FORMAT_VERSION",
    "INDEX_FILE",
    "SCHEMA_VERSION",
    "check_slug",
    "from_circuit_tracer",
    "read_viewer",
    "slugify",
    "to_circuit_tracer",
    "viewer_node_ids",
    "write_viewer",
]
