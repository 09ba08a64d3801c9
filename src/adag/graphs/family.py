"""Node families: what tracing needs to know about one kind of graph node.

:func:`adag.graphs.trace.trace` is one algorithm (clean run, node attribution, input attribution,
direct-effect edges, assembly) over any number of families. A family says

* **where its activations live**: one site per layer, ``batch pos n`` (``site``), read in the clean
  run and in linear-replica runs, differentiated in the attribution and edge passes;
* **how a node's attribution is formed** from that site's gradient and clean value
  (``attribution``, ``source_contributions``; ``a · ∂/∂a`` by default);
* **how a batch of rows is seeded for one target node each** in the edge pass, where every MLP is
  stopped and the family's splice runs in ``"edges"`` mode (``seeds``);
* **where it reads and writes in the forward pass** (``read_stage`` / ``write_stage``, in layers:
  ``l`` is ``blocks.l.hook_resid_pre``, ``l + 0.5`` the MLP input, ``l + 1`` ``blocks.l.hook_resid_post``);
  an edge ``s → t`` exists only if ``write_stage(s) <= read_stage(t)``. A cross-layer transcoder
  feature writes to every later layer: its first write decides;
* **code it runs inside the forward pass** (``splice``: a transcoder replacing the MLPs, publishing
  its feature activations as run-time sites with :meth:`adag.models.model.Model.publish`), and the
  MLP rule it needs for the attribution pass (``mlp_rules``: ``stop`` where a splice replaces the
  MLP);
* its node **kind**, which is also the id prefix of :mod:`adag.nodes` (``neuron:L:P:I``).

MLP neurons (:class:`adag.graphs.neurons.MlpNeurons`) are the first family; transcoder features
and error nodes are the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.models.sites import SiteRun

EdgeSource = Callable[[Mapping[str, Tensor], int, float], Tensor]
"""One family's nodes as sources of the edge pass: ``(grads, rows, reach) -> (rows, n)``, with
zeros (not computed) for the nodes that write after stage ``reach`` (the pass's deepest
target read)."""

Mode = Literal["clean", "attribution", "edges", "replica"]
"""The forward passes of a trace: the clean run (values), the attribution pass (linearised
backward, one row per target logit), the edge pass (every MLP stopped, one row per target node) and
the linear-replica runs (input attributions)."""


@dataclass
class Nodes:
    """The kept nodes of one family, sorted by (layer, position, index); tensors of length ``n``."""

    layer: Tensor
    pos: Tensor
    idx: Tensor
    act: Tensor
    """the node's clean activation (the value edges into it are normalised by)"""
    attr: Tensor
    """attribution to the metric"""
    out_attr: Tensor
    """``(n, K)``: attribution to each target logit"""

    def __len__(self) -> int:
        return len(self.layer)

    def of_layer(self, layer: int) -> Tensor:
        """Boolean mask of the nodes of ``layer``."""
        return self.layer == layer


class NodeFamily:
    """One kind of graph node; see the module docstring. Subclasses set ``kind`` and implement
    ``site``, ``read_stage``, ``write_stage`` and ``seeds``; the rest has defaults for nodes that are
    scalar entries of their site."""

    kind: str = ""
    can_be_target: bool = True
    """whether edges into this family's nodes are traced (error nodes: no)"""
    bos_embedding: bool = False
    """keep the embedding of an excluded leading BOS position as a source-only node (as
    circuit-tracer keeps its BOS token node): the BOS position has no other nodes, but its
    embedding's direct effects on later nodes are edges"""

    def layers(self, model: Model) -> list[int]:
        """The layers that have nodes of this family."""
        return list(range(model.n_layers))

    def site(self, layer: int) -> str:
        """The site ``batch pos n`` holding this family's activations at ``layer``."""
        raise NotImplementedError

    def read_stage(self, layer: int) -> float:
        raise NotImplementedError

    def write_stage(self, layer: int) -> float:
        raise NotImplementedError

    def candidates(self, x: Tensor) -> Tensor:
        """``(T, n)`` bool over the node values (:meth:`values`) of the clean site value ``x``:
        the entries that can become nodes at all (transcoder features: the active ones). Only
        these are carried through the attribution passes. Default: every entry."""
        return torch.ones_like(self.values(x), dtype=torch.bool)

    def keep(self, attr: Tensor, v: Tensor, threshold: float) -> Tensor:
        """Bool, elementwise over candidate entries: which become nodes, from their attribution
        to the metric ``attr``, their node values ``v`` and the absolute threshold
        (``node_threshold · |m|``). Default ``|attr| >= threshold``; transcoder features also
        need ``a != 0``, error nodes are all kept."""
        return attr.abs() >= threshold

    def settings(self, model: Model) -> dict[str, Any]:
        """Entries this family adds to (or overrides in) ``Graph.settings``."""
        return {}

    def mlp_rules(self, model: Model) -> Mapping[int, str]:
        """Per-layer MLP rules for the attribution pass and the replica (``relp`` elsewhere)."""
        return {}

    def clean_sites(self, model: Model) -> list[str]:
        """Extra sites the clean run must read (for seeds)."""
        return []

    def edge_sites(self, model: Model, layers: Sequence[int]) -> list[str]:
        """Sites to read in the edge pass, for seeding targets of ``layers``."""
        return []

    def splice(
        self, model: Model, mode: Mode, clean: Mapping[str, Tensor] | None
    ) -> contextlib.AbstractContextManager[object]:
        """A context manager active around every forward pass of mode ``mode`` (entered after the
        pass's own :class:`~adag.models.sites.SiteRun`). ``clean``: the clean run's values (batch
        stripped), ``None`` in the clean run."""
        return contextlib.nullcontext()

    def values(self, x: Tensor) -> Tensor:
        """Node values ``(..., pos, n)`` from the site value ``x``."""
        return x

    def attribution(self, grad: Tensor, x: Tensor) -> Tensor:
        """``(rows, pos, n)``: each node's value times the gradient of each row's output with
        respect to it; ``grad`` is ``(rows, pos, ·)`` at the site, ``x`` the clean ``(pos, ·)``."""
        return grad * x

    def source_contributions(
        self, grad: Tensor, x: Tensor, pos: Tensor, idx: Tensor, act: Tensor
    ) -> Tensor:
        """``(rows, n)``: :meth:`attribution` at the given nodes only (of one layer), without
        forming it for every entry of the site."""
        return grad[:, pos, idx] * act

    def edge_grad_sites(self, model: Model, layer: int) -> list[str]:
        """The sites whose gradients in the edge pass give the direct effects on this family's
        nodes of ``layer`` as sources (:meth:`edge_source`); default: :meth:`site`."""
        return [self.site(layer)]

    def edge_source(self, model: Model, clean: Mapping[str, Tensor], nodes: Nodes) -> EdgeSource:
        """This family's kept nodes as sources of the edge pass: prepared once per trace, the
        returned function maps the gradients at :meth:`edge_grad_sites`, a row count ``b`` and
        the pass's reach (the deepest read stage of its targets) to ``(b, len(nodes))``:
        ``a_s · ∂target/∂a_s`` for the first ``b`` rows, zero for nodes writing after the
        reach (whose gradients the pass does not compute). Default: per layer,
        :meth:`source_contributions` at :meth:`site`."""
        blocks = []
        for layer in sorted(set(nodes.layer.tolist())):
            sel = nodes.of_layer(layer).nonzero().flatten()
            site = self.site(layer)
            blocks.append(
                (self.write_stage(layer), sel, site, clean[site], nodes.pos[sel], nodes.idx[sel])
            )
        n = len(nodes)

        def contributions(grads: Mapping[str, Tensor], rows: int, reach: float) -> Tensor:
            out = nodes.act.new_zeros(rows, n)
            for write, sel, site, x, pos, idx in blocks:
                if write > reach:
                    continue
                g = grads[site][:rows]
                P = g.shape[1]  # a prefix pass: nodes at positions >= P have no effect
                m = pos < P
                out[:, sel[m]] = self.source_contributions(
                    g, x[:P], pos[m], idx[m], nodes.act[sel[m]]
                )
            return out

        return contributions

    def edge_sites_within(self, model: Model, layers: Sequence[int], reach: float) -> list[str]:
        """The :meth:`edge_grad_sites` of ``layers`` that a pass of reach ``reach`` needs."""
        return [
            s
            for layer in layers
            if self.write_stage(layer) <= reach
            for s in self.edge_grad_sites(model, layer)
        ]

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
        """``(output, seed)`` pairs whose vector–Jacobian product, in the edge pass, is the
        gradient of node ``(layer, pos[i], idx[i])`` in batch row ``rows[i]`` with respect to every
        earlier site (every MLP stopped, the node's own nonlinearity linearised)."""
        raise NotImplementedError


@contextlib.contextmanager
def spliced(
    model: Model,
    families: Sequence[NodeFamily],
    mode: Mode,
    clean: Mapping[str, Tensor] | None,
) -> Iterator[None]:
    """Every family's :meth:`NodeFamily.splice` for ``mode``, entered in family order."""
    with contextlib.ExitStack() as stack:
        for f in families:
            stack.enter_context(f.splice(model, mode, clean))
        yield


__all__ = ["EdgeSource", "Mode", "NodeFamily", "Nodes", "spliced"]
