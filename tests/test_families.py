"""A node family defined in this file alone traces through the shared edge machinery, and its
edges equal finite differences: proof that transcoder features fit without touching the engine.

The toy family: ``N_FEAT`` fixed random directions read from the residual stream before layer 1
(``a = resid_pre · D``) and written back into the residual stream after layers 1 and 2
(``+ a · W1``, ``+ a · W2``). Its activations are published as run-time sites, as a transcoder
splice publishes its features."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from adag.graphs.family import Mode, NodeFamily
from adag.graphs.neurons import MlpNeurons
from adag.graphs.trace import trace
from adag.models.model import Model
from adag.models.sites import Patch, Session, SiteRun

from .conftest import tiny_model
from .reference import reference_logits, reference_patches

EPS = 1e-3
N_FEAT = 3
LAYER = 1
READ = f"blocks.{LAYER}.hook_resid_pre"
PRE = f"blocks.{LAYER}.toy.hook_pre"
ACT = f"blocks.{LAYER}.toy.hook_act"
WRITES = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")


class ToySplice(Session):
    """Runs the toy inside the forward pass; in the edge pass its activation is detached from
    its input (a direct effect must not run through another node), as every MLP is stopped."""

    def __init__(self, model: Model, fam: ToyFamily, mode: Mode) -> None:
        self.model, self.fam, self.mode = model, fam, mode
        self.act: Tensor | None = None

    def site(self, name: str, x: Tensor) -> Tensor:
        if name == READ:
            pre = self.model.publish(PRE, torch.einsum("bpd,dn->bpn", x, self.fam.D.to(x)))
            self.act = self.model.publish(ACT, pre.detach() if self.mode == "edges" else pre)
        elif name in WRITES and self.act is not None:
            return x + self.act @ self.fam.W[name].to(x)
        return x


class ToyFamily(NodeFamily):
    kind = "feature"

    def __init__(self, model: Model, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        d = model.d_model
        self.D = torch.randn(d, N_FEAT, generator=gen, dtype=torch.float64) / d**0.5
        self.W = {w: torch.randn(N_FEAT, d, generator=gen, dtype=torch.float64) for w in WRITES}
        for name in (PRE, ACT):
            model.register_site(name, ("batch", "pos", "d_feature"))

    def layers(self, model: Model) -> list[int]:
        return [LAYER]

    def site(self, layer: int) -> str:
        return ACT

    def read_stage(self, layer: int) -> float:
        return float(layer)  # blocks.1.hook_resid_pre

    def write_stage(self, layer: int) -> float:
        return layer + 1.0  # first write: blocks.1.hook_resid_post

    def edge_sites(self, model: Model, layers: Sequence[int]) -> list[str]:
        return [PRE]

    def splice(
        self, model: Model, mode: Mode, clean: Mapping[str, Tensor] | None
    ) -> contextlib.AbstractContextManager[object]:
        return model.session(ToySplice(model, self, mode))

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
        x = run.value(PRE)  # a = pre: the toy is linear, its partial is 1
        s = torch.zeros_like(x)
        s[rows, pos, idx] = 1.0
        return [(x, s)]


@pytest.fixture(scope="module")
def setup():
    m = tiny_model("llama")
    fam = ToyFamily(m)
    ids = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(1))
    g = trace(
        m,
        ids,
        k=3,
        node_threshold=0.01,
        edge_threshold=0.0,
        batch_size=16,
        families=[MlpNeurons(), fam],
    )[0]
    return m, fam, ids, g


def _fd(m, fam, ids, rules, perturb, rows, read) -> Tensor:
    """Change of a target (a site entry ``(site, pos, idx)`` or a logit id) per row of
    perturbations, over ``EPS``, in the frozen reference with the toy spliced in and its
    activation frozen at its clean value (so no path runs through another toy node)."""
    tokens = ids[None]
    with m.session(ToySplice(m, fam, "clean")):
        patches, reads, clean = reference_patches(m, tokens, rules)
        _, c = m.run_with_cache(tokens, [ACT])
        freeze = [*patches, Patch(ACT, c[ACT])]
        _, c1 = m.run_with_cache(
            tokens.expand(rows, -1), [*reads, PRE], patches=[*freeze, *perturb]
        )
        _, c0 = m.run_with_cache(tokens, [*reads, PRE], patches=freeze)
    if isinstance(read, int):
        return (reference_logits(m, c1, clean, read) - reference_logits(m, c0, clean, read)) / EPS
    site, p, i = read
    return (c1[site][:, p, i] - c0[site][:, p, i]) / EPS


def test_toy_family_nodes_and_layout(setup):
    *_, g = setup
    toy = g.mask("feature")
    assert toy.sum() > 0 and set(g.node_layer[toy].tolist()) == {LAYER}
    assert g.settings["families"] == ["neuron", "feature"]
    # rows: embeddings, neurons, toy features, logits; ids in adag.nodes' format
    kinds = [k for k in g.node_kinds if k != "embed"]
    assert kinds == sorted(kinds, key=["neuron", "feature", "logit"].index)
    row = int(np.flatnonzero(toy)[0])
    assert g.node_ids[row] == f"feature:{LAYER}:{g.node_position[row]}:{g.node_index[row]}"
    # the toy reads before layer 1 and writes after it: no edge from a layer-1 neuron into it,
    # none from it into a layer-1 neuron, and edges both ways where the stream connects them
    src_k = np.array(g.node_kinds)[g.edge_source]
    tgt_k = np.array(g.node_kinds)[g.edge_target]
    into = (tgt_k == "feature") & (src_k == "neuron")
    out_of = (src_k == "feature") & (tgt_k == "neuron")
    assert into.any() and out_of.any() and ((src_k == "feature") & (tgt_k == "logit")).any()
    assert (g.node_layer[g.edge_source[into]] == 0).all()
    assert (g.node_layer[g.edge_target[out_of]] == 2).all()


def test_edges_into_toy_nodes_equal_finite_differences(setup):
    m, fam, ids, g = setup
    toy = np.flatnonzero(g.mask("feature"))
    ed = g.edge_dict()
    stop = ["stop"] * m.n_layers
    _, c = m.run_with_cache(ids[None], ["blocks.0.hook_resid_pre"])
    emb = c["blocks.0.hook_resid_pre"][0]
    neurons0 = np.flatnonzero(g.mask("neuron") & (g.node_layer == 0))
    assert len(neurons0) > 0
    sp, si = g.node_position[neurons0].tolist(), g.node_index[neurons0].tolist()
    perturb = [
        Patch("blocks.0.mlp.hook_post", EPS, op="add", batch=list(range(len(sp))), pos=sp, index=si)
    ]
    checked = 0
    for t in toy[:: max(1, len(toy) // 4)]:
        p, i, a_t = int(g.node_position[t]), int(g.node_index[t]), float(g.node_activation[t])
        d = _fd(m, fam, ids, stop, perturb, len(sp), (PRE, p, i))
        want = d * torch.as_tensor(g.node_activation[neurons0]) / a_t
        got = torch.tensor(
            [ed.get((g.node_ids[s], g.node_ids[t]), 0.0) for s in neurons0], dtype=torch.float64
        )
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
        P = list(range(p + 1))
        pe = [Patch("blocks.0.hook_resid_pre", EPS * emb[P], op="add", batch=P, pos=P)]
        d = _fd(m, fam, ids, stop, pe, len(P), (PRE, p, i))
        got = torch.tensor(
            [ed.get((f"embed:{q}", g.node_ids[t]), 0.0) for q in P], dtype=torch.float64
        )
        torch.testing.assert_close(got, d / a_t, rtol=1e-7, atol=1e-10)
        checked += 1
    assert checked >= 3


def test_edges_out_of_toy_nodes_equal_finite_differences(setup):
    m, fam, ids, g = setup
    toy = np.flatnonzero(g.mask("feature"))
    ed = g.edge_dict()
    tp, ti = g.node_position[toy].tolist(), g.node_index[toy].tolist()
    perturb = [Patch(ACT, EPS, op="add", batch=list(range(len(toy))), pos=tp, index=ti)]
    a_s = torch.as_tensor(g.node_activation[toy])
    # into neurons of layer 2 (reading after the toy's first write): that MLP under relp
    neurons2 = np.flatnonzero(g.mask("neuron") & (g.node_layer == 2))
    rules = ["stop", "stop", "relp"]
    for t in neurons2[:: max(1, len(neurons2) // 5)]:
        p, i = int(g.node_position[t]), int(g.node_index[t])
        d = _fd(m, fam, ids, rules, perturb, len(toy), ("blocks.2.mlp.hook_post", p, i))
        want = d * a_s / float(g.node_activation[t])
        got = torch.tensor(
            [ed.get((g.node_ids[s], g.node_ids[t]), 0.0) for s in toy], dtype=torch.float64
        )
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    # into every target logit, through both writes
    for j, tok in enumerate(g.target_ids.tolist()):
        d = _fd(m, fam, ids, ["stop"] * m.n_layers, perturb, len(toy), tok)
        want = d * a_s / float(g.target_logits[j])
        got = torch.tensor(
            [ed.get((g.node_ids[s], f"logit:{tok}"), 0.0) for s in toy], dtype=torch.float64
        )
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
        assert got.abs().max() > 0


def test_direct_effects_do_not_run_through_toy_nodes(setup):
    """neuron(layer 0) → logit edges equal the change of the logit with every toy activation
    frozen: the path through the toy nodes belongs to their own edges."""
    m, fam, ids, g = setup
    ed = g.edge_dict()
    neurons0 = np.flatnonzero(g.mask("neuron") & (g.node_layer == 0))[:40]
    sp, si = g.node_position[neurons0].tolist(), g.node_index[neurons0].tolist()
    rows = list(range(len(sp)))
    perturb = [Patch("blocks.0.mlp.hook_post", EPS, op="add", batch=rows, pos=sp, index=si)]
    for j, tok in enumerate(g.target_ids.tolist()):
        d = _fd(m, fam, ids, ["stop"] * m.n_layers, perturb, len(sp), tok)
        want = d * torch.as_tensor(g.node_activation[neurons0]) / float(g.target_logits[j])
        got = torch.tensor(
            [ed.get((g.node_ids[s], f"logit:{tok}"), 0.0) for s in neurons0], dtype=torch.float64
        )
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
