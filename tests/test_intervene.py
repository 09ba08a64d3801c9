"""Feature interventions (:mod:`adag.steer.intervene`) against feature graphs and against
references written from the raw transcoder weights, on float64 tiny random models with random
transcoders (built as in ``tests/test_features.py``).

- Direct effects: with every other feature frozen (``freeze_features``), zeroing a graph's feature
  ``s`` moves the pre-softcap logit ``t`` by exactly ``-A[t, s] / ratio_t``, with ``A`` the graph's
  raw adjacency (``a_s · ∂logit_t/∂a_s`` in the linearised replacement model) and ``ratio_t`` the
  softcap's frozen ratio (1 without a softcap).
- Total effects: the constrained replacement model (features free) is piecewise linear in a held
  feature, so scaling a feature by ``1 + ε`` moves every feature and logit as the graph's direct
  effects, propagated through the graph's feature nodes, predict (exact while no feature crosses
  its activation's kink).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from adag.errors import AdagError
from adag.graphs.trace import trace
from adag.models.model import Model
from adag.models.sites import Session
from adag.steer import generate_ids
from adag.steer.intervene import generate_with_features, intervene
from adag.transcoders import Transcoders

from .conftest import tiny_model
from .test_features import Raw, T

CASES = [  # (architecture, kind, activation, skip weights)
    ("llama", "plt", "jumprelu", False),
    ("llama", "clt", "relu", False),
    ("gemma2", "clt", "jumprelu", False),
    ("gpt2", "clt", "jumprelu", True),
    ("qwen3", "plt", "relu", True),
    ("olmo2", "clt", "relu", False),
]


class PreCap(Session):
    """Records the logits before the final softcap, one entry per forward pass."""

    def __init__(self) -> None:
        self.z: list[Tensor] = []

    def logits(self, z: Tensor) -> Tensor:
        self.z.append(z.detach()[0, -1].clone())
        return z


def _ids() -> Tensor:
    return torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(
    scope="module", params=CASES, ids=["-".join(c[:3]) + ("-skip" if c[3] else "") for c in CASES]
)
def case(request):
    arch, kind, activation, skip = request.param
    m = tiny_model(arch)
    raw = Raw(m, kind, activation, skip)
    tc = raw.transcoders()
    ids = _ids()
    g = trace(
        m,
        ids,
        transcoders=tc,
        node_threshold=0.0,  # every active feature is a node
        edge_threshold=0.0,
        desired_logit_prob=0.5,
        max_n_logits=3,
    )[0]
    return m, raw, tc, ids, g


def _precap_change(
    m: Model, ids: Tensor, tc: Transcoders, edits: dict, targets: list[int], **kw
) -> tuple[Tensor, Tensor]:
    """(change of the pre-softcap target logits, clean softcap ratio of each target)."""
    rec = PreCap()
    with m.session(rec):
        out = intervene(m, ids, tc, edits, targets=targets, **kw)
    z0, z1 = rec.z  # the clean pass, the intervened pass
    t = torch.tensor(targets)
    ratio = out["logits_before"][t] / z0[t]
    return z1[t] - z0[t], ratio


def _features(g, n: int, seed: int = 0) -> np.ndarray:
    rows = np.flatnonzero(g.mask("feature"))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, min(n, len(rows)), replace=False))


def test_direct_effect_equals_the_graph_edge(case):
    """Zeroing a feature with every other feature frozen moves each target logit by minus its
    edge: ``Δz_t · ratio_t = -A[t, s]`` exactly."""
    m, _, tc, ids, g = case
    A = g.adjacency("raw").toarray()
    logit_rows = np.flatnonzero(g.mask("logit"))
    targets = [int(i) for i in g.node_index[logit_rows]]
    rows = _features(g, 8)
    assert len(rows) == 8
    seen = 0.0
    for s in rows:
        dz, ratio = _precap_change(m, ids, tc, {g.node_ids[s]: 0.0}, targets, freeze_features=True)
        want = -torch.as_tensor(A[logit_rows, s])
        torch.testing.assert_close(dz * ratio, want, rtol=1e-7, atol=1e-12)
        seen = max(seen, float(want.abs().max()))
    assert seen > 1e-4


RELU = [c for c in CASES if c[2] == "relu"]  # a JumpReLU feature near its threshold can jump


@pytest.mark.parametrize(
    "case", RELU, ids=["-".join(c[:3]) + ("-skip" if c[3] else "") for c in RELU], indirect=True
)
def test_total_effect_follows_the_graph(case):
    """Features free (constrained): scaling one feature by ``1 + ε`` moves the logits by the
    graph's direct effects propagated through every feature node: with ``D[t, s] = A[t, s] /
    a_s`` (direct derivative, sources = features) and the held feature's row cleared,
    ``Δv = (I − D)⁻¹ (ε a_s e_s)``."""
    m, _, tc, ids, g = case
    A = g.adjacency("raw").toarray()
    feat = g.mask("feature")
    logit_rows = np.flatnonzero(g.mask("logit"))
    targets = [int(i) for i in g.node_index[logit_rows]]
    n = g.n_nodes
    D = np.zeros((n, n))
    D[:, feat] = A[:, feat] / g.node_activation[feat]
    eps = 1e-4
    first = np.flatnonzero(feat & (g.node_layer == 0))
    indirect, total = 0.0, 0.0
    for s in [*_features(g, 3, seed=1), first[np.argmax(g.node_activation[first])]]:
        Ds = D.copy()
        Ds[s] = 0.0  # the held feature does not respond
        rhs = np.zeros(n)
        rhs[s] = eps * g.node_activation[s]
        dv = np.linalg.solve(np.eye(n) - Ds, rhs)
        dz, ratio = _precap_change(m, ids, tc, {g.node_ids[s]: ("scale", 1 + eps)}, targets)
        want = torch.as_tensor(dv[logit_rows])
        torch.testing.assert_close(dz * ratio, want, rtol=1e-6, atol=1e-13)
        # ... and differs from the direct effect alone wherever features respond
        direct = torch.as_tensor(eps * A[logit_rows, s])
        indirect = max(indirect, float((want - direct).abs().max()))
        total = max(total, float(want.abs().max()))
    assert total > 0 and indirect > 1e-3 * total  # features did respond


@pytest.mark.parametrize("constrained,freeze", [(True, False), (True, True), (False, False)])
def test_setting_clean_values_changes_nothing(case, constrained, freeze):
    m, _, tc, ids, g = case
    with torch.no_grad():
        want = m(ids[None])[0, -1]
    rows = _features(g, 3)
    probe = intervene(m, ids, tc, {g.node_ids[r]: 1.0 for r in rows})
    clean = {f["node"]: float(f["before"][0]) for f in probe["features"]}
    layer = int(g.node_layer[rows[0]])
    edits: dict = {
        **clean,
        f"feature:{layer}:*:0": ("scale", 1.0),
        f"feature:{layer}:*:1": ("add", 0),
    }
    out = intervene(m, ids, tc, edits, constrained=constrained, freeze_features=freeze)
    assert torch.equal(out["logits_before"], want)
    torch.testing.assert_close(out["logits_after"], want, rtol=0, atol=1e-12)
    assert abs(out["kl"]) < 1e-12
    for f in out["features"][: len(rows)]:
        np.testing.assert_array_equal(f["after"], f["before"])


def test_free_and_constrained_differ(case):
    m, _, tc, ids, g = case
    first = np.flatnonzero(g.mask("feature") & (g.node_layer == 0))  # later features respond
    node = g.node_ids[first[np.argmax(g.node_activation[first])]]
    outs = {
        (c, f): intervene(m, ids, tc, {node: 0.0}, constrained=c, freeze_features=f)
        for c, f in [(True, False), (True, True), (False, False)]
    }
    after = [o["logits_after"] for o in outs.values()]
    for i in range(3):
        for j in range(i):
            assert (after[i] - after[j]).abs().max() > 1e-6
    assert [o["mode"] for o in outs.values()] == ["constrained", "frozen", "free"]


class ZeroLayerRef(Session):
    """The free-mode definition from the raw weights: the real model with ``a_s @ dec[s→t]``
    subtracted from the MLP output of every layer ``t`` that layer ``s``'s features write to,
    ``a_s`` encoded from the live MLP input of ``s``."""

    def __init__(self, raw: Raw, source: int) -> None:
        self.raw, self.source = raw, source
        self.a: Tensor | None = None

    def site(self, name: str, x: Tensor) -> Tensor:
        s, raw = self.source, self.raw
        if name == f"blocks.{s}.mlp.hook_in":
            self.a = raw.act(s, x @ raw.W_enc[s].T + raw.b_enc[s])
        for t in range(raw.L):
            if name == f"blocks.{t}.hook_mlp_out" and (s, t) in raw.dec:
                assert self.a is not None
                return x - self.a @ raw.dec[(s, t)]
        return x


@pytest.mark.parametrize(
    "arch,kind,activation", [("llama", "clt", "relu"), ("gpt2", "plt", "topk")]
)
def test_free_zeroing_a_layer_removes_its_decoded_features(arch, kind, activation):
    m = tiny_model(arch)
    raw = Raw(m, kind, activation, skip=True)
    tc, ids = raw.transcoders(), _ids()
    source = 0
    edits = {f"feature:{source}:*:{i}": 0.0 for i in range(tc.d_features)}
    out = intervene(m, ids, tc, edits, constrained=False)
    with torch.no_grad(), m.session(ZeroLayerRef(raw, source)):
        want = m(ids[None])[0, -1]
    torch.testing.assert_close(out["logits_after"], want, rtol=1e-12, atol=1e-12)
    assert (out["logits_after"] - out["logits_before"]).abs().max() > 1e-4


def test_report_layout():
    m = tiny_model("llama")
    raw = Raw(m, "plt", "relu")
    tc, ids = raw.transcoders(), _ids()
    out = intervene(m, ids, tc, {"feature:1:*:3": ("scale", 2.0), "feature:1:4:3": 0.0}, k=4)
    assert out["ids"] == ids.tolist()
    assert len(out["top_before"]) == len(out["top_after"]) == 4
    assert out["target_ids"] == [d["id"] for d in out["top_before"]]
    assert set(out["top_before"][0]) == {"id", "token", "prob", "logit"}
    f_all, f_one = out["features"]
    assert f_all["before"].shape == (T,) and f_one["before"].shape == (1,)
    # applied in order: doubled everywhere, then position 4 set to 0
    want = 2.0 * f_all["before"]
    want[4] = 0.0
    np.testing.assert_allclose(f_all["after"], want, rtol=0, atol=1e-12)  # live, not clean
    np.testing.assert_allclose(
        out["target_dlogit"],
        [float(out["logits_after"][t] - out["logits_before"][t]) for t in out["target_ids"]],
    )
    assert out["target_dprob"].shape == (4,)


@pytest.mark.parametrize("node", ["feature:1:*:5", "feature:1:2:5"])
def test_generation_holds_the_features(node):
    """Each generated token is the argmax of the free intervention on the sequence so far; with
    ``*`` the generated positions are intervened on too."""
    m = tiny_model("llama")
    raw = Raw(m, "clt", "relu")
    tc, ids = raw.transcoders(), _ids()
    edits = {node: 40.0}
    got = generate_with_features(m, ids, tc, edits, max_new_tokens=5)
    seq = ids.tolist()
    for _ in range(5):
        seq.append(int(intervene(m, seq, tc, edits, constrained=False)["logits_after"].argmax()))
    assert got == seq[T:]
    if "*" in node:  # (one prompt position need not move the last one's argmax)
        assert got != generate_ids(m, ids, max_new_tokens=5)
    assert generate_with_features(m, ids, tc, {node: ("scale", 1.0)}, max_new_tokens=5) == (
        generate_ids(m, ids, max_new_tokens=5)
    )
    a = generate_with_features(m, ids, tc, edits, max_new_tokens=5, temperature=1.0, seed=3)
    assert a == generate_with_features(m, ids, tc, edits, max_new_tokens=5, temperature=1.0, seed=3)


def test_star_reaches_generated_positions():
    m = tiny_model("llama")
    raw = Raw(m, "plt", "relu")
    tc, ids = raw.transcoders(), _ids()
    star = generate_with_features(m, ids, tc, {"feature:1:*:5": 40.0}, max_new_tokens=4)
    prompt_only = {f"feature:1:{p}:5": 40.0 for p in range(T)}
    fixed = generate_with_features(m, ids, tc, prompt_only, max_new_tokens=4)
    assert star[0] == fixed[0]  # the first step sees the prompt only
    assert star != fixed


def _plt_layer1(m: Model) -> Transcoders:
    tc = Raw(m, "plt", "relu").transcoders()
    return Transcoders(
        kind="plt",
        layers=[1],
        W_enc=tc.W_enc[1:2],
        b_enc=tc.b_enc[1:2],
        W_dec=tc.W_dec[1:2],
        b_dec=tc.b_dec[1:2],
        activation="relu",
    )


@pytest.mark.parametrize(
    "edits,match",
    [
        ({}, "no interventions"),
        ({"neuron:1:0:3": 0.0}, "only transcoder features"),
        ({"feature:1:0": 0.0}, "feature:LAYER:POS:INDEX"),
        ({"feature:7:0:3": 0.0}, "layer 7 is out of range"),
        ({"feature:0:0:3": 0.0}, "have no layer 0"),
        ({"feature:1:0:24": 0.0}, "feature 24 is out of range"),
        ({"feature:1:9:3": 0.0}, "position 9 is past"),
        ({"feature:1:0:3": ("mul", 2.0)}, "is not \\(op, number\\)"),
        ({"feature:1:0:3": ("scale",)}, "is not \\(op, number\\)"),
        ({"feature:1:0:3": float("nan")}, "finite number"),
        ({"feature:1:0:3": "1"}, "finite number"),
    ],
)
def test_bad_interventions_are_one_line_errors(edits, match):
    m = tiny_model("llama")
    tc, ids = _plt_layer1(m), _ids()
    for call in (
        lambda: intervene(m, ids, tc, edits),
        lambda: generate_with_features(m, ids, tc, edits, max_new_tokens=1),
    ):
        with pytest.raises(AdagError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_bad_options_are_one_line_errors():
    m = tiny_model("llama")
    tc, ids = _plt_layer1(m), _ids()
    edits = {"feature:1:0:3": 0.0}
    for call, match in [
        (lambda: intervene(m, ids, tc, edits, constrained=False, freeze_features=True), "needs"),
        (lambda: intervene(m, ids, tc, edits, k=0), "k must be"),
        (lambda: intervene(m, ids, tc, edits, targets=[99]), "outside the vocabulary"),
        (lambda: intervene(m, [ids, ids], tc, edits), "one prompt"),
        (lambda: intervene(m, ids, tc.to(dtype=torch.float32), edits), "float32"),
        (lambda: generate_with_features(m, ids, tc, edits, temperature=-1), "temperature"),
    ]:
        with pytest.raises(AdagError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_partial_coverage_keeps_other_mlps_at_their_clean_output():
    """A layer without transcoders: constrained, its MLP output is the clean one (its error)."""
    m = tiny_model("llama")
    tc, ids = _plt_layer1(m), _ids()
    out = intervene(m, ids, tc, {"feature:1:3:3": ("scale", 1.0)})
    torch.testing.assert_close(out["logits_after"], out["logits_before"], rtol=0, atol=1e-12)
    out = intervene(m, ids, tc, {"feature:1:*:3": 5.0}, freeze_features=True)
    assert out["kl"] > 0


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_free_with_frozen_attention_is_the_free_run_with_clean_patterns(arch):
    """``freeze_attention`` in free mode equals the free intervention run with every attention
    pattern patched to its clean value (circuit-tracer's unconstrained default), and differs from
    the free run with live attention."""
    from adag.models.sites import Patch
    from adag.steer.intervene import FeatureSplice, parse_interventions

    m = tiny_model(arch)
    raw = Raw(m, "plt", "relu")
    tc, ids = raw.transcoders(), _ids()
    edits = {f"feature:0:*:{i}": 0.0 for i in range(tc.d_features)}
    frozen = intervene(m, ids, tc, edits, constrained=False, freeze_attention=True)
    live = intervene(m, ids, tc, edits, constrained=False)
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(m.n_layers)]
    _, clean = m.run_with_cache(ids[None], patterns)
    with (
        torch.no_grad(),
        m.sites(patches=[Patch(p, clean[p]) for p in patterns]),
        m.session(FeatureSplice(tc, parse_interventions(m, tc, edits), "free")),
    ):
        want = m(ids[None])[0, -1]
    torch.testing.assert_close(frozen["logits_after"], want, rtol=1e-12, atol=1e-12)
    assert (frozen["logits_after"] - live["logits_after"]).abs().max() > 1e-6
