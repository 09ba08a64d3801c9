"""Node ids as code: the one place that writes, reads and interprets DESIGN.md's node ids.

==========  ========================  =======================================================
kind        id                        meaning
==========  ========================  =======================================================
embed       ``embed:P``               the input embedding at position P
neuron      ``neuron:L:P:I``          MLP neuron I of layer L at position P (input of W_down)
head        ``head:L:P:H:X``          attention head H of layer L at position P, X one of
                                      ``q k v z`` (k, v per KV head)
attn        ``attn:L:P``              the whole attention output of layer L at position P
mlp         ``mlp:L:P``               the whole MLP output of layer L at position P
feature     ``feature:L:P:I``         transcoder feature I read at layer L, position P
error       ``error:L:P``             the transcoder error node of layer L at position P
logit       ``logit:T``               the output logit of token id T at the traced position
==========  ========================  =======================================================

P is ``*`` for a node summed over all positions (``neuron:12:*:873``, ``head:3:*:5:z``); every
other field is a non-negative decimal integer without leading zeros, so each node has one id.

- :func:`format` writes an id from its fields in the table's order (``None`` for ``*``);
  :func:`parse` reads one strictly into a :class:`NodeId`.
- :func:`to_patch` turns ids into :class:`adag.models.sites.Patch` selectors (sites in the
  docstring of ``adag.models.sites``).
- :func:`circuit_tracer_fields` maps a graph row to circuit-tracer's node fields (the viewer
  JSON of ``adag.graphs.export``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adag.errors import AdagError

if TYPE_CHECKING:
    from torch import Tensor

    from adag.models.sites import Op, Patch

KINDS: dict[str, tuple[str, ...]] = {
    # kind -> the NodeId attributes its id holds, in id order
    "embed": ("pos",),
    "neuron": ("layer", "pos", "index"),
    "head": ("layer", "pos", "index", "sub"),
    "attn": ("layer", "pos"),
    "mlp": ("layer", "pos"),
    "feature": ("layer", "pos", "index"),
    "error": ("layer", "pos"),
    "logit": ("index",),
}
HEAD_SUBS = ("q", "k", "v", "z")

_FORM = {
    "embed": "embed:POS (POS may be *)",
    "neuron": "neuron:LAYER:POS:INDEX (POS may be *)",
    "head": "head:LAYER:POS:HEAD:X (POS may be *, X one of q k v z)",
    "attn": "attn:LAYER:POS (POS may be *)",
    "mlp": "mlp:LAYER:POS (POS may be *)",
    "feature": "feature:LAYER:POS:INDEX (POS may be *)",
    "error": "error:LAYER:POS (POS may be *)",
    "logit": "logit:TOKEN",
}
_SPEC = {  # kind -> (str.format template, number of fields, index of the position field)
    kind: (":".join([kind] + ["{}"] * len(attrs)), len(attrs), (*attrs, "pos").index("pos"))
    for kind, attrs in KINDS.items()
}
_ALL_FORMS = ", ".join(f.split(" ")[0] for f in _FORM.values())


@dataclass(frozen=True)
class NodeId:
    """A parsed node id; ``str(node)`` is the id. Fields a kind does not have are None."""

    kind: str
    layer: int | None = None
    pos: int | None = None
    """Prompt position; None is ``*`` (summed over positions)."""
    index: int | None = None
    """Neuron / feature index, head index, or token id (``logit``); None for embed, attn, mlp,
    error."""
    sub: str | None = None
    """``q k v z`` for heads."""

    def __post_init__(self) -> None:
        attrs = KINDS.get(self.kind)
        if attrs is None:
            raise AdagError(f"unknown node kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        for name in ("layer", "index", "sub"):
            if (getattr(self, name) is None) == (name in attrs):
                state = "needs" if name in attrs else "has no"
                raise AdagError(f"{self.kind} node {state} {name}: expected {_FORM[self.kind]}")
        if self.kind == "logit" and self.pos is not None:
            raise AdagError(f"logit node has no pos: expected {_FORM['logit']}")

    @property
    def fields(self) -> tuple[int | str | None, ...]:
        """The id's fields in the table's order (what :func:`format` takes)."""
        return tuple(getattr(self, name) for name in KINDS[self.kind])

    def __str__(self) -> str:
        return format(self.kind, *self.fields)


def _bad(node_id: object, kind: str | None) -> AdagError:
    if kind is None:
        return AdagError(f"bad node id {node_id!r}: expected one of {_ALL_FORMS}")
    return AdagError(f"bad node id {node_id!r}: expected {_FORM[kind]}")


def format(kind: str, *fields: int | str | None) -> str:
    """The id of a node from its fields in the table's order, ``None`` for a ``*`` position:
    ``format("neuron", 3, 5, 17) == "neuron:3:5:17"``, ``format("head", 3, None, 5, "z") ==
    "head:3:*:5:z"``, ``format("logit", 2364) == "logit:2364"``. Checks the kind, the number
    of fields, where ``None`` may stand and the head letter; the caller passes non-negative
    ints (kept cheap: it runs once per node of a node set)."""
    spec = _SPEC.get(kind)
    if spec is None:
        raise AdagError(f"unknown node kind {kind!r}; expected one of {', '.join(KINDS)}")
    template, arity, slot = spec
    if len(fields) != arity:
        raise AdagError(
            f"node kind {kind} takes {arity} field(s) ({_FORM[kind]}), got {len(fields)}: "
            f"{fields!r}"
        )
    if kind == "head" and fields[3] not in HEAD_SUBS:
        raise AdagError(f"head sub {fields[3]!r} is not one of q k v z")
    if None in fields:
        if any(f is None for i, f in enumerate(fields) if i != slot):
            raise AdagError(f"only the position of a {kind} id may be None (*): {fields!r}")
        fields = tuple("*" if f is None else f for f in fields)
    return template.format(*fields)


def _uint(text: str) -> int | None:
    # ASCII digits only (str.isdigit accepts '²'), no sign, no leading zeros: one id per node
    if text.isascii() and text.isdigit() and (text == "0" or text[0] != "0"):
        return int(text)
    return None


def parse(node_id: str) -> NodeId:
    """The :class:`NodeId` of ``node_id``. Strict: an unknown kind, a wrong number of fields, a
    field that is not a non-negative integer (``*`` only as the position) or a bad head letter
    raises :class:`AdagError` naming the id and its expected form."""
    if not isinstance(node_id, str):
        raise _bad(node_id, None)
    kind, _, rest = node_id.partition(":")
    attrs = KINDS.get(kind)
    if attrs is None:
        raise _bad(node_id, None)
    parts = rest.split(":")
    if len(parts) != len(attrs):
        raise _bad(node_id, kind)
    values: dict[str, Any] = {}
    for name, text in zip(attrs, parts, strict=True):
        if name == "sub":
            if text not in HEAD_SUBS:
                raise _bad(node_id, kind)
            values[name] = text
        elif name == "pos" and text == "*":
            values[name] = None
        else:
            value = _uint(text)
            if value is None:
                raise _bad(node_id, kind)
            values[name] = value
    return NodeId(kind, **values)


def _site(node: NodeId, node_id: str) -> str:
    kind, layer = node.kind, node.layer
    if kind == "neuron":
        return f"blocks.{layer}.mlp.hook_post"
    if kind == "head":
        return f"blocks.{layer}.attn.hook_{node.sub}"
    if kind == "attn":
        return f"blocks.{layer}.hook_attn_out"
    if kind == "mlp":
        return f"blocks.{layer}.hook_mlp_out"
    if kind == "embed":
        return "blocks.0.hook_resid_pre"
    if kind == "logit":
        raise AdagError(
            f"node {node_id!r} is a logit, not a site; patch the residual stream or the "
            "unembedding input instead"
        )
    raise AdagError(
        f"node {node_id!r} is a transcoder {kind}; patching it needs a transcoder splice, "
        "which registers its sites"
    )


def to_patch(
    ids: str | Sequence[str],
    op: Op = "replace",
    value: Tensor | float | None = None,
) -> list[Patch]:
    """Patches applying ``op`` (``replace``, ``add``, ``scale`` or ``detach``) with ``value`` to
    the nodes ``ids``, in every batch row:

    ===========  ===============================  ==========================================
    id           site                             selection
    ===========  ===============================  ==========================================
    neuron       ``blocks.L.mlp.hook_post``       ``pos=P, index=I``
    head         ``blocks.L.attn.hook_X``         ``head=H, pos=P``
    attn         ``blocks.L.hook_attn_out``       ``pos=P``
    mlp          ``blocks.L.hook_mlp_out``        ``pos=P``
    embed        ``blocks.0.hook_resid_pre``      ``pos=P``
    ===========  ===============================  ==========================================

    (``P = *`` selects every position.) Ids on one site with the same kind of position (a number
    or ``*``) become one Patch with zipped list selectors, so 100 neurons are a few Patches.
    ``value`` is a scalar or a tensor that broadcasts over each Patch's selection (e.g. a
    ``d_model`` vector for attn / mlp / embed, a ``d_head`` vector for heads); for one value per
    node build the Patches by hand. Repeated ids count once. ``logit``, ``feature`` and
    ``error`` ids raise :class:`AdagError` (a logit is not a site; transcoder nodes need a
    splice)."""
    from adag.models.sites import Patch

    if isinstance(ids, str):
        ids = [ids]
    if op == "fn":
        raise AdagError("to_patch takes op replace, add, scale or detach; build fn Patches by hand")
    groups: dict[tuple[str, bool], list[NodeId]] = {}
    for node_id in dict.fromkeys(ids):
        node = parse(node_id)
        groups.setdefault((_site(node, node_id), node.pos is None), []).append(node)
    out: list[Patch] = []
    for (site, star), nodes in groups.items():
        kind = nodes[0].kind
        pos = None if star else [n.pos for n in nodes if n.pos is not None]
        index = [n.index for n in nodes if n.index is not None]  # neuron, head: all of them
        if kind == "neuron":
            out.append(Patch(site, value, op, pos=pos, index=index))
        elif kind == "head":
            out.append(Patch(site, value, op, head=index, pos=pos))
        else:  # attn, mlp, embed: whole vectors at positions
            out.append(Patch(site, value, op, pos=pos))
    return out


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def circuit_tracer_fields(kind: str, layer: int, pos: int, index: int) -> dict[str, Any]:
    """circuit-tracer's fields of a graph node (``Node.feature_node`` / ``error_node`` /
    ``token_node`` / ``logit_node`` in ``circuit_tracer/frontend/graph_models.py``):
    ``{"node_id", "feature", "layer", "feature_type", "jsNodeId"}``.

    ``layer``, ``pos`` and ``index`` are as an :class:`adag.graphs.graph.Graph` row stores them
    (embed: index the token id; logit: layer ``n_layers``, pos the traced position, index the
    token id; error: index unused). With L layer, P position, I index, tok token id, n layers:

    - neuron and feature: node_id ``L_I_P``, feature ``cantor(L, I) = (L+I)(L+I+1)/2 + I``
      (which the frontend unpairs for ``schema_version > 0``), layer ``"L"``, feature_type
      ``"cross layer transcoder"``, jsNodeId ``L_I-0``;
    - error: node_id ``L_-1_P``, feature -1, layer ``"L"``, feature_type
      ``"mlp reconstruction error"``, jsNodeId ``L_-1-P`` (the current library's; older
      releases wrote ``L_P-0``, which could alias a feature's jsNodeId);
    - embed: node_id ``E_tok_P``, feature P, layer ``"E"``, feature_type ``"embedding"``,
      jsNodeId ``E_tok-P``;
    - logit: node_id ``{n+1}_tok_P``, feature tok, layer ``"{n+1}"``, feature_type ``"logit"``,
      jsNodeId ``L_tok-P``.

    Other kinds (head, attn, mlp) have no circuit-tracer node and raise :class:`AdagError`."""
    if kind in ("neuron", "feature"):
        return {
            "node_id": f"{layer}_{index}_{pos}",
            "feature": _cantor(layer, index),
            "layer": str(layer),
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{index}-0",
        }
    if kind == "error":
        return {
            "node_id": f"{layer}_-1_{pos}",
            "feature": -1,
            "layer": str(layer),
            "feature_type": "mlp reconstruction error",
            "jsNodeId": f"{layer}_-1-{pos}",
        }
    if kind == "embed":
        return {
            "node_id": f"E_{index}_{pos}",
            "feature": pos,
            "layer": "E",
            "feature_type": "embedding",
            "jsNodeId": f"E_{index}-{pos}",
        }
    if kind == "logit":
        return {
            "node_id": f"{layer + 1}_{index}_{pos}",
            "feature": index,
            "layer": str(layer + 1),
            "feature_type": "logit",
            "jsNodeId": f"L_{index}-{pos}",
        }
    raise AdagError(
        f"{kind} nodes have no circuit-tracer node type; export graphs of embed, neuron, "
        "feature, error and logit nodes"
    )


def circuit_tracer_id(kind: str, layer: int, pos: int, index: int) -> str:
    """circuit-tracer's ``node_id`` of a graph row (see :func:`circuit_tracer_fields`)."""
    return str(circuit_tracer_fields(kind, layer, pos, index)["node_id"])


__all__ = [
    "HEAD_SUBS",
    "KINDS",
    "NodeId",
    "circuit_tracer_fields",
    "circuit_tracer_id",
    "format",
    "parse",
    "to_patch",
]
