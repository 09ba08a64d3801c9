"""What the viewer server reads from and writes to a run directory: plain functions and one
cache-holding class, no HTTP (the server in :mod:`adag.viewer.server` maps :class:`DataError`'s
``status`` to its response).

The JSON the API answers with (every float finite or ``null``):

``/api/run`` (:meth:`RunData.run_info`)::

    {"run": str (the directory's name), "model": str | null, "read_only": bool,
     "report": "run/report.html" | null,
     "graphs": [{"slug": str, "prompt": str | null, "prompt_tokens": [str, ...],
                 "targets": [{"token": str, "prob": float, "node_id": str}, ...],
                 "n_nodes": int, "n_links": int, "n_supernodes": int}, ...]}

``model`` is ``config.yaml``'s ``model``, else the first graph's ``metadata.scan``. ``graphs``
are in the order of ``viewer/graph-metadata.json``, then any graph file it does not list (sorted
by name); without an index, every ``viewer/*.json`` but the index, sorted. Graph files whose
name is no valid slug (:func:`adag.graphs.export.check_slug`), hidden files (``.x.json.123.tmp``),
symlinks to files outside the run directory and files that are not a graph object are left out. ``prompt_tokens`` are the graph metadata's
(circuit-tracer's display form: ``\\n`` → ``⏎``, ``\\t`` → ``→``, ``\\r`` → ``↵``); a target's
``token`` is the node's raw ``token``, ``prob`` its ``token_prob``, in node order.

``/api/clusters`` (:meth:`RunData.clusters`)::

    {"clusters": [{...every field of summary.json's entry, passed through...,
                   "records": [{"prompt_id": str, "tokens": [str, ...],
                                "values": [float, ...]}, ...]}, ...]}

From ``summary.json`` when it exists (layout in :mod:`adag.pipeline.report`), else
``{"name", "size", "records"}`` from ``clusters.json``'s ``names``/``sizes``, else no clusters.
``records`` are the cluster's top input records from ``cluster-profiles.parquet``
(:func:`adag.pipeline.report.profile_records`, the report's own; ``[]`` without the file): the
prompts where the cluster's summed input profile peaks highest in absolute value, one value per
token; ``tokens`` in the display form above.

``/api/unit`` (:meth:`RunData.unit`)::

    {"occurrences": [{"slug", "prompt", "node_id", "ctx_idx", "token", "activation",
                      "attribution", "influence"}, ...]}

Every node of every viewer graph with the given ``adag_kind``/``adag_layer``/``adag_index``,
sorted by ``|attribution|`` descending (ties in graph then node order), at most ``limit``.
``activation`` is the node's ``adag_activation`` (set for every kind; circuit-tracer's
``activation`` is null for embeddings, errors and logits), ``influence`` its cumulative influence
fraction (null for logits).

Saving (:meth:`RunData.save_qparams`, ``POST /api/graphs/<slug>/qparams``) replaces the given
keys of the graph file's ``qParams`` and answers ``{"ok": true, "qParams": {...all of them...}}``.
Keys, each optional (:func:`check_qparams` says what is refused):

- ``pinnedIds``: ``[node_id, ...]``, node ids of this graph.
- ``supernodes``: ``[[name, node_id, ...], ...]``: a non-empty name (at most 1,000 characters)
  and at least one node id of this graph.
- ``linkType``: ``"both"``, ``"input"`` or ``"output"``.
- ``clickedId``: ``""`` or a node id of this graph.
- ``sg_pos``: a string of at most 100,000 characters (the subgraph layout).
- ``clerps``: labels of neurons / transcoder features, in circuit-tracer's frontend's own
  encoding: a JSON *string* of ``[[feature, label], ...]`` where ``feature`` is the string of a
  ``feature`` field of a neuron or feature node of this graph (a label names the unit, at every
  position) and each label is at most 1,000 characters. Stored as that string (compact), so
  circuit-tracer's frontend, which reads ``JSON.parse(qParams.clerps)``, shows the labels too.

The write holds a per-file lock, reads the file as it is, and writes it whole with
:func:`adag.io.write_text` (temp file + rename), compact as :func:`adag.graphs.export.write_viewer`
writes it: concurrent saves are applied one after the other, a reader never sees half a file.
``graph-metadata.json`` is not touched (it holds no qParams).

Files are parsed once and cached by (path, ``st_mtime_ns``, ``st_size``, ``st_ino``): a repeated
request costs a ``stat``, and a file rewritten by a save, or by ``adag run`` in another process,
is read again. Cached objects are shared: never mutate what the cache returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adag.errors import AdagError
from adag.graphs.export import INDEX_FILE, check_slug
from adag.io import write_text

logger = logging.getLogger(__name__)

VIEWER_DIR = "viewer"
REPORT = "report.html"
SUMMARY = "summary.json"
CLUSTERS = "clusters.json"
PROFILES = "cluster-profiles.parquet"
CONFIG = "config.yaml"

QPARAM_KEYS = ("pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos", "clerps")
LINK_TYPES = ("both", "input", "output")
MAX_SG_POS = 100_000
"""Longest ``sg_pos`` string a save accepts."""
MAX_LABEL = 1_000
"""Longest node label (``clerps``) or supernode name a save accepts."""
CLT = "cross layer transcoder"
"""circuit-tracer's ``feature_type`` of neurons and features (files without ``adag_kind``)"""
UNIT_LIMIT = 20
"""Occurrences ``/api/unit`` answers with when no ``limit`` is given."""
MAX_UNIT_LIMIT = 10_000


class DataError(Exception):
    """A request the run data refuses, with the HTTP ``status`` to answer with (400 bad input,
    403 refused, 404 not found, 500 a run file that cannot be read or written) and a one-line
    message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- paths -------------------------------------------------------------------------------------


def safe_file(root: Path, segments: Sequence[str]) -> Path:
    """The plain file ``root/segments...``, where ``root`` is an absolute, resolved directory and
    ``segments`` the already percent-decoded path segments.

    Raises :class:`DataError` 403 for a segment that is empty, ``.`` or ``..``, or holds ``/``,
    ``\\`` or NUL, and for a path that resolves (symlinks followed) outside ``root``; 404 for a
    hidden segment (``.name``, e.g. a temp file), a hidden name after resolving, a missing file
    and a directory (no listings)."""
    for seg in segments:
        if seg in ("", ".", "..") or "/" in seg or "\\" in seg or "\x00" in seg:
            raise DataError(403, "path outside the served folder refused")
    if not segments or any(seg.startswith(".") for seg in segments):
        raise DataError(404, "not found")
    try:
        path = root.joinpath(*segments).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop (RuntimeError before 3.13), ...
        raise DataError(404, "not found") from None
    if not path.is_relative_to(root):
        raise DataError(403, "path outside the served folder refused")
    if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
        raise DataError(404, "not found")
    return path


# -- the stat-keyed cache ----------------------------------------------------------------------

_Key = tuple[int, int, int]


def _stat_key(st: os.stat_result) -> _Key:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def file_key(path: Path) -> _Key | None:
    """The cache key of ``path`` (mtime in ns, size, inode), or None when it is not there."""
    try:
        return _stat_key(path.stat())
    except OSError:
        return None


class _FileCache:
    """Parsed files by (path, parser name), valid while the file's :func:`file_key` holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[Path, str], tuple[_Key, Any]] = {}

    def load(self, path: Path, name: str, parse: Callable[[bytes], Any]) -> Any:
        """``parse(bytes of path)``, from the cache when the file is unchanged. Raises
        ``OSError`` (``FileNotFoundError`` for a missing file) and whatever ``parse`` raises."""
        # the key and the bytes come from the same open file: a rename in between cannot pair
        # an old key with new contents
        with open(path, "rb") as f:
            key = _stat_key(os.fstat(f.fileno()))
            with self._lock:
                hit = self._items.get((path, name))
            if hit is not None and hit[0] == key:
                return hit[1]
            raw = f.read()
        value = parse(raw)
        with self._lock:
            self._items[(path, name)] = (key, value)
        return value

    def put(self, path: Path, name: str, value: Any) -> None:
        """Remember ``value`` for the file as it is now (after writing it)."""
        key = file_key(path)
        if key is not None:
            with self._lock:
                self._items[(path, name)] = (key, value)


# -- graphs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphFile:
    """A parsed viewer graph file: the JSON object and its ``/api/run`` entry (less the slug)."""

    data: dict[str, Any]
    summary: dict[str, Any] = field(repr=False)


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def graph_summary(data: Mapping[str, Any]) -> dict[str, Any]:
    """A graph's ``/api/run`` entry without its slug (layout in the module docstring)."""
    meta = data.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    nodes = [n for n in _list(data.get("nodes")) if isinstance(n, dict)]
    q = data.get("qParams")
    q = q if isinstance(q, dict) else {}
    return {
        "prompt": meta.get("prompt"),
        "prompt_tokens": _list(meta.get("prompt_tokens")),
        "targets": [
            {"token": n.get("token"), "prob": n.get("token_prob"), "node_id": n.get("node_id")}
            for n in nodes
            if n.get("is_target_logit")
        ],
        "n_nodes": len(nodes),
        "n_links": len(_list(data.get("links"))),
        "n_supernodes": len(_list(q.get("supernodes"))),
    }


def _parse_graph(raw: bytes) -> GraphFile:
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise ValueError("not a circuit-tracer graph object (no nodes list)")
    return GraphFile(data, graph_summary(data))


def _node_ids(data: Mapping[str, Any]) -> set[str]:
    return {
        n["node_id"]
        for n in _list(data.get("nodes"))
        if isinstance(n, dict) and isinstance(n.get("node_id"), str)
    }


def _valid_slug(name: str) -> bool:
    try:
        check_slug(name)
    except AdagError:
        return False
    return True


# -- saving qParams ----------------------------------------------------------------------------


def _bad(message: str) -> DataError:
    return DataError(400, message)


def _node(value: Any, where: str, ids: set[str], slug: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where} must be a node id string, got {type(value).__name__}")
    if value not in ids:
        raise _bad(f"{where} {value!r} is not a node of graph {slug}")
    return value


def _text(value: Any, where: str, limit: int, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise _bad(f"{where} has {len(value)} characters; at most {limit:,} are kept")
    if not empty and not value:
        raise _bad(f"{where} is empty; give a name")
    return value


def _array(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(f"{where} must be a list, got {type(value).__name__}")
    return value


def _unit_features(data: Mapping[str, Any]) -> set[str]:
    """The ``feature`` keys ``clerps`` may label: those of the graph's neuron / feature nodes."""
    return {
        str(n["feature"])
        for n in _list(data.get("nodes"))
        if isinstance(n, dict)
        and n.get("adag_kind", "neuron" if n.get("feature_type") == CLT else None)
        in ("neuron", "feature")
        and isinstance(n.get("feature"), int)
    }


def _clerps(value: Any, features: set[str], slug: str) -> str:
    if not isinstance(value, str):
        raise _bad(
            f"clerps must be a JSON string of [[feature, label], ...] (circuit-tracer's "
            f"encoding), got {type(value).__name__}"
        )
    try:
        pairs = json.loads(value)
    except ValueError:
        raise _bad(
            "clerps is not valid JSON; give a JSON string of [[feature, label], ...]"
        ) from None
    labels = []
    for i, pair in enumerate(_array(pairs, "clerps")):
        where = f"clerps[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            raise _bad(f"{where} must be a [feature, label] pair")
        feature = _text(pair[0], f"{where}[0] (the feature)", 40)
        if feature not in features:
            raise _bad(f"{where}[0] {feature!r} is no neuron or feature of graph {slug}")
        labels.append([feature, _text(pair[1], f"{where}[1] (the label)", MAX_LABEL)])
    return json.dumps(labels, separators=(",", ":"), ensure_ascii=False)


def check_qparams(
    edits: Any, node_ids: set[str], slug: str, features: set[str] | None = None
) -> dict[str, Any]:
    """The qParams edits of a save, checked against the node ids of graph ``slug`` (rules in the
    module docstring); raises :class:`DataError` 400 with a one-line message for a body that is
    no object, an unknown key, a wrong type, an unknown node id or an over-long string.
    ``features``: the ``feature`` keys ``clerps`` may label (default: none)."""
    if not isinstance(edits, dict):
        raise _bad(f"the body must be a JSON object of qParams, got {type(edits).__name__}")
    clean: dict[str, Any] = {}
    for key, value in edits.items():
        if key == "pinnedIds":
            items = _array(value, key)
            clean[key] = [_node(v, f"pinnedIds[{i}]", node_ids, slug) for i, v in enumerate(items)]
        elif key == "supernodes":
            groups = []
            for i, group in enumerate(_array(value, key)):
                where = f"supernodes[{i}]"
                members = _array(group, where)
                if len(members) < 2:
                    raise _bad(f"{where} needs a name and at least one node id: [name, id, ...]")
                name = _text(members[0], f"{where}[0] (the name)", MAX_LABEL, empty=False)
                ids = [
                    _node(v, f"{where}[{j}]", node_ids, slug) for j, v in enumerate(members[1:], 1)
                ]
                groups.append([name, *ids])
            clean[key] = groups
        elif key == "linkType":
            if value not in LINK_TYPES:
                raise _bad(f"linkType {value!r} must be one of {', '.join(LINK_TYPES)}")
            clean[key] = value
        elif key == "clickedId":
            clean[key] = "" if value == "" else _node(value, key, node_ids, slug)
        elif key == "sg_pos":
            clean[key] = _text(value, key, MAX_SG_POS)
        elif key == "clerps":
            clean[key] = _clerps(value, features or set(), slug)
        else:
            raise _bad(f"unknown qParams key {key!r}; the keys are {', '.join(QPARAM_KEYS)}")
    return clean


# -- /api/unit ---------------------------------------------------------------------------------


_UNIT_HINT = "give kind, layer and index, e.g. ?kind=neuron&layer=3&index=17"


def _int(params: Mapping[str, str], name: str) -> int:
    value = params.get(name)
    if value is None or value == "":
        raise _bad(f"missing parameter {name}; {_UNIT_HINT}")
    try:
        return int(value)
    except ValueError:
        raise _bad(f"parameter {name}={value!r} is not an integer") from None


def unit_query(params: Mapping[str, str]) -> tuple[str, int, int, int]:
    """``(kind, layer, index, limit)`` of an ``/api/unit`` query (one value per name; other
    names are ignored). Raises :class:`DataError` 400 for a missing or malformed value and a
    limit outside 1..:data:`MAX_UNIT_LIMIT`."""
    kind = params.get("kind") or ""
    if not kind:
        raise _bad(f"missing parameter kind; {_UNIT_HINT}")
    layer, index = _int(params, "layer"), _int(params, "index")
    limit = _int(params, "limit") if "limit" in params else UNIT_LIMIT
    if not 1 <= limit <= MAX_UNIT_LIMIT:
        raise _bad(f"parameter limit={limit} must be between 1 and {MAX_UNIT_LIMIT:,}")
    return kind, layer, index, limit


_UnitIndex = dict[tuple[str, int, int], list[dict[str, Any]]]


def _abs_attribution(occ: Mapping[str, Any]) -> float:
    a = occ.get("attribution")
    try:
        v = abs(float(a))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def unit_index(graphs: Sequence[tuple[str, Mapping[str, Any]]]) -> _UnitIndex:
    """Every node with integer ``adag_layer``/``adag_index`` of the ``(slug, graph data)`` pairs,
    as ``/api/unit`` occurrences by ``(adag_kind, adag_layer, adag_index)``, each list sorted
    by ``|attribution|`` descending (stable: ties keep graph and node order)."""
    index: _UnitIndex = {}
    for slug, data in graphs:
        meta = data.get("metadata")
        prompt = meta.get("prompt") if isinstance(meta, dict) else None
        for n in _list(data.get("nodes")):
            if not isinstance(n, dict):
                continue
            kind, layer, idx = n.get("adag_kind"), n.get("adag_layer"), n.get("adag_index")
            if not isinstance(kind, str) or type(layer) is not int or type(idx) is not int:
                continue  # a plain circuit-tracer graph: no adag fields
            activation = n.get("adag_activation", n.get("activation"))
            index.setdefault((kind, layer, idx), []).append(
                {
                    "slug": slug,
                    "prompt": prompt,
                    "node_id": n.get("node_id"),
                    "ctx_idx": n.get("ctx_idx"),
                    "token": n.get("token"),
                    "activation": activation,
                    "attribution": n.get("attribution"),
                    "influence": n.get("influence"),
                }
            )
    for occurrences in index.values():
        occurrences.sort(key=_abs_attribution, reverse=True)
    return index


# -- the run -----------------------------------------------------------------------------------


def _display_token(token: str) -> str:
    # circuit-tracer's process_token, as the graph metadata's prompt_tokens hold them
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


class RunData:
    """A run directory as the viewer sees it; safe to use from many threads.

    ``root`` is the resolved run directory. Methods raise :class:`DataError`."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.root = Path(run_dir).resolve()
        self.viewer = self.root / VIEWER_DIR
        self._cache = _FileCache()
        self._lock = threading.Lock()
        self._write_locks: dict[Path, threading.Lock] = {}
        self._units: tuple[Any, _UnitIndex] | None = None
        self._records: tuple[Any, dict[str, list[dict[str, Any]]]] | None = None

    # graphs

    def graph_files(self) -> list[tuple[str, Path]]:
        """``(slug, path)`` of every viewer graph file, in the index's order (see the module
        docstring). Lists files only; does not parse them."""
        try:
            found = {
                p.stem: p
                for p in self.viewer.glob("*.json")
                if p.name != INDEX_FILE
                and not p.name.startswith(".")
                and _valid_slug(p.stem)
                and p.is_file()
                and p.resolve().is_relative_to(self.root)  # as /run/ serves files: no way out
            }
        except OSError:
            return []
        order: list[str] = []
        try:
            index = self._cache.load(self.viewer / INDEX_FILE, "json", json.loads)
        except (OSError, ValueError):
            index = None
        if isinstance(index, dict):
            for meta in _list(index.get("graphs")):
                slug = meta.get("slug") if isinstance(meta, dict) else None
                if isinstance(slug, str) and slug in found and slug not in order:
                    order.append(slug)
        listed = set(order)
        order += sorted(s for s in found if s not in listed)
        return [(s, found[s]) for s in order]

    def _graph_file(self, path: Path) -> GraphFile | None:
        """The parsed file, or None (logged) for one that cannot be read or is no graph."""
        try:
            return self._cache.load(path, "graph", _parse_graph)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError too
            logger.warning("viewer graph %s is left out: %s", path, e)
            return None

    def _graphs(self) -> list[tuple[str, Path, GraphFile]]:
        out = []
        for slug, path in self.graph_files():
            g = self._graph_file(path)
            if g is not None:
                out.append((slug, path, g))
        return out

    def _graph_path(self, slug: str) -> Path:
        try:
            check_slug(slug)
        except AdagError:
            raise DataError(404, f"no graph {slug!r} in this run") from None
        return self.viewer / f"{slug}.json"

    def _state(self) -> tuple[tuple[str, _Key | None], ...]:
        return tuple((slug, file_key(path)) for slug, path in self.graph_files())

    # the API

    def model(self, graphs: Sequence[tuple[str, Path, GraphFile]] = ()) -> str | None:
        """``config.yaml``'s ``model``, else the first graph's ``metadata.scan``."""
        import yaml

        try:
            config = self._cache.load(self.root / CONFIG, "yaml", yaml.safe_load)
        except (OSError, ValueError, yaml.YAMLError):
            config = None
        if isinstance(config, dict) and config.get("model"):
            return str(config["model"])
        for _, _, g in graphs:
            meta = g.data.get("metadata")
            if isinstance(meta, dict) and meta.get("scan"):
                return str(meta["scan"])
        return None

    def run_info(self, *, read_only: bool) -> dict[str, Any]:
        """The ``/api/run`` object."""
        graphs = self._graphs()
        return {
            "run": self.root.name,
            "model": self.model(graphs),
            "read_only": read_only,
            "report": f"run/{REPORT}" if (self.root / REPORT).is_file() else None,
            "graphs": [{"slug": slug, **g.summary} for slug, _, g in graphs],
        }

    def unit(self, kind: str, layer: int, index: int, limit: int = UNIT_LIMIT) -> dict[str, Any]:
        """The ``/api/unit`` object; the index over every graph is built once and rebuilt when a
        graph file changes, appears or goes."""
        state = self._state()
        with self._lock:
            cached = self._units
        if cached is None or cached[0] != state:
            graphs = self._graphs()
            cached = (state, unit_index([(slug, g.data) for slug, _, g in graphs]))
            with self._lock:
                self._units = cached
        return {"occurrences": cached[1].get((kind, layer, index), [])[:limit]}

    def _profile_records(self) -> dict[str, list[dict[str, Any]]]:
        path = self.root / PROFILES
        graphs = self._graphs()
        state = (file_key(path), tuple((slug, file_key(p)) for slug, p, _ in graphs))
        with self._lock:
            cached = self._records
        if cached is not None and cached[0] == state:
            return cached[1]
        records: dict[str, list[dict[str, Any]]] = {}
        if state[0] is not None:
            import pyarrow.parquet as pq

            from adag.pipeline.report import profile_records

            tokens = {slug: g.summary["prompt_tokens"] for slug, _, g in graphs}
            try:
                table = pq.read_table(path)
                found = profile_records(table, tokens)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                logger.warning("%s is left out: %s", path, e)
                found = {}
            for name, recs in found.items():
                records[str(name)] = [
                    {
                        "prompt_id": r["prompt_id"],
                        "tokens": (
                            r["tokens"]
                            if r["prompt_id"] in tokens
                            else [_display_token(t) for t in r["tokens"]]
                        ),
                        "values": r["values"],
                    }
                    for r in recs
                ]
        with self._lock:
            self._records = (state, records)
        return records

    def clusters(self) -> dict[str, Any]:
        """The ``/api/clusters`` object. 500 when summary.json or clusters.json is unreadable."""
        entries: list[dict[str, Any]] = []
        for name in (SUMMARY, CLUSTERS):
            try:
                data = self._cache.load(self.root / name, "json", json.loads)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                raise DataError(500, f"{name} of the run cannot be read ({e})") from None
            if not isinstance(data, dict):
                raise DataError(500, f"{name} of the run is not a JSON object")
            if name == SUMMARY:
                entries = [dict(c) for c in _list(data.get("clusters")) if isinstance(c, dict)]
            else:
                names, sizes = _list(data.get("names")), _list(data.get("sizes"))
                entries = [
                    {"name": n, "size": sizes[i] if i < len(sizes) else None}
                    for i, n in enumerate(names)
                ]
            break
        if entries:
            records = self._profile_records()
            for entry in entries:
                entry["records"] = records.get(str(entry.get("name")), [])
        return {"clusters": entries}

    def save_qparams(self, slug: str, edits: Any) -> dict[str, Any]:
        """Apply a save to graph ``slug``'s ``qParams`` (see the module docstring) and return
        them all. 400 for a refused edit, 404 for an unknown graph, 500 when the file cannot be
        read or written."""
        path = self._graph_path(slug)
        with self._lock:
            lock = self._write_locks.setdefault(path, threading.Lock())
        with lock:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raise DataError(404, f"no graph {slug!r} in this run") from None
            except OSError as e:
                raise DataError(500, f"viewer graph {slug} cannot be read ({e})") from None
            try:
                g = _parse_graph(raw)
            except ValueError as e:
                raise DataError(500, f"viewer graph {slug} cannot be read ({e})") from None
            clean = check_qparams(edits, _node_ids(g.data), slug, _unit_features(g.data))
            data = g.data
            q = data.get("qParams")
            if not isinstance(q, dict):
                q = data["qParams"] = {}
            q.update(clean)
            try:
                text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
                write_text(path, text)
            except ValueError as e:  # AdagError from write_text, or NaN in the file
                raise DataError(500, f"viewer graph {slug} cannot be saved ({e})") from None
            self._cache.put(path, "graph", GraphFile(data, graph_summary(data)))
        return dict(q)


__all__ = [
    "LINK_TYPES",
    "MAX_LABEL",
    "MAX_SG_POS",
    "QPARAM_KEYS",
    "DataError",
    "GraphFile",
    "RunData",
    "check_qparams",
    "file_key",
    "graph_summary",
    "safe_file",
    "unit_index",
    "unit_query",
]
