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

*Aligned positions.* A table over prompt pairs of different lengths
(:func:`adag.patching.scores.merge_pairs` with ``pairs``) cannot name a node by its absolute
position: position 17 is the last token of an 18-token pair and nothing in a 15-token one. Its
ids name the position in each pair instead by

- ``@ROLE``: the token the pair names ``ROLE`` (``PromptPair.roles``, e.g. ``head:23:@IO:3:z``
  is head 23.3 at the indirect object of every IOI pair; ``@END`` the last token), ROLE a
  letter then letters, digits, ``_`` or ``+`` (``S1+1``);
- ``-K``: the K-th token from the end (``head:23:-1:3:z`` is the last token of every pair), for
  a position that is not a named slot of its pair (:func:`position_labels`).

They name no position of one prompt, so :func:`parse` (and :func:`to_patch`, which patches one
prompt) rejects them unless ``aligned=True``; :func:`resolve` turns one back into the absolute
id for a given pair (its length and roles). Pairs all of one length keep absolute ids.

- :func:`format` writes an id from its fields in the table's order (``None`` for ``*``);
  :func:`parse` reads one strictly into a :class:`NodeId`.
- :func:`position_labels`, :func:`align` and :func:`resolve` convert between absolute and
  aligned positions; :func:`pos_field` reads an id's position field cheaply.
- :func:`to_patch` turns ids into :class:`adag.models.sites.Patch` selectors (sites in the
  docstring of ``adag.models.sites``).
- :func:`circuit_tracer_fields` maps a graph row to circuit-tracer's node fields (the viewer
  JSON of ``adag.graphs.export``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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
_POS_PART = {  # kind -> index of the position among the fields after the kind (kinds with one)
    kind: attrs.index("pos") for kind, attrs in KINDS.items() if "pos" in attrs
}
ROLE_PATTERN = r"[A-Za-z][A-Za-z0-9_+]*"
"""What a role name (``PromptPair.roles``, ``@ROLE`` in an aligned id) may be."""
_ROLE = re.compile(ROLE_PATTERN)


def is_role(name: object) -> bool:
    """Whether ``name`` is a valid role name (:data:`ROLE_PATTERN`)."""
    return isinstance(name, str) and name.isascii() and _ROLE.fullmatch(name) is not None


@dataclass(frozen=True)
class NodeId:
    """A parsed node id; ``str(node)`` is the id. Fields a kind does not have are None."""

    kind: str
    layer: int | None = None
    pos: int | None = None
    """Prompt position; None is ``*`` (summed over positions) or a role (see ``role``); negative
    counts from the end (-1: the last token) in an aligned id (module doc)."""
    index: int | None = None
    """Neuron / feature index, head index, or token id (``logit``); None for embed, attn, mlp,
    error."""
    sub: str | None = None
    """``q k v z`` for heads."""
    role: str | None = None
    """The role of an aligned ``@ROLE`` position (then ``pos`` is None); None otherwise."""

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
        if self.role is not None and (
            self.kind == "logit" or self.pos is not None or not is_role(self.role)
        ):
            raise AdagError(
                f"{self.kind} node with role {self.role!r}: a role replaces the position "
                f"(pos None) and matches {ROLE_PATTERN}"
            )

    @property
    def aligned(self) -> bool:
        """Whether the position is aligned across pairs (``@ROLE`` or negative, module doc)."""
        return self.role is not None or (self.pos is not None and self.pos < 0)

    @property
    def fields(self) -> tuple[int | str | None, ...]:
        """The id's fields in the table's order (what :func:`format` takes; a role as
        ``"@ROLE"``)."""
        return tuple(
            "@" + self.role if name == "pos" and self.role is not None else getattr(self, name)
            for name in KINDS[self.kind]
        )

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
    ints (kept cheap: it runs once per node of a node set). An aligned position (module doc) is
    passed as a negative int or as the string ``"@ROLE"``, and written as given."""
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


def _aligned_pos(text: str) -> int | str | None:
    """``-K`` (K a positive integer without leading zeros) -> -K, ``@ROLE`` -> ROLE, else
    None."""
    if text.startswith("-"):
        k = _uint(text[1:])
        return None if k is None or k == 0 else -k
    if text.startswith("@") and is_role(text[1:]):
        return text[1:]
    return None


def parse(node_id: str, *, aligned: bool = False) -> NodeId:
    """The :class:`NodeId` of ``node_id``. Strict: an unknown kind, a wrong number of fields, a
    field that is not a non-negative integer (``*`` only as the position) or a bad head letter
    raises :class:`AdagError` naming the id and its expected form.

    An aligned position (``@ROLE`` or ``-K``, module doc) is read only with ``aligned=True``
    (``role`` set, or a negative ``pos``); otherwise it raises an :class:`AdagError` saying it
    names no position of one prompt and how to get one (:func:`resolve`)."""
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
        elif name == "pos" and text[:1] in ("@", "-"):
            value = _aligned_pos(text)
            if value is None:
                raise _bad(node_id, kind)
            if not aligned:
                raise AdagError(
                    f"bad node id {node_id!r}: expected {_FORM[kind]} with an absolute "
                    f"position; {text} is a position aligned across prompt pairs of different "
                    f"lengths ({'a named slot' if text[0] == '@' else 'counted from the end'}), "
                    "not a position of one prompt: use the position in that prompt, e.g. "
                    "adag.nodes.resolve(id, n_pos, roles)"
                )
            values["role" if isinstance(value, str) else "pos"] = value
        else:
            value = _uint(text)
            if value is None:
                raise _bad(node_id, kind)
            values[name] = value
    return NodeId(kind, **values)


def position_labels(n_pos: int, roles: Mapping[str, int] | None = None) -> list[str]:
    """The aligned position field (module doc) of each position of a prompt of ``n_pos`` tokens
    whose named slots are ``roles`` (role -> position): ``@ROLE`` at a named slot, else ``-K``
    counted from the end. ``position_labels(4, {"IO": 1}) == ["-4", "@IO", "-2", "-1"]``. Roles
    must be valid names (:data:`ROLE_PATTERN`) at distinct positions in ``0..n_pos-1``."""
    labels = [str(p - n_pos) for p in range(n_pos)]
    taken: dict[int, str] = {}
    for role, p in (roles or {}).items():
        if not is_role(role):
            raise AdagError(f"bad role name {role!r}: a role matches {ROLE_PATTERN}")
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n_pos:
            raise AdagError(
                f"role {role!r} is at position {p!r}, not a token position of a {n_pos}-token "
                f"prompt (0..{n_pos - 1})"
            )
        if p in taken:
            raise AdagError(
                f"roles {taken[p]!r} and {role!r} are both at position {p}; one position has "
                "one role"
            )
        taken[p] = role
        labels[p] = "@" + role
    return labels


def pos_field(node_id: str) -> str | None:
    """The position field of an id as written (``"17"``, ``"*"``, ``"-1"``, ``"@IO"``), None for a
    kind without one (logit). Cheap: no full parse (:func:`parse` checks an id)."""
    kind, _, rest = node_id.partition(":")
    slot = _POS_PART.get(kind)
    if slot is None:
        return None
    parts = rest.split(":")
    if slot >= len(parts):
        raise _bad(node_id, kind if kind in KINDS else None)
    return parts[slot]


def align(ids: Sequence[str], labels: Sequence[str]) -> list[str]:
    """``ids`` (of one prompt, absolute positions) with each position ``P`` replaced by
    ``labels[P]`` (:func:`position_labels`); ``*`` positions and logits stay as they are. Kept
    cheap (string surgery, no full parse): it runs once per node of a node set."""
    out = []
    for node_id in ids:
        kind, _, rest = node_id.partition(":")
        slot = _POS_PART.get(kind)
        if slot is None:
            out.append(node_id)
            continue
        parts = rest.split(":")
        if parts[slot] != "*":
            p = _uint(parts[slot])
            if p is None or p >= len(labels):
                raise AdagError(
                    f"cannot align node id {node_id!r}: its position is not one of the "
                    f"prompt's {len(labels)} absolute positions"
                )
            parts[slot] = labels[p]
        out.append(kind + ":" + ":".join(parts))
    return out


def resolve(node_id: str, n_pos: int, roles: Mapping[str, int] | None = None) -> str:
    """The absolute id, in a prompt of ``n_pos`` tokens with named slots ``roles``, of a node id
    with an aligned position (module doc): ``resolve("head:3:@IO:5:z", 15, {"IO": 4}) ==
    "head:3:4:5:z"``, ``resolve("head:3:-1:5:z", 15) == "head:3:14:5:z"``. Absolute ids come
    back unchanged. An unknown role, or ``-K`` that lands on a named slot (the aligned table
    calls that position by its role) or before the prompt, raises :class:`AdagError`."""
    node = parse(node_id, aligned=True)
    if not node.aligned:
        return node_id
    labels = position_labels(n_pos, roles)
    if node.role is not None:
        if roles is None or node.role not in roles:
            known = ", ".join(roles or {}) or "none"
            raise AdagError(
                f"node {node_id!r} is at role {node.role!r}, which this prompt does not name "
                f"(its roles: {known})"
            )
        p = roles[node.role]
    else:
        assert node.pos is not None
        p = n_pos + node.pos
        if p < 0 or labels[p] != str(node.pos):
            why = "before the start" if p < 0 else f"the named slot {labels[p]}"
            raise AdagError(
                f"node {node_id!r}: position {node.pos} of a {n_pos}-token prompt is {why}; "
                "an aligned table names such a position by its role"
            )
    fields = [p if name == "pos" else getattr(node, name) for name in KINDS[node.kind]]
    return format(node.kind, *fields)


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
    "ROLE_PATTERN",
    "NodeId",
    "align",
    "circuit_tracer_fields",
    "circuit_tracer_id",
    "format",
    "is_role",
    "parse",
    "pos_field",
    "position_labels",
    "resolve",
    "to_patch",
]
