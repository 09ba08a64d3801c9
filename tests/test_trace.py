"""Neuron attribution graphs against their definitions, on tiny random float64 models of every
architecture: edge weights and profiles = finite differences of the patch-built frozen reference
(tests/reference.py); completeness with the bias terms; batching changes nothing; the batched,
closed-form-seeded edges = one backward pass per target with per-layer MLP rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.graphs.trace import trace
from adag.models.linear import linearize
from adag.models.model import Model
from adag.models.sites import Patch

from .reference import reference_logits, reference_patches

EPS = 1e-3


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(1))


def _graph(m: Model, ids: torch.Tensor, **kw) -> Graph:
    kw = {"k": 3, "node_threshold": 0.01, "edge_threshold": 0.0, "batch_size": 16, **kw}
    return trace(m, ids, **kw)[0]


def _neuron_cols(g: Graph, rows: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    return (
        g.node_layer[rows].tolist(),
        g.node_position[rows].tolist(),
        g.node_index[rows].tolist(),
    )


def _fd_target_change(
    m: Model,
    ids: torch.Tensor,
    rules: list[str],
    perturb: list[Patch],
    rows: int,
    read: tuple[str, int, int] | int,
) -> torch.Tensor:
    """Per-row change of a target (a neuron ``(site, pos, idx)`` or a logit id) in the frozen
    reference when each row's perturbation patch is applied, divided by ``EPS``."""
    tokens = ids[None]
    patches, reads, clean = reference_patches(m, tokens, rules)
    batch = tokens.expand(rows, -1)
    _, c1 = m.run_with_cache(batch, reads, patches=[*patches, *perturb])
    _, c0 = m.run_with_cache(tokens, reads, patches=patches)
    if isinstance(read, int):
        new, old = reference_logits(m, c1, clean, read), reference_logits(m, c0, clean, read)
    else:
        site, p, i = read
        new, old = c1[site][:, p, i], c0[site][:, p, i]
    return (new - old) / EPS


def test_neuron_edges_equal_finite_differences(tiny: Model, ids):
    """Every sampled neuron→neuron edge weight = the change of the target's activation when the
    source activation moves, in the linearised model with the MLPs strictly between frozen."""
    g = _graph(tiny, ids, node_threshold=0.0)
    gen = np.random.default_rng(0)
    neuron = g.mask("neuron")
    e_ok = neuron[g.edge_source] & neuron[g.edge_target]
    assert e_ok.sum() >= 100
    pick = gen.choice(np.flatnonzero(e_ok), size=100, replace=False)
    src, tgt = g.edge_source[pick], g.edge_target[pick]
    checked = 0
    for (ls, lt), _ in np.ndenumerate(np.zeros((tiny.n_layers, tiny.n_layers))):
        sel = (g.node_layer[src] == ls) & (g.node_layer[tgt] == lt)
        for t in np.unique(tgt[sel]):
            es = pick[sel & (tgt == t)]
            _, s_pos, s_idx = _neuron_cols(g, g.edge_source[es])
            _, tp, ti = _neuron_cols(g, np.array([t]))
            rules = ["stop"] * tiny.n_layers
            rules[lt] = "relp"
            perturb = [
                Patch(
                    f"blocks.{ls}.mlp.hook_post",
                    EPS,
                    op="add",
                    batch=list(range(len(es))),
                    pos=s_pos,
                    index=s_idx,
                )
            ]
            d = _fd_target_change(
                tiny, ids, rules, perturb, len(es), (f"blocks.{lt}.mlp.hook_post", tp[0], ti[0])
            )
            a_s = torch.as_tensor(g.node_activation[g.edge_source[es]])
            want = d * a_s / float(g.node_activation[t])
            torch.testing.assert_close(
                torch.as_tensor(g.edge_weight[es]), want, rtol=1e-7, atol=1e-10
            )
            checked += len(es)
    assert checked == 100


def test_embedding_and_logit_edges_equal_finite_differences(tiny: Model, ids):
    g = _graph(tiny, ids)
    tokens = ids[None]
    _, c = tiny.run_with_cache(tokens, ["blocks.0.hook_resid_pre"])
    emb = c["blocks.0.hook_resid_pre"][0]
    ed = g.edge_dict()
    # embedding -> neuron: move e_P along itself
    neurons = np.flatnonzero(g.mask("neuron"))
    for t in neurons[:: max(1, len(neurons) // 6)]:
        lt, tp, ti = (int(x[0]) for x in _neuron_cols(g, np.array([t])))
        rules = ["stop"] * tiny.n_layers
        rules[lt] = "relp"
        P = list(range(tp + 1))
        perturb = [Patch("blocks.0.hook_resid_pre", EPS * emb[P], op="add", batch=P, pos=P)]
        d = _fd_target_change(
            tiny, ids, rules, perturb, len(P), (f"blocks.{lt}.mlp.hook_post", tp, ti)
        )
        want = d / float(g.node_activation[t])
        got = torch.tensor(
            [ed.get((f"embed:{p}", g.node_ids[t]), 0.0) for p in P], dtype=torch.float64
        )
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    # neuron -> logit (all later MLPs frozen) and embedding -> logit
    for j, tok in enumerate(g.target_ids.tolist()):
        logit = float(g.target_logits[j])
        rows = neurons[:40]
        for layer in sorted(set(g.node_layer[rows].tolist())):
            r = rows[g.node_layer[rows] == layer]
            _, sp, si = _neuron_cols(g, r)
            perturb = [
                Patch(
                    f"blocks.{layer}.mlp.hook_post",
                    EPS,
                    op="add",
                    batch=list(range(len(r))),
                    pos=sp,
                    index=si,
                )
            ]
            d = _fd_target_change(tiny, ids, ["stop"] * tiny.n_layers, perturb, len(r), tok)
            want = d * torch.as_tensor(g.node_activation[r]) / logit
            got = torch.tensor(
                [ed.get((g.node_ids[i], f"logit:{tok}"), 0.0) for i in r], dtype=torch.float64
            )
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
        P = list(range(len(ids)))
        perturb = [Patch("blocks.0.hook_resid_pre", EPS * emb[P], op="add", batch=P, pos=P)]
        d = _fd_target_change(tiny, ids, ["stop"] * tiny.n_layers, perturb, len(P), tok)
        got = torch.tensor(
            [ed.get((f"embed:{p}", f"logit:{tok}"), 0.0) for p in P], dtype=torch.float64
        )
        torch.testing.assert_close(got, d / logit, rtol=1e-7, atol=1e-10)


def _bias_constant(m: Model, ids: torch.Tensor, mlp, target) -> float:
    """Σ_b b · ∂target/∂b over every bias parameter, under the linearisation ``mlp``: the part of
    a linearised value that no embedding or neuron carries."""
    params = [p for n, p in m.hf.named_parameters() if n.endswith("bias")]
    if not params:
        return 0.0
    for p in params:
        p.requires_grad_(True)
    try:
        with (
            linearize(m, mlp=mlp),
            m.sites(read=[f"blocks.{i}.mlp.hook_post" for i in range(m.n_layers)]) as run,
        ):
            logits = m(ids[None])
            value = target(logits, run)
            grads = torch.autograd.grad(value, params, allow_unused=True)
    finally:
        for p in params:
            p.requires_grad_(False)
    return float(sum((p * gr).sum() for p, gr in zip(params, grads, strict=True) if gr is not None))


def test_completeness(tiny: Model, ids):
    """With every node and edge kept: Σ embedding RelP + bias terms = m; for every logit and
    for sampled neurons, Σ incoming direct contributions + bias terms = the node's value."""
    g = _graph(tiny, ids, node_threshold=0.0)
    tid = g.target_ids.tolist()

    def metric(logits, run):
        return sum(float(c) * logits[0, -1, t] for c, t in zip(g.target_coef, tid, strict=True))

    const = _bias_constant(tiny, ids, "relp", metric)
    emb = g.mask("embed")
    assert g.metric == pytest.approx(g.node_attribution[emb].sum() + const, rel=1e-8, abs=1e-10)
    value = g.node_activation
    incoming = np.zeros(g.n_nodes)
    np.add.at(incoming, g.edge_target, g.edge_weight * value[g.edge_target])
    for j, t in enumerate(tid):
        row = g.index_of(f"logit:{t}")
        const = _bias_constant(tiny, ids, "stop", lambda lg, run, t=t: lg[0, -1, t])
        assert incoming[row] + const == pytest.approx(g.target_logits[j], rel=1e-8, abs=1e-10)
    neurons = np.flatnonzero(g.mask("neuron") & (g.node_layer > 0))
    for row in neurons[:: max(1, len(neurons) // 5)]:
        layer, p, i = int(g.node_layer[row]), int(g.node_position[row]), int(g.node_index[row])
        rules = ["stop"] * tiny.n_layers
        rules[layer] = "relp"
        const = _bias_constant(
            tiny,
            ids,
            rules,
            lambda lg, run, n=f"blocks.{layer}.mlp.hook_post", p=p, i=i: run.value(n)[0, p, i],
        )
        assert incoming[row] + const == pytest.approx(value[row], rel=1e-8, abs=1e-10)


def test_profiles_equal_finite_differences(tiny: Model, ids):
    g = _graph(tiny, ids)
    tokens = ids[None]
    _, c = tiny.run_with_cache(tokens, ["blocks.0.hook_resid_pre"])
    emb = c["blocks.0.hook_resid_pre"][0]
    T = len(ids)
    relp = ["relp"] * tiny.n_layers
    neurons = np.flatnonzero(g.mask("neuron"))
    for row in neurons[:: max(1, len(neurons) // 5)]:
        layer, p, i = (int(x[0]) for x in _neuron_cols(g, np.array([row])))
        perturb = [
            Patch(
                "blocks.0.hook_resid_pre",
                EPS * emb,
                op="add",
                batch=list(range(T)),
                pos=list(range(T)),
            )
        ]
        d = _fd_target_change(tiny, ids, relp, perturb, T, (f"blocks.{layer}.mlp.hook_post", p, i))
        torch.testing.assert_close(torch.as_tensor(g.input_attr[row]), d, rtol=1e-7, atol=1e-10)
        if not any(n.endswith("bias") for n, _ in tiny.hf.named_parameters()):
            # no bias terms: the input profile sums to exactly 1
            assert g.input_attr[row].sum() / g.node_activation[row] == pytest.approx(1, rel=1e-8)
        a = float(g.node_activation[row])
        for j, t in enumerate(g.target_ids.tolist()):
            perturb = [Patch(f"blocks.{layer}.mlp.hook_post", EPS, op="add", pos=p, index=i)]
            d = _fd_target_change(tiny, ids, relp, perturb, 1, t)
            assert g.output_attr[row, j] == pytest.approx(float(d[0]) * a, rel=1e-7, abs=1e-10)
    # RelP = Σ_j c_j · output attribution
    np.testing.assert_allclose(
        g.output_attr[neurons] @ g.target_coef, g.node_attribution[neurons], rtol=1e-12
    )


def test_batching_and_naive_reference_agree(tiny: Model, ids, monkeypatch):
    """batch_size 1 (one forward per prefix length: forwards made free) and 7 give the same
    graph; edges equal one backward per target node with the target's MLP under relp and every
    other MLP stopped (no closed-form seeds)."""
    from adag.graphs import trace as trace_mod

    g7 = _graph(tiny, ids, batch_size=7)
    monkeypatch.setattr(trace_mod, "FORWARD_COST", 0.0)
    g1 = _graph(tiny, ids, batch_size=1)
    assert g1.node_ids == g7.node_ids
    np.testing.assert_array_equal(g1.edge_source, g7.edge_source)
    np.testing.assert_array_equal(g1.edge_target, g7.edge_target)
    for f in ("edge_weight", "edge_flow", "input_attr", "output_attr", "node_attribution"):
        np.testing.assert_allclose(getattr(g1, f), getattr(g7, f), rtol=1e-10, atol=1e-13)
    ed = g7.edge_dict()
    posts = [f"blocks.{i}.mlp.hook_post" for i in range(tiny.n_layers)]
    for row in np.flatnonzero(g7.mask("neuron")):
        layer, p, i = (int(x[0]) for x in _neuron_cols(g7, np.array([row])))
        if layer == 0:
            continue
        rules = ["stop"] * tiny.n_layers
        rules[layer] = "relp"
        with linearize(tiny, mlp=rules), tiny.sites(read=[posts[layer]], grad=posts[:layer]) as run:
            tiny(ids[None])
            grads = run.grads(run.value(posts[layer])[0, p, i])
        for s in np.flatnonzero(g7.mask("neuron") & (g7.node_layer < layer)):
            ls, ps, is_ = (int(x[0]) for x in _neuron_cols(g7, np.array([s])))
            want = (
                float(grads[posts[ls]][0, ps, is_])
                * g7.node_activation[s]
                / g7.node_activation[row]
            )
            got = ed.get((g7.node_ids[s], g7.node_ids[row]), 0.0)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_thresholds_flows_and_layout(tiny: Model, ids):
    g = _graph(tiny, ids, node_threshold=0.05, edge_threshold=0.02)
    thr = 0.05 * abs(g.metric)
    neuron = g.mask("neuron")
    assert (np.abs(g.node_attribution[neuron]) >= thr).all()
    assert (np.abs(g.edge_weight) >= 0.02).all()
    np.testing.assert_allclose(
        g.edge_flow, g.edge_weight * g.node_attribution[g.edge_target] / g.metric, rtol=1e-12
    )
    # sources strictly before targets, causal positions, rows ordered embeds, neurons, logits
    assert (g.node_layer[g.edge_source] < g.node_layer[g.edge_target]).all()
    assert (g.node_position[g.edge_source] <= g.node_position[g.edge_target]).all()
    order = {"embed": 0, "neuron": 1, "logit": 2}
    assert [order[k] for k in g.node_kinds] == sorted(order[k] for k in g.node_kinds)
    # the logits are the top-3 and the metric is their sum
    logits = tiny(ids[None])[0, -1]
    assert g.target_ids.tolist() == logits.topk(3).indices.tolist()
    assert g.metric == pytest.approx(float(logits.topk(3).values.sum()), rel=1e-12)
    # a logit difference
    gd = _graph(tiny, ids, targets={5: 1.0, 9: -1.0})
    assert gd.metric == pytest.approx(float(logits[5] - logits[9]), rel=1e-12)
    assert gd.node_ids[-2:] == ["logit:5", "logit:9"]


def test_save_load_round_trip(tiny: Model, ids, tmp_path):
    g = _graph(tiny, ids, node_threshold=0.05)
    path = g.save(tmp_path / "graphs" / "p.0")
    assert path.name == "p.0.json" and (tmp_path / "graphs" / "p.0.safetensors").exists()
    assert Graph.load(tmp_path / "graphs" / "p.0") == g
    assert Graph.load(path) == g
    # byte-identical saves (a resumed run must equal an uninterrupted one file for file)
    blobs = {
        g.save(tmp_path / f"again{i}").with_suffix(".safetensors").read_bytes() for i in range(8)
    }
    assert len(blobs) == 1


def test_bad_input(tiny: Model, ids):
    with pytest.raises(AdagError, match="thresholds must be >= 0"):
        trace(tiny, ids, node_threshold=-1)
    with pytest.raises(AdagError, match="outside the vocabulary"):
        trace(tiny, ids, targets=[10_000])
    with pytest.raises(AdagError, match="no prompts"):
        trace(tiny, [])
    with pytest.raises(AdagError, match="longer than the model's context"):
        trace(tiny, torch.zeros(100, dtype=torch.long))
    with pytest.raises(AdagError, match="no tokenizer"):
        trace(tiny, "hello")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_trace_to_float32_graphs(dtype, ids, tmp_path):
    from .conftest import tiny_model

    m = tiny_model("llama", dtype=dtype)
    g = trace(m, ids, k=2, node_threshold=0.02)[0]
    assert g.node_activation.dtype == np.float32 and g.edge_weight.dtype == np.float32
    assert g.settings["dtype"] == str(dtype).removeprefix("torch.")
    assert g.n_edges > 0 and np.isfinite(g.edge_weight).all()
    assert Graph.load(g.save(tmp_path / "g")) == g


def test_trace_config_is_the_one_list_of_settings(tiny: Model, ids):
    """``trace(model, p, config)`` equals ``trace(model, p, **fields)``; bad fields and values are
    one-line errors naming them; the content fields are what settings record."""
    from adag.graphs.config import TraceConfig

    cfg = TraceConfig(k=2, node_threshold=0.05, edge_threshold=0.02, batch_size=5)
    a = trace(tiny, ids, cfg)[0]
    b = trace(tiny, ids, k=2, node_threshold=0.05, edge_threshold=0.02, batch_size=5)[0]
    assert a == b
    assert {k: a.settings[k] for k in cfg.content(tiny)} == cfg.content(tiny)
    assert trace(tiny, ids, cfg, batch_size=3)[0].settings["batch_size"] == 3
    with pytest.raises(AdagError, match="unknown trace option"):
        trace(tiny, ids, node_treshold=0.1)
    for bad, msg in [
        ({"k": 0}, "k must be at least 1"),
        ({"edge_threshold": float("nan")}, "thresholds must be >= 0"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"max_batch_tokens": 0}, "max_batch_tokens must be at least 1"),
    ]:
        with pytest.raises(AdagError, match=msg):
            TraceConfig(**bad)


def test_refuses_runs_that_would_say_nothing(tiny: Model, ids, tmp_path):
    """k beyond the vocabulary, a foil equal to the target and an over-long prompt among several
    are one-line errors before any work, naming the prompt."""
    from typer.testing import CliRunner

    from adag.cli import app

    with pytest.raises(AdagError, match=r"k=62 is more than the 61 tokens"):
        trace(tiny, ids, k=62)
    long = torch.zeros(100, dtype=torch.long)
    with pytest.raises(AdagError, match=r"^prompt 2: prompt is 100 tokens, longer than"):
        trace(tiny, [ids, long])
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app, ["trace", "m", "p", "--target", " Paris", "--foil", " Paris", "--out", str(out)]
    )
    assert r.exit_code == 2 and "is the --target itself" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_seed_is_joined_with_one_space():
    from adag.tasks.prompts import join_seed

    assert join_seed("Q?", "Answer:") == "Q? Answer:"
    assert join_seed("Q? ", "Answer:") == "Q? Answer:"
    assert join_seed("Q?", " Answer:") == "Q? Answer:"
    assert join_seed("Q?\n", "A:") == "Q?\nA:"
    assert join_seed("Q?", None) == join_seed("Q?", "") == "Q?"


def test_one_target_is_a_target_not_its_characters(tiny: Model, ids):
    from adag.graphs.config import TraceConfig

    assert TraceConfig(targets=" Paris").targets == [" Paris"]
    assert trace(tiny, ids, targets=7)[0] == trace(tiny, ids, targets=[7])[0]
    with pytest.raises(AdagError, match="targets must be token strings or ids"):
        TraceConfig(targets={7}.__iter__())  # type: ignore[arg-type]


def test_reverse_mode_input_profiles_equal_forward_mode(tiny: Model, ids, monkeypatch):
    """Long prompts take the input profiles by reverse mode (one backward row per kept node
    instead of T + 1 forward rows per position): the same numbers, on every architecture; and
    ``mode="auto"`` takes reverse mode exactly when it is cheaper."""
    import adag.graphs.trace as tr
    from adag.graphs.config import TraceConfig
    from adag.graphs.neurons import MlpNeurons

    fams = [MlpNeurons()]
    cfg = TraceConfig(k=3, node_threshold=0.01)
    clean = tr.clean_run(tiny, ids.tolist(), fams, cfg)
    _, kept = tr.attribute_nodes(tiny, clean, fams, cfg)
    assert len(kept[0]) > 3
    fwd = tr.input_attributions(tiny, clean, fams, kept, 4, mode="forward")[0]
    rev = tr.input_attributions(tiny, clean, fams, kept, 4, mode="reverse")[0]
    assert torch.allclose(rev, fwd, rtol=1e-10, atol=1e-10 * float(fwd.abs().max()))
    used = []
    real = tr._input_attributions_reverse
    monkeypatch.setattr(
        tr, "_input_attributions_reverse", lambda *a, **k: used.append(1) or real(*a, **k)
    )
    tr.input_attributions(tiny, clean, fams, kept, 4)  # many nodes, 9 tokens: forward
    assert not used
    few = [
        tr.Nodes(
            *(getattr(kept[0], f)[:2] for f in ("layer", "pos", "idx", "act", "attr", "out_attr"))
        )
    ]
    assert tr.REVERSE_COST * 2 < clean.T + 1
    auto = tr.input_attributions(tiny, clean, fams, few, 4)[0]
    assert used and torch.allclose(auto, fwd[:2], rtol=1e-10, atol=1e-10 * float(fwd.abs().max()))
