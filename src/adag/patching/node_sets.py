"""Nodes for localisation: attention heads (q, k, v, z), MLP neurons and whole sublayers, each per
position or summed over positions, with the ids of DESIGN.md (written by
:func:`adag.nodes.format`).

A :class:`NodeSet` is built for one prompt length ``T``: it is a list of :class:`Group` s (one site
of one layer, e.g. all z heads of layer 3 at every position), and numbers the nodes of all groups
consecutively — group ``g`` occupies ``offsets[g] : offsets[g] + size`` of every flat score
vector, in the row-major order of ``group.shape``:

==============  ===================  ====================  ==========================
kind            shape per position   shape summed          id
==============  ===================  ====================  ==========================
head (q z)      ``(n_heads, T)``     ``(n_heads,)``        ``head:L:P:H:X`` / ``*``
head (k v)      ``(n_kv_heads, T)``  ``(n_kv_heads,)``     ``head:L:P:H:X`` / ``*``
neuron          ``(T, d_mlp)``       ``(d_mlp,)``          ``neuron:L:P:I`` / ``*``
attn / mlp      ``(T,)``             ``(1,)``              ``attn:L:P`` / ``attn:L:*``
==============  ===================  ====================  ==========================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from torch import Tensor

from adag.errors import AdagError
from adag.models.sites import Patch
from adag.nodes import format as format_id

if TYPE_CHECKING:
    from adag.models.model import Model

Kind = Literal["head", "neuron", "attn", "mlp"]

NODE_SETS = ("heads", "qkv", "neurons", "neurons_pos", "sublayers", "all")
"""Named node sets: ``heads`` — z per head per position; ``qkv`` — q, k, v per head per position;
``neurons`` — each neuron summed over positions; ``neurons_pos`` — each neuron at each position;
``sublayers`` — attention and MLP outputs per position; ``all`` — heads + qkv + neurons +
sublayers. Combine with commas (``heads,neurons``)."""


@dataclass(frozen=True)
class Group:
    """All nodes of one kind at one site of one layer."""

    kind: Kind
    layer: int
    sub: str | None
    """q, k, v or z for heads; None otherwise."""
    per_pos: bool
    shape: tuple[int, ...]

    @property
    def site(self) -> str:
        b = f"blocks.{self.layer}."
        if self.kind == "head":
            return b + f"attn.hook_{self.sub}"
        if self.kind == "neuron":
            return b + "mlp.hook_post"
        return b + ("hook_attn_out" if self.kind == "attn" else "hook_mlp_out")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def ids(self) -> list[str]:
        """The ids of this group's nodes, in the row-major order of ``shape``."""
        kind, lay, sub = self.kind, self.layer, self.sub
        if kind == "head":
            if self.per_pos:
                n_h, t = self.shape
                return [format_id(kind, lay, p, h, sub) for h in range(n_h) for p in range(t)]
            return [format_id(kind, lay, None, h, sub) for h in range(self.shape[0])]
        if kind == "neuron":
            if self.per_pos:
                t, d = self.shape
                return [format_id(kind, lay, p, i) for p in range(t) for i in range(d)]
            return [format_id(kind, lay, None, i) for i in range(self.shape[0])]
        if self.per_pos:
            return [format_id(kind, lay, p) for p in range(self.shape[0])]
        return [format_id(kind, lay, None)]

    def reduce(self, x: Tensor) -> Tensor:
        """Per-node sums of an elementwise product at this group's site (``batch ...`` site layout,
        batch 1) -> a tensor of ``self.shape``."""
        x = x[0]
        if self.kind == "head":  # (head, pos, d_head)
            x = x.sum(-1)
            return x if self.per_pos else x.sum(-1)
        if self.kind == "neuron":  # (pos, d_mlp)
            return x if self.per_pos else x.sum(0)
        x = x.sum(-1)  # (pos,)
        return x if self.per_pos else x.sum().reshape(1)

    def positions(self, local: np.ndarray) -> np.ndarray:
        """The token position of each node ``local`` (-1 for nodes summed over positions)."""
        local = np.asarray(local, dtype=np.int64)
        if not self.per_pos:
            return np.full(len(local), -1, dtype=np.int64)
        if self.kind == "head":
            return np.asarray(np.unravel_index(local, self.shape)[1], dtype=np.int64)
        if self.kind == "neuron":
            return np.asarray(np.unravel_index(local, self.shape)[0], dtype=np.int64)
        return local

    def patch(self, local: np.ndarray, rows: np.ndarray, source: Tensor, start: int = 0) -> Patch:
        """A Patch setting the nodes ``local`` (indices into this group) of batch rows ``rows`` to
        their values in ``source`` (this site's activation on the source prompt, batch 1).

        With ``start``, for a forward of positions ``start..T-1`` only
        (:meth:`adag.models.model.Model.forward_from`): positions count from ``start``, and
        nodes at earlier positions are left out (the caller knows they are unchanged)."""
        src = source[0]
        if start:
            keep = self.positions(local) >= start
            if self.per_pos:
                local, rows = local[keep], rows[keep]
            pos_axis = 1 if self.kind == "head" else 0
            src = src.narrow(pos_axis, start, src.shape[pos_axis] - start)
        rows_l = rows.tolist()
        if self.kind == "head":
            if self.per_pos:
                h, p = np.unravel_index(local, self.shape)
                return Patch(
                    self.site,
                    src[h, p - start],
                    batch=rows_l,
                    head=h.tolist(),
                    pos=(p - start).tolist(),
                )
            return Patch(self.site, src[local], batch=rows_l, head=local.tolist())
        if self.kind == "neuron":
            if self.per_pos:
                p, i = np.unravel_index(local, self.shape)
                return Patch(
                    self.site,
                    src[p - start, i],
                    batch=rows_l,
                    pos=(p - start).tolist(),
                    index=i.tolist(),
                )
            return Patch(self.site, src[:, local].T, batch=rows_l, index=local.tolist())
        if self.per_pos:
            return Patch(self.site, src[local - start], batch=rows_l, pos=(local - start).tolist())
        return Patch(self.site, src[None].expand(len(rows_l), *src.shape), batch=rows_l)


class NodeSet:
    """The nodes of a prompt of length ``T`` (see the module docstring for the layout)."""

    def __init__(self, groups: Sequence[Group]) -> None:
        self.groups = list(groups)
        sizes = np.array([g.size for g in self.groups], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._ids: list[str] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(g.site for g in self.groups))

    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = [i for g in self.groups for i in g.ids()]
        return self._ids

    def split(self, flat: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Group flat node indices: ``[(group index, positions in ``flat``, local indices)]``."""
        flat = np.asarray(flat, dtype=np.int64)
        gi = np.searchsorted(self.offsets, flat, side="right") - 1
        out = []
        for g in np.unique(gi):
            where = np.nonzero(gi == g)[0]
            out.append((int(g), where, flat[where] - self.offsets[g]))
        return out

    def layer_pos(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The layer and the token position (-1: summed over positions) of flat node indices."""
        flat = np.asarray(flat, dtype=np.int64)
        layers = np.zeros(len(flat), dtype=np.int64)
        pos = np.zeros(len(flat), dtype=np.int64)
        for g, where, local in self.split(flat):
            layers[where] = self.groups[g].layer
            pos[where] = self.groups[g].positions(local)
        return layers, pos

    def patches(
        self, rows_of: Sequence[np.ndarray], source: dict[str, Tensor], *, start: int = 0
    ) -> list[Patch]:
        """Patches putting, for each batch row r, the nodes ``rows_of[r]`` to their ``source``
        values (one forward can then carry one node set per row). ``start``: for a forward of
        positions ``start..`` only (see :meth:`Group.patch`)."""
        flat = (
            np.concatenate([np.asarray(r, dtype=np.int64) for r in rows_of])
            if rows_of
            else np.zeros(0, np.int64)
        )
        rows = (
            np.concatenate([np.full(len(r), i, dtype=np.int64) for i, r in enumerate(rows_of)])
            if rows_of
            else np.zeros(0, np.int64)
        )
        out = []
        for g, where, local in self.split(flat):
            grp = self.groups[g]
            if start:
                ps = grp.positions(local)
                keep = (ps < 0) | (ps >= start)
                where, local = where[keep], local[keep]
                if not len(local):
                    continue
            out.append(grp.patch(local, rows[where], source[grp.site], start))
        return out


def _groups_for(name: str, model: Model, t: int) -> list[Group]:
    L = range(model.n_layers)
    H, KV = model.n_heads, model.n_kv_heads
    if name == "heads":
        return [Group("head", layer, "z", True, (H, t)) for layer in L]
    if name == "qkv":
        return [
            Group("head", layer, s, True, ((H if s == "q" else KV), t))
            for layer in L
            for s in ("q", "k", "v")
        ]
    if name == "neurons":
        return [Group("neuron", layer, None, False, (model.d_mlp,)) for layer in L]
    if name == "neurons_pos":
        return [Group("neuron", layer, None, True, (t, model.d_mlp)) for layer in L]
    if name == "sublayers":
        return [Group(k, layer, None, True, (t,)) for layer in L for k in ("attn", "mlp")]  # type: ignore[arg-type]
    if name == "all":
        return [
            g for n in ("heads", "qkv", "neurons", "sublayers") for g in _groups_for(n, model, t)
        ]
    raise AdagError(
        f"unknown node set {name!r}; choose from {', '.join(NODE_SETS)} (comma-separated)"
    )


def node_set(model: Model, spec: str | Sequence[Group], t: int) -> NodeSet:
    """The nodes named by ``spec`` (see :data:`NODE_SETS`) for a prompt of ``t`` tokens."""
    if not isinstance(spec, str):
        return NodeSet(spec)
    groups: list[Group] = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        groups += _groups_for(name, model, t)
    if not groups:
        raise AdagError(f"empty node set {spec!r}; choose from {', '.join(NODE_SETS)}")
    seen: dict[tuple[Any, ...], Group] = {}
    for g in groups:
        seen.setdefault((g.kind, g.layer, g.sub, g.per_pos), g)
    return NodeSet(list(seen.values()))
