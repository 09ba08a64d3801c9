"""MLP neurons as a node family: the nodes of ADAG's attribution graphs (Arora, Wu, Steinhardt,
Schwettmann 2026, "ADAG: Automatically Describing Attribution Graphs", §2).

A neuron is an entry of ``blocks.L.mlp.hook_post`` (the input of the down projection). It reads the
MLP input (stage ``L + 0.5``) and writes into ``blocks.L.hook_resid_post`` (stage ``L + 1``). In the
edge pass every MLP is stopped (``linearize(mlp="stop")``), so a target neuron cannot be seeded at
its own ``hook_post``; it is seeded at its gate / up pre-activations with the closed-form partials
of the ``relp`` half rule (:func:`adag.models.linear.post_partials`): the same gradient as seeding
``hook_post`` with 1 under that neuron's own ``relp`` rule, and targets of different layers share a
pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from adag.graphs.family import NodeFamily
from adag.models.linear import post_partials

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.models.sites import SiteRun


def _pre(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre"


def _lin(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre_linear"


class MlpNeurons(NodeFamily):
    """MLP neurons (``neuron:L:P:I``); see the module docstring."""

    kind = "neuron"

    def site(self, layer: int) -> str:
        return f"blocks.{layer}.mlp.hook_post"

    def read_stage(self, layer: int) -> float:
        return layer + 0.5

    def write_stage(self, layer: int) -> float:
        return layer + 1.0

    def clean_sites(self, model: Model) -> list[str]:
        layers = range(model.n_layers)
        return [_pre(i) for i in layers] + ([_lin(i) for i in layers] if model.spec.gated else [])

    def edge_sites(self, model: Model, layers: Sequence[int]) -> list[str]:
        return [_pre(i) for i in layers] + ([_lin(i) for i in layers] if model.spec.gated else [])

    def seeds(
        self,
        model: Model,
        run: SiteRun,
        clean: Mapping[str, Tensor],
        layer: int,
        rows: Tensor,
        pos: Tensor,
        idx: Tensor,
    ) -> list[tuple[Tensor, Tensor]]:
        gated = model.spec.gated
        g = clean[_pre(layer)][pos, idx]
        u = clean[_lin(layer)][pos, idx] if gated else None
        dg, du = post_partials("relp", model.act, gated, g, u)
        out = []
        for name, part in ((_pre(layer), dg), (_lin(layer), du)):
            if part is None:
                continue
            x = run.value(name)
            s = x.new_zeros(x.shape)
            s[rows, pos, idx] = part
            out.append((x, s))
        return out


__all__ = ["MlpNeurons"]
