"""Transcoder graphs (:mod:`adag.graphs.features`) against their definition, on float64 tiny random
models with random transcoders (PLT and CLT, ReLU and JumpReLU).

The reference here is written from the raw weights alone, without the library's splice: a
:class:`RefSplice` session recomputes the features from the MLP input and writes
``Σ_s a_s W_dec[s→l] + b_dec + err`` into ``hook_mlp_out``. Frozen (attention patterns and norm
scales patched to their clean values by :func:`tests.reference.reference_patches`, every feature
held at its clean activation) it is the linearised replacement model in which an edge is a direct
effect, and it is exactly linear in a perturbation added on top, so finite differences are exact
derivatives. Each source is perturbed by ``EPS`` times its own value (a feature by ``EPS · a``, an
error vector by ``EPS · err``, an embedding by ``EPS · e``), so ``Δtarget / EPS`` is the source's
contribution ``a_s · ∂target/∂a_s`` and ``w = contribution / a_t``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import Tensor

from adag.errors import AdagError
from adag.graphs import features as feat
from adag.graphs.trace import clean_run, trace
from adag.models.model import Model
from adag.models.sites import Patch, Session
from adag.transcoders import Transcoders

from .conftest import tiny_model
from .reference import reference_logits, reference_patches

EPS = 1e-3
N_FEATURES = 24
T = 9
EMBED = "blocks.0.hook_resid_pre"

TOPK = 6
CASES = [  # (architecture, kind, activation, skip weights)
    ("llama", "plt", "jumprelu", False),
    ("llama", "clt", "relu", False),
    ("llama", "plt", "topk", True),
    ("gemma2", "clt", "jumprelu", False),
    ("gemma2", "plt", "relu", False),
    ("gpt2", "plt", "jumprelu", False),
    ("gpt2", "clt", "jumprelu", True),
    ("qwen2", "clt", "jumprelu", False),
    ("qwen3", "plt", "relu", False),
    ("gemma3_text", "clt", "topk", False),
    ("olmo2", "plt", "jumprelu", False),
]


class Raw:
    """Random transcoder weights for every layer of ``m``, in the test's own layout."""

    def __init__(
        self, m: Model, kind: str, activation: str, skip: bool = False, seed: int = 0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        d, F, L = m.d_model, N_FEATURES, m.n_layers

        def rnd(*shape: int, scale: float = 1.0) -> Tensor:
            return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

        self.kind, self.activation, self.L = kind, activation, L
        self.W_enc = [rnd(F, d, scale=d**-0.5) for _ in range(L)]
        self.b_enc = [rnd(F, scale=0.2) for _ in range(L)]
        self.theta = [0.3 * torch.rand(F, generator=gen, dtype=torch.float64) for _ in range(L)]
        # dec[(s, t)]: decoder of layer s's features into layer t's MLP output
        self.dec = {
            (s, t): rnd(F, d, scale=0.3)
            for s in range(L)
            for t in range(L)
            if t == s or (kind == "clt" and t > s)
        }
        self.b_dec = [rnd(d, scale=0.1) for _ in range(L)]
        self.W_skip = [rnd(d, d, scale=0.2 * d**-0.5) for _ in range(L)] if skip else None

    def transcoders(self) -> Transcoders:
        L = self.L
        if self.kind == "plt":
            W_dec = [self.dec[(s, s)] for s in range(L)]
        else:
            W_dec = [torch.stack([self.dec[(s, t)] for t in range(s, L)]) for s in range(L)]
        kw = dict(
            kind=self.kind,
            layers=list(range(L)),
            W_enc=self.W_enc,
            b_enc=self.b_enc,
            W_dec=W_dec,
            b_dec=self.b_dec,
            activation=self.activation,
            threshold=self.theta if self.activation == "jumprelu" else None,
            k=TOPK if self.activation == "topk" else None,
            W_skip=self.W_skip,
            meta={"source": "test"},
        )
        names = {f.name for f in dataclasses.fields(Transcoders)}
        if "d_model" in names:
            kw["d_model"] = self.W_enc[0].shape[1]
        if "d_features" in names:
            kw["d_features"] = N_FEATURES
        return Transcoders(**kw)  # type: ignore[arg-type]

    def act(self, layer: int, pre: Tensor) -> Tensor:
        if self.activation == "relu":
            return pre.clamp_min(0)
        if self.activation == "topk":
            top = pre.topk(TOPK, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
        return pre * (pre > self.theta[layer])

    def sources(self, t: int) -> list[int]:
        return [s for s in range(self.L) if (s, t) in self.dec]


class RefSplice(Session):
    """The replacement model from the raw weights. ``clean=None``: the clean run (records pre,
    act and err; the stream unchanged). Otherwise ``frozen``: every feature at its clean value
    plus ``d_act``, error ``err · (1 + d_err)``; not frozen: features recomputed from the live
    MLP input, error constant."""

    def __init__(
        self,
        raw: Raw,
        clean: RefSplice | None = None,
        *,
        frozen: bool = True,
        d_act: dict[int, Tensor] | None = None,
        d_err: dict[int, Tensor] | None = None,
        drop: tuple[int, int] | None = None,
    ) -> None:
        self.raw, self.ref, self.frozen = raw, clean, frozen
        self.d_act, self.d_err = d_act or {}, d_err or {}
        self.drop = drop
        self.pre: dict[int, Tensor] = {}
        self.act: dict[int, Tensor] = {}
        self.err: dict[int, Tensor] = {}
        self.x: dict[int, Tensor] = {}

    def site(self, name: str, x: Tensor) -> Tensor:
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "blocks":
            return x
        layer, raw = int(parts[1]), self.raw
        if name.endswith("mlp.hook_in"):
            self.x[layer] = x
            pre = x @ raw.W_enc[layer].T + raw.b_enc[layer]
            self.pre[layer] = pre
            if self.ref is None or not self.frozen:
                self.act[layer] = raw.act(layer, pre)
            else:
                a = self.ref.act[layer][:, : pre.shape[1]].expand_as(pre)
                self.act[layer] = a + self.d_act[layer] if layer in self.d_act else a
            return x
        if name.endswith("hook_mlp_out"):
            recon = raw.b_dec[layer] + sum(
                self.act[s] @ raw.dec[(s, layer)]
                for s in raw.sources(layer)
                if (s, layer) != self.drop
            )
            if raw.W_skip is not None:  # a live linear path, as in the library
                recon = recon + self.x[layer] @ raw.W_skip[layer].T
            if self.ref is None:
                self.err[layer] = x - recon
                return x
            err = self.ref.err[layer][:, : x.shape[1]].expand_as(x)
            if layer in self.d_err:
                err = err * (1 + self.d_err[layer][..., None])
            return recon + err
        return x


def ref_clean(m: Model, raw: Raw, ids: Tensor) -> RefSplice:
    ref = RefSplice(raw)
    with torch.no_grad(), m.session(ref):
        m(ids[None])
    return ref


@pytest.fixture(
    scope="module", params=CASES, ids=["-".join(c[:3]) + ("-skip" if c[3] else "") for c in CASES]
)
def case(request):
    arch, kind, activation, skip = request.param
    m = tiny_model(arch)
    raw = Raw(m, kind, activation, skip)
    tc = raw.transcoders()
    ids = torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))
    g = trace(
        m,
        ids,
        transcoders=tc,
        node_threshold=0.002,
        edge_threshold=0.0,
        batch_size=64,
        desired_logit_prob=0.5,
        max_n_logits=3,
    )[0]
    return m, raw, tc, ids, g


def test_replacement_model_reproduces_the_logits(case):
    m, raw, tc, ids, g = case
    with torch.no_grad():
        want = m(ids[None])[0, -1]
    # the library's splice (features at their clean values, errors added back)
    fams = feat.replacement_families(m, tc)
    clean = clean_run(m, ids.tolist(), fams, _config())
    rep = fams[0].rep  # type: ignore[attr-defined]
    for mode in ("attribution", "edges"):
        with torch.no_grad(), m.session(feat.ReplacementSplice(m, rep, mode, clean.values)):
            got = m(ids[None])[0, -1]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the test's own replacement model, features recomputed from the live MLP inputs
    ref = ref_clean(m, raw, ids)
    with torch.no_grad(), m.session(RefSplice(raw, ref, frozen=False)):
        got = m(ids[None])[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # node values: features are the reference's activations, errors its error norms
    for row in np.flatnonzero(g.mask("feature")):
        layer, p, i = int(g.node_layer[row]), int(g.node_position[row]), int(g.node_index[row])
        a = float(ref.act[layer][0, p, i])
        assert a != 0 and g.node_activation[row] == pytest.approx(a, rel=1e-12)
    err_rows = np.flatnonzero(g.mask("error"))
    assert len(err_rows) == m.n_layers * T
    for row in err_rows:
        layer, p = int(g.node_layer[row]), int(g.node_position[row])
        assert g.node_ids[row] == f"error:{layer}:{p}"
        want_norm = float(ref.err[layer][0, p].norm())
        assert g.node_activation[row] == pytest.approx(want_norm, rel=1e-12)


def _config():
    from adag.graphs.config import TraceConfig

    return TraceConfig(desired_logit_prob=0.5, max_n_logits=3)


def measured_edges(
    m: Model,
    raw: Raw,
    ids: Tensor,
    g,
    sources: np.ndarray,
    targets: np.ndarray,
    *,
    drop: tuple[int, int] | None = None,
) -> Tensor:
    """``(targets, sources)``: the measured ``w`` of every pair in the frozen reference."""
    tokens = ids[None]
    ref = ref_clean(m, raw, ids)
    patches, reads, clean = reference_patches(m, tokens, "stop")
    B, L, dev = len(sources), m.n_layers, ids.device
    d_act = {layer: torch.zeros(B, T, N_FEATURES, dtype=torch.float64) for layer in range(L)}
    d_err = {layer: torch.zeros(B, T, dtype=torch.float64) for layer in range(L)}
    emb_rows, emb_pos = [], []
    for b, s in enumerate(sources.tolist()):
        kind, layer, p, i = g.node_kinds[s], int(g.node_layer[s]), int(g.node_position[s]), 0
        if kind == "feature":
            i = int(g.node_index[s])
            d_act[layer][b, p, i] = EPS * ref.act[layer][0, p, i]
        elif kind == "error":
            d_err[layer][b, p] = EPS
        else:
            emb_rows.append(b)
            emb_pos.append(p)
    emb = clean[EMBED][0]
    pe = [Patch(EMBED, EPS * emb[emb_pos], op="add", batch=emb_rows, pos=emb_pos)]
    run1 = RefSplice(raw, ref, d_act=d_act, d_err=d_err, drop=drop)
    run0 = RefSplice(raw, ref, drop=drop)
    with m.session(run1):
        _, c1 = m.run_with_cache(tokens.expand(B, -1).to(dev), reads, patches=[*patches, *pe])
    with m.session(run0):
        _, c0 = m.run_with_cache(tokens, reads, patches=patches)
    out = torch.zeros(len(targets), B, dtype=torch.float64)
    for j, t in enumerate(targets.tolist()):
        if g.node_kinds[t] == "logit":
            tok = int(g.node_index[t])
            d = reference_logits(m, c1, clean, tok) - reference_logits(m, c0, clean, tok)
        else:
            layer, p, i = int(g.node_layer[t]), int(g.node_position[t]), int(g.node_index[t])
            d = run1.pre[layer][:, p, i] - run0.pre[layer][0, p, i]
        out[j] = d / EPS / float(g.node_activation[t])
    return out


def _columns(g, n_features: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = np.flatnonzero(g.mask("feature"))
    if len(feats) > n_features:
        feats = np.sort(rng.choice(feats, n_features, replace=False))
    sources = np.concatenate(
        [np.flatnonzero(g.mask("embed")), np.flatnonzero(g.mask("error")), feats]
    )
    targets = np.flatnonzero(g.mask("feature") | g.mask("logit"))
    return sources, targets


def _graph_block(g, sources: np.ndarray, targets: np.ndarray) -> Tensor:
    dense = np.zeros((g.n_nodes, g.n_nodes))
    dense[g.edge_target, g.edge_source] = g.edge_weight
    return torch.as_tensor(dense[np.ix_(targets, sources)])


def test_every_edge_equals_the_measured_direct_effect(case):
    m, raw, _, ids, g = case
    n_feat = int(g.mask("feature").sum())
    assert n_feat >= 10, n_feat
    sources, targets = _columns(g)
    want = measured_edges(m, raw, ids, g, sources, targets)
    got = _graph_block(g, sources, targets)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    if raw.kind == "clt":  # cross-layer writes carry edges of their own
        tl = torch.as_tensor(g.node_layer[targets])[:, None]
        sl = torch.as_tensor(g.node_layer[sources])[None, :]
        feature_src = torch.as_tensor(g.mask("feature")[sources])[None, :]
        far = feature_src & (tl > sl + 1)  # not reachable through the source's own layer only
        assert got[far.expand_as(got)].abs().max() > 0


def test_mutation_is_caught(case):
    """The comparison fails for a reference that drops one decoder: the check is not vacuous."""
    m, raw, _, ids, g = case
    sources, targets = _columns(g, n_features=100)
    drop = (0, m.n_layers - 1) if raw.kind == "clt" else (0, 0)  # CLT: a cross-layer write
    want = measured_edges(m, raw, ids, g, sources, targets, drop=drop)
    got = _graph_block(g, sources, targets)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_graph_layout_and_settings(case):
    _, raw, _, _, g = case
    kinds = [k for k in g.node_kinds if k != "embed"]
    assert kinds == sorted(kinds, key=["feature", "error", "logit"].index)
    assert "neuron" not in kinds
    assert g.settings["families"] == ["feature", "error"]
    assert g.settings["transcoders"]["kind"] == raw.kind
    assert g.settings["desired_logit_prob"] == 0.5
    probs = g.target_probs
    assert 1 <= len(probs) <= 3
    assert probs[:-1].sum() < 0.5 and (probs.sum() >= 0.5 or len(probs) == 3)
    # no edge into an error node, none against the stages
    assert not g.mask("error")[g.edge_target].any()
    src_l, tgt_l = g.node_layer[g.edge_source], g.node_layer[g.edge_target]
    is_feat_src = g.mask("feature")[g.edge_source] | g.mask("error")[g.edge_source]
    assert (tgt_l[is_feat_src] > src_l[is_feat_src]).all()


def test_adjacency_is_the_raw_direct_effect(case):
    m, raw, _, ids, g = case
    sources, targets = _columns(g, n_features=30)
    want = measured_edges(m, raw, ids, g, sources, targets)
    want = want * torch.as_tensor(g.node_activation[targets])[:, None]  # un-normalised
    a = g.adjacency("raw").toarray()
    torch.testing.assert_close(torch.as_tensor(a[np.ix_(targets, sources)]), want)
    w = g.adjacency("weight").toarray()
    np.testing.assert_array_equal(w[g.edge_target, g.edge_source], g.edge_weight)


# -- scores ---------------------------------------------------------------------------------------


def dense_scores(g) -> tuple[float, float]:
    """circuit-tracer's ``compute_graph_scores``, line for line, on the dense raw adjacency."""
    n = g.n_nodes
    A = torch.as_tensor(g.adjacency("raw").toarray())
    N = A.abs() / A.abs().sum(dim=1, keepdim=True).clamp(min=1e-10)
    lw = torch.zeros(n, dtype=torch.float64)
    lw[torch.as_tensor(g.mask("logit"))] = torch.as_tensor(g.target_probs, dtype=torch.float64)
    current = lw @ N
    infl = current.clone()
    while current.any():
        current = current @ N
        infl += current
    tok = infl[torch.as_tensor(g.mask("embed"))].sum()
    err = infl[torch.as_tensor(g.mask("error"))].sum()
    non_error = 1 - N[:, torch.as_tensor(g.mask("error"))].sum(dim=-1)
    out = infl + lw
    return float(tok / (tok + err)), float((non_error * out).sum() / out.sum())


def test_scores_equal_the_dense_reference(case):
    from adag.graphs.scores import graph_scores

    *_, g = case
    for h in (g, g.prune(node_threshold=0.8, edge_threshold=0.98)):
        got = graph_scores(h)
        rep, comp = dense_scores(h)
        assert got.replacement == pytest.approx(rep, rel=1e-12)
        assert got.completeness == pytest.approx(comp, rel=1e-12)
        assert 0 < got.replacement < 1 and 0 < got.completeness < 1


@pytest.mark.parametrize("arch,kind", [("llama", "clt"), ("gpt2", "plt")])
def test_scores_are_one_when_the_errors_vanish(arch, kind):
    """A model whose MLPs *are* the transcoders (their outputs replaced by the reconstruction):
    every error is zero up to rounding, and both scores are 1."""
    from adag.graphs.scores import graph_scores

    m = tiny_model(arch)
    raw = Raw(m, kind, "jumprelu")
    ids = torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))
    exact = ref_clean(m, raw, ids)
    exact.err = {layer: torch.zeros_like(e) for layer, e in exact.err.items()}
    with m.session(RefSplice(raw, exact, frozen=False)):
        g = trace(m, ids, transcoders=raw.transcoders(), node_threshold=0.0, edge_threshold=0.0)[0]
    assert g.node_activation[g.mask("error")].max() < 1e-12
    for h in (g, g.prune()):
        s = graph_scores(h)
        assert s.replacement == pytest.approx(1.0, abs=1e-9)
        assert s.completeness == pytest.approx(1.0, abs=1e-9)


def test_max_feature_nodes_keeps_the_largest_attributions():
    m = tiny_model("llama")
    raw = Raw(m, "clt", "relu")
    ids = torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))
    opts = dict(transcoders=raw.transcoders(), node_threshold=0.002, edge_threshold=0.01)
    full = trace(m, ids, **opts)[0]
    capped = trace(m, ids, max_feature_nodes=7, **opts)[0]
    f_full, f_cap = full.mask("feature"), capped.mask("feature")
    assert f_cap.sum() == 7 and f_full.sum() > 7
    top = np.argsort(-np.abs(full.node_attribution[f_full]))[:7]
    want = sorted(np.array(full.node_ids)[f_full][top].tolist())
    assert sorted(np.array(capped.node_ids)[f_cap].tolist()) == want
    assert capped.settings["max_feature_nodes"] == 7


def test_export_keeps_circuit_tracer_feature_types(case, tmp_path):
    from adag.graphs.export import to_circuit_tracer
    from adag.graphs.graph import Graph

    *_, g = case
    data = to_circuit_tracer(g, slug="t")
    types = {n["adag_kind"]: n["feature_type"] for n in data["nodes"]}
    assert types == {
        "embed": "embedding",
        "feature": "cross layer transcoder",
        "error": "mlp reconstruction error",
        "logit": "logit",
    }
    assert data["metadata"]["transcoder_kind"] == g.settings["transcoders"]["kind"]
    g.save(tmp_path / "g")
    assert Graph.load(tmp_path / "g") == g


def test_circuit_tracer_adjacency_demeans_the_logit_rows(case):
    """``logit_mean_effect`` is each source's direct effect on the vocabulary mean of the logits:
    traced with every vocabulary token as a target (the tiny vocabulary has 61), the mean of the
    61 raw logit rows equals it; the circuit-tracer adjacency subtracts it from the logit rows
    and leaves the other rows alone."""
    m, _, tc, ids, g = case
    assert g.logit_mean_effect is not None and g.logit_mean_effect.shape == (g.n_nodes,)
    every = trace(
        m,
        ids,
        transcoders=tc,
        node_threshold=0.002,
        edge_threshold=0.0,
        batch_size=64,
        targets=list(range(m.d_vocab)),
    )[0]
    a = every.adjacency("raw").toarray()
    logit_rows = np.flatnonzero(every.mask("logit"))
    sources = np.flatnonzero(~every.mask("logit"))
    mean_row = a[np.ix_(logit_rows, sources)].mean(0)
    assert every.logit_mean_effect is not None
    np.testing.assert_allclose(
        every.logit_mean_effect[sources], mean_row, rtol=1e-9, atol=1e-12 * np.abs(mean_row).max()
    )
    ct = g.adjacency("circuit_tracer").toarray()
    r = g.adjacency("raw").toarray()
    lg = g.mask("logit")
    np.testing.assert_array_equal(ct[~lg], r[~lg])
    present = r[lg] != 0
    np.testing.assert_allclose(
        ct[lg][present], (r[lg] - g.logit_mean_effect[None, :])[present], rtol=1e-12
    )
    # the field survives pruning
    from adag.graphs.prune import prune

    pruned = prune(g)
    assert pruned.logit_mean_effect is not None and len(pruned.logit_mean_effect) == pruned.n_nodes


def test_neuron_graphs_have_no_logit_mean_effect():
    m = tiny_model("llama")
    ids = torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))
    g = trace(m, ids, k=2, node_threshold=0.01)[0]
    assert g.logit_mean_effect is None
    with pytest.raises(AdagError, match="no logit_mean_effect"):
        g.adjacency("circuit_tracer")


class _BosTokenizer:
    """Just enough of a tokenizer for a leading BOS: its id and a decoder."""

    bos_token_id = 5

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_bos_embedding_is_a_source_only_node():
    """As in circuit-tracer: with a leading BOS the position has no features or errors, but its
    token embedding is a node whose direct effects on later nodes are edges (measured here)."""
    m = tiny_model("llama")
    m.tokenizer = _BosTokenizer()  # type: ignore[assignment]
    raw = Raw(m, "plt", "jumprelu")
    ids = torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))
    ids[0] = _BosTokenizer.bos_token_id
    g = trace(m, ids, transcoders=raw.transcoders(), node_threshold=0.002, edge_threshold=0.0)[0]
    bos = g.node_ids.index("embed:0")
    assert not (g.node_position[~g.mask("embed") & ~g.mask("logit")] == 0).any()
    assert not (g.edge_target == bos).any()
    assert g.settings["excluded_positions"] == [0]
    sources, targets = _columns(g, n_features=20)
    want = measured_edges(m, raw, ids, g, sources, targets)
    got = _graph_block(g, sources, targets)
    col = int(np.flatnonzero(sources == bos)[0])
    assert want[:, col].abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("T_", [5, 40])
def test_position_rows_equal_the_gathered_dot(T_):
    """``PositionRows`` (the active decoder rows grouped by position) equals
    ``g[b, pos[k]] · w[k]`` computed one entry at a time."""
    gen = torch.Generator().manual_seed(0)
    n, d, B = 23, 7, 3
    pos = torch.randint(0, T_, (n,), generator=gen)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    g = torch.randn(B, T_, d, generator=gen, dtype=torch.float64)
    want = torch.stack([g[:, int(p)] @ w[k] for k, p in enumerate(pos)], dim=1)
    rows = feat.PositionRows(pos, w, T_)
    torch.testing.assert_close(rows.dot(g), want, rtol=1e-12, atol=1e-12)
    P = T_ // 2  # a prefix pass: entries at positions >= P are 0
    torch.testing.assert_close(
        rows.dot(g[:, :P]), torch.where(pos < P, want, 0.0), rtol=1e-12, atol=1e-12
    )
    empty = feat.PositionRows(pos[:0], w[:0], T_).dot(g)
    assert empty.shape == (B, 0)


@pytest.mark.parametrize("arch,kind", [("llama", "clt"), ("gemma2", "plt")])
def test_prefix_passes_give_the_same_edges(arch, kind, monkeypatch):
    """Targets traced in forwards of the prefix they need (one per position when forwards cost
    nothing) give the edges of one full-length forward."""
    from adag.graphs import trace as trace_mod

    m = tiny_model(arch)
    raw = Raw(m, kind, "jumprelu")
    ids = torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))
    opts = dict(transcoders=raw.transcoders(), node_threshold=0.002, edge_threshold=0.0)
    monkeypatch.setattr(trace_mod, "FORWARD_COST", 1e9)  # one group: the full prompt
    full = trace(m, ids, **opts)[0]
    groups = []
    real = trace_mod._prefix_groups

    def spy(chunks, prefix):
        out = real(chunks, prefix)
        groups.append([P for P, _ in out])
        return out

    monkeypatch.setattr(trace_mod, "FORWARD_COST", 0.0)  # a forward per prefix length
    monkeypatch.setattr(trace_mod, "_prefix_groups", spy)
    split = trace(m, ids, batch_size=2, **opts)[0]
    assert len(groups[0]) >= 2 and min(groups[0]) < T
    assert split.node_ids == full.node_ids
    np.testing.assert_array_equal(split.edge_source, full.edge_source)
    np.testing.assert_array_equal(split.edge_target, full.edge_target)
    np.testing.assert_allclose(split.edge_weight, full.edge_weight, rtol=1e-10, atol=1e-12)


def test_one_row_per_pass_gives_the_same_graph():
    """``max_batch_tokens`` = the prompt length: one target per attribution pass and one row per
    edge pass; the graph is the same as with every row in one pass."""
    m = tiny_model("qwen3")
    raw = Raw(m, "clt", "jumprelu")
    ids = torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))
    opts = dict(transcoders=raw.transcoders(), node_threshold=0.002, edge_threshold=0.0)
    wide = trace(m, ids, **opts)[0]
    narrow = trace(m, ids, max_batch_tokens=T, **opts)[0]
    assert narrow.node_ids == wide.node_ids and len(wide.target_ids) > 1
    for f in ("node_attribution", "output_attr", "input_attr", "edge_weight"):
        np.testing.assert_allclose(getattr(narrow, f), getattr(wide, f), rtol=1e-10, atol=1e-13)


def test_skip_mlps_puts_back_an_instance_forward():
    """``Model.skip_mlps`` zeroes the MLPs inside the block only, and restores a forward set on
    the module instance (as accelerate's device hooks do)."""
    from adag.models.sites import get_module, layer_modules

    m = tiny_model("llama")
    mlp = get_module(layer_modules(m.hf, m.spec)[0], m.spec.mlp)
    ids = torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(ids[None])
        calls = []
        original = mlp.forward

        def wrapped(*a, **k):
            calls.append(1)
            return original(*a, **k)

        mlp.forward = wrapped
        with m.skip_mlps(range(m.n_layers)):
            skipped = m(ids[None])
        assert not calls and (skipped - want).abs().max() > 1e-6
        assert mlp.forward is wrapped
        torch.testing.assert_close(m(ids[None]), want, rtol=0, atol=0)
        assert calls
        del mlp.forward


def test_reverse_mode_input_profiles_equal_forward_mode(case):
    """Long prompts take the input profiles by reverse mode (seeded at each feature's MLP input
    with r · W_enc[i]): the same numbers as the replica's forward mode, CLT, skip and every
    activation included; error nodes, constants of the replica, get zeros either way."""
    import adag.graphs.trace as tr

    m, _raw, tc, ids, _g = case
    fams = feat.replacement_families(m, tc)
    cfg = _config().updated(node_threshold=0.002)
    clean = clean_run(m, ids.tolist(), fams, cfg)
    _, kept = tr.attribute_nodes(m, clean, fams, cfg)
    fwd = tr.input_attributions(m, clean, fams, kept, 8, mode="forward")
    rev = tr.input_attributions(m, clean, fams, kept, 8, mode="reverse")
    scale = float(fwd[0].abs().max())
    assert len(kept[0]) > 0 and scale > 0
    torch.testing.assert_close(rev[0], fwd[0], rtol=1e-10, atol=1e-10 * scale)
    assert not fwd[1].any() and not rev[1].any()
