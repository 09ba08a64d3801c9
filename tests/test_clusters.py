"""``adag.cluster`` and ``Clusters`` on graphs of a tiny float64 Llama: graphs and their profile
table cluster alike; save/load; cluster profiles and supernodes against hand sums of the graphs;
behaviour correlation against scipy's pearsonr on planted attributions; one-line errors; plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adag.clusters import METHODS, Clusters, cluster
from adag.clusters.behaviour import correlate
from adag.clusters.plots import plot_similarity, plot_sizes_by_layer
from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.graphs.trace import trace
from adag.profiles import profile

K = 3


@pytest.fixture(scope="module")
def graphs() -> list[Graph]:
    from .conftest import VOCAB, tiny_model

    m = tiny_model("llama")
    gen = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (6, 7, 8, 6, 9, 7)]
    return trace(m, ids, k=K, node_threshold=0.01)


@pytest.fixture(scope="module")
def clusters(graphs) -> Clusters:
    return cluster(graphs, n_clusters=4)


def _unit(g: Graph, row: int) -> tuple[int, int, int]:
    a = float(g.node_activation[row])
    return (int(g.node_layer[row]), int(g.node_index[row]), -1 if a < 0 else 1)


def _one_line(exc: pytest.ExceptionInfo[AdagError]) -> None:
    assert "\n" not in str(exc.value)


def test_graphs_and_profile_table_cluster_alike(graphs, clusters):
    c = clusters
    assert len(c.units) == len(
        {_unit(g, r) for g in graphs for r in np.flatnonzero(g.mask("neuron"))}
    )
    assert c.names == ["C0", "C1", "C2", "C3"]
    assert sorted(set(c.labels.tolist())) == [0, 1, 2, 3]
    assert sum(c.sizes) == len(c.units)
    t = cluster(profile(graphs), n_clusters=4)
    assert t.units == c.units
    np.testing.assert_array_equal(t.labels, c.labels)
    assert t.diagnostics.keys() == c.diagnostics.keys()
    for k, v in c.diagnostics.items():
        np.testing.assert_allclose(t.diagnostics[k], v, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(t.n_prompts, c.n_prompts)
    # n_prompts counts the graphs each unit is a node of
    for u, n in zip(c.units, c.n_prompts.tolist(), strict=True):
        assert n == sum(
            any(_unit(g, r) == u for r in np.flatnonzero(g.mask("neuron"))) for g in graphs
        )
    # the assignment reads back through members and cluster_of
    for name in c.names:
        for u in c.members(name):
            assert c.cluster_of(u) == name
    assert c.cluster_of((99, 0, 1)) is None
    # a graph without neuron nodes changes nothing
    e = cluster([*graphs, _planted([])], n_clusters=4)
    assert e.units == c.units
    np.testing.assert_array_equal(e.labels, c.labels)
    assert e.settings["prompts_without_units"] == [str(len(graphs))]
    # the same seed gives the same clusters; every method runs
    np.testing.assert_array_equal(cluster(graphs, n_clusters=4).labels, c.labels)
    for method in METHODS[1:]:
        b = cluster(graphs, n_clusters=4, method=method, seed=3)
        assert b.method == method and b.units == c.units
        assert sorted(set(b.labels.tolist())) == [0, 1, 2, 3]


def test_table_with_excluded_positions_clusters_like_graphs(graphs):
    """A graph whose first position is excluded (a BOS): the table path leaves it out the same
    way the graph path does."""
    import copy

    gs = [copy.copy(g) for g in graphs]
    gs[0].settings = {**gs[0].settings, "excluded_positions": [0]}
    a = cluster(gs, n_clusters=3)
    b = cluster(profile(gs), n_clusters=3)
    assert a.units == b.units
    np.testing.assert_array_equal(a.labels, b.labels)


def test_save_load_round_trip(tmp_path, clusters):
    c = clusters
    path = c.save(tmp_path / "run")
    assert path == tmp_path / "run" / "clusters.json"
    back = Clusters.load(tmp_path / "run")
    assert back.units == c.units
    np.testing.assert_array_equal(back.labels, c.labels)
    assert (back.method, back.n_clusters, back.seed) == (c.method, c.n_clusters, c.seed)
    assert back.settings == c.settings
    assert back.diagnostics.keys() == c.diagnostics.keys()
    for k, v in c.diagnostics.items():
        assert back.diagnostics[k] == v or (np.isnan(v) and np.isnan(back.diagnostics[k]))
    np.testing.assert_array_equal(back.n_prompts, c.n_prompts)
    meta = json.loads(path.read_text())
    assert meta["names"] == c.names and meta["sizes"] == c.sizes
    assert list(meta["assignment"]) == [
        f"{u[0]}:{u[1]}:{'+' if u[2] > 0 else '-'}" for u in c.units
    ]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "run" / "clusters.parquet")
    assert table.column_names == ["unit", "layer", "neuron", "sign", "cluster", "n_prompts"]
    assert table["cluster"].to_pylist() == [c.cluster_of(u) for u in c.units]
    assert table["n_prompts"].to_pylist() == c.n_prompts.tolist()
    # saving again writes the same bytes
    before = path.read_bytes()
    c.save(tmp_path / "run")
    assert path.read_bytes() == before


def test_load_errors(tmp_path, clusters):
    with pytest.raises(AdagError, match="does not exist") as e:
        Clusters.load(tmp_path / "nowhere")
    _one_line(e)
    d = tmp_path / "c"
    clusters.save(d)
    js = d / "clusters.json"
    good = js.read_text()
    cases = [
        ("{", "not valid JSON"),
        ("[1]", "not an adag clusters file"),
        (good.replace('"version": 1', '"version": 7'), "format version 7"),
    ]
    meta = json.loads(good)
    del meta["assignment"]
    cases.append((json.dumps(meta), "lacks 'assignment'"))
    meta = json.loads(good)
    meta["assignment"] = {"1:2:x": "C0"}
    cases.append((json.dumps(meta), "malformed"))
    meta = json.loads(good)
    meta["assignment"] = dict.fromkeys(meta["assignment"], "C99")
    cases.append((json.dumps(meta), "malformed"))
    for text, msg in cases:
        js.write_text(text)
        with pytest.raises(AdagError, match=msg) as e:
            Clusters.load(d)
        _one_line(e)
    js.write_text(good)
    Clusters.load(d)
    (d / "clusters.parquet").write_bytes(b"not parquet")
    with pytest.raises(AdagError, match="is not the unit table") as e:
        Clusters.load(d)
    _one_line(e)
    (d / "clusters.parquet").unlink()
    with pytest.raises(AdagError, match="does not exist"):
        Clusters.load(d)


def test_profile_is_the_sum_of_member_profiles(graphs, clusters):
    c = clusters
    table = c.profile(graphs, prompt_ids=[f"p{i}" for i in range(len(graphs))]).to_pandas()
    assert list(table.columns) == [
        "cluster",
        "prompt_id",
        "side",
        "position",
        "target_id",
        "token",
        "value",
        "n_units",
    ]
    from_table = c.profile(profile(graphs, prompt_ids=[f"p{i}" for i in range(len(graphs))]))
    np.testing.assert_allclose(from_table.to_pandas().value, table.value, rtol=1e-12)
    checked = 0
    for gi, g in enumerate(graphs):
        rows = np.flatnonzero(g.mask("neuron"))
        for name in c.names:
            members = set(c.members(name))
            mine = [r for r in rows.tolist() if _unit(g, r) in members]
            sub = table[(table.prompt_id == f"p{gi}") & (table.cluster == name)]
            if not mine:
                assert len(sub) == 0
                continue
            act = g.node_activation[mine][:, None]
            want_in = (g.input_attr[mine] / act).sum(0)  # (T,)
            want_out = (g.output_attr[mine] / g.target_logits[None, :]).sum(0)  # (K,)
            inp = sub[sub.side == "input"].sort_values("position")
            assert inp.position.tolist() == list(range(len(g.prompt_ids)))
            assert inp.token.tolist() == g.prompt_tokens
            np.testing.assert_allclose(inp.value, want_in, rtol=1e-10, atol=1e-14)
            out = sub[sub.side == "output"]
            assert out.target_id.tolist() == g.target_ids.tolist()
            assert out.token.tolist() == g.target_tokens
            np.testing.assert_allclose(out.value, want_out, rtol=1e-10, atol=1e-14)
            assert set(sub.n_units) == {len({_unit(g, r) for r in mine})}
            checked += 1
    assert checked >= len(graphs)


def test_supernodes_and_attribution(graphs, clusters):
    from adag.graphs.export import to_circuit_tracer

    c = clusters
    attr = c.attribution(graphs)
    assert attr.shape == (len(graphs), c.n_clusters)
    for gi, g in enumerate(graphs):
        groups = c.supernodes(g)
        rows = np.flatnonzero(g.mask("neuron")).tolist()
        for name in c.names:
            want = [g.node_ids[r] for r in rows if c.cluster_of(_unit(g, r)) == name]
            got = [grp[1:] for grp in groups if grp[0] == name]
            assert got == ([want] if want else [])
            np.testing.assert_allclose(
                attr[gi, c.names.index(name)],
                sum(float(g.node_attribution[g.index_of(n)]) for n in want),
                rtol=1e-12,
            )
        # every neuron node is in exactly one supernode (every unit was clustered)
        assert sorted(n for grp in groups for n in grp[1:]) == sorted(g.node_ids[r] for r in rows)
        exported = to_circuit_tracer(g, slug=f"g{gi}", supernodes=groups)
        assert [grp[0] for grp in exported["qParams"]["supernodes"]] == [grp[0] for grp in groups]


def _planted(nodes: list[tuple[int, int, int, float]], T: int = 3, k: int = 2) -> Graph:
    """A graph of neuron nodes only, each ``(layer, position, index, attribution)`` with
    activation 1 (so its unit is ``(layer, index, +1)``) and random profiles."""
    n = len(nodes)
    arr = np.array(nodes, dtype=np.float64).reshape(n, 4)
    layer, pos, index = (arr[:, j].astype(np.int64) for j in range(3))
    attr = arr[:, 3]
    rng = np.random.default_rng(n)
    return Graph(
        node_ids=[f"neuron:{a}:{b}:{c}" for a, b, c in zip(layer, pos, index, strict=True)],
        node_kinds=["neuron"] * n,
        node_layer=np.asarray(layer, dtype=np.int64),
        node_position=np.asarray(pos, dtype=np.int64),
        node_index=np.asarray(index, dtype=np.int64),
        node_activation=np.ones(n),
        node_attribution=np.asarray(attr, dtype=np.float64),
        node_tokens=["t"] * n,
        edge_source=np.zeros(0, dtype=np.int64),
        edge_target=np.zeros(0, dtype=np.int64),
        edge_weight=np.zeros(0),
        edge_flow=np.zeros(0),
        input_attr=rng.normal(size=(n, T)),
        output_attr=rng.normal(size=(n, k)),
        target_ids=np.arange(k, dtype=np.int64),
        target_tokens=[f"x{j}" for j in range(k)],
        target_coef=np.ones(k),
        target_logits=np.full(k, 2.0),
        target_probs=np.full(k, 0.1),
        prompt_ids=np.arange(T, dtype=np.int64),
        prompt_tokens=[f"p{j}" for j in range(T)],
    )


def test_correlate_equals_pearsonr():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    n_prompts = 12
    # units (layer, index, +): A and B form cluster C0, D forms C1; unit (2, 9, +) is never clustered
    A, B, D = (0, 1, 1), (1, 4, 1), (2, 0, 1)
    c = Clusters(units=[A, B, D], labels=np.array([0, 0, 1]), method="x", n_clusters=2, seed=0)
    scores = rng.normal(size=n_prompts)
    graphs, a_att, b_att, d_att, e_att = [], [], [], [], []
    for i in range(n_prompts):
        nodes = []
        a = rng.normal() + scores[i]
        nodes += [(0, 0, 1, a / 2), (0, 2, 1, a / 2)]  # A at two positions: summed
        b = rng.normal() if i % 3 else 0.0  # B absent from every third prompt
        if i % 3:
            nodes.append((1, 1, 4, b))
        d = rng.normal()
        nodes.append((2, 1, 0, d))
        e = rng.normal() - scores[i]
        nodes.append((2, 2, 9, e))
        graphs.append(_planted(nodes))
        a_att.append(a)
        b_att.append(b)
        d_att.append(d)
        e_att.append(e)
    per_cluster, per_unit = correlate(c, graphs, scores, min_prompts=10)
    pc = per_cluster.to_pylist()
    assert [r["cluster"] for r in pc] == ["C0", "C1"]
    for row, x in zip(pc, [np.add(a_att, b_att), np.array(d_att)], strict=True):
        want = pearsonr(x, scores)
        np.testing.assert_allclose([row["r"], row["p"]], [want.statistic, want.pvalue], rtol=1e-12)
        assert row["n"] == n_prompts and row["mean_attribution"] == pytest.approx(np.mean(x))
    assert [r["present"] for r in pc] == [n_prompts, n_prompts]
    assert [r["size"] for r in pc] == [2, 1]
    # per unit: B occurs in 8 prompts (< 10) and is left out; E is reported without a cluster
    units = {r["unit"]: r for r in per_unit.to_pylist()}
    assert set(units) == {"0:1:+", "2:0:+", "2:9:+"}
    assert units["2:9:+"]["cluster"] is None and units["0:1:+"]["cluster"] == "C0"
    for name, x in [("0:1:+", a_att), ("2:0:+", d_att), ("2:9:+", e_att)]:
        want = pearsonr(x, scores)
        np.testing.assert_allclose(
            [units[name]["r"], units[name]["p"]], [want.statistic, want.pvalue], rtol=1e-12
        )
    assert per_unit["p"].to_pylist() == sorted(per_unit["p"].to_pylist())
    # B with min_prompts=8: over the prompts where it occurs, or with absent prompts as 0
    present = [i for i in range(n_prompts) if i % 3]
    _, excl = correlate(c, graphs, scores, min_prompts=8)
    row = next(r for r in excl.to_pylist() if r["unit"] == "1:4:+")
    want = pearsonr(np.array(b_att)[present], scores[present])
    assert (row["n"], row["present"]) == (8, 8)
    np.testing.assert_allclose([row["r"], row["p"]], [want.statistic, want.pvalue], rtol=1e-12)
    _, zero = correlate(c, graphs, scores, min_prompts=8, absent="zero")
    row = next(r for r in zero.to_pylist() if r["unit"] == "1:4:+")
    want = pearsonr(b_att, scores)
    assert (row["n"], row["present"]) == (n_prompts, 8)
    np.testing.assert_allclose([row["r"], row["p"]], [want.statistic, want.pvalue], rtol=1e-12)
    # a cluster with constant attribution (never present) has r = p = NaN, without a warning
    c3 = Clusters(units=[A, (5, 5, 1)], labels=np.array([0, 1]), method="x", n_clusters=2, seed=0)
    pc3 = correlate(c3, graphs, scores)[0]
    assert np.isnan(pc3["r"].to_pylist()[1]) and np.isnan(pc3["p"].to_pylist()[1])


def test_errors_are_one_line(graphs, clusters):
    cases = [
        (lambda: cluster([], n_clusters=2), "no graphs"),
        (lambda: cluster(graphs, n_clusters=10**6), "larger than the number of units"),
        (lambda: cluster(graphs, n_clusters=1), "at least 2"),
        (lambda: cluster(graphs, n_clusters=2, top_m=0), "top_m must be at least 1"),
        (lambda: cluster(graphs, n_clusters=2, method="louvain"), "unknown clustering method"),
        (lambda: cluster([_planted([])], n_clusters=2), "no neuron nodes"),
        (lambda: cluster(graphs, n_clusters=2, prompt_ids=["a"]), "1 prompt ids for 6 graphs"),
        (
            lambda: cluster(profile(graphs).drop(["activation"]), n_clusters=2),
            "lacks the columns \\['activation'\\]",
        ),
        (lambda: cluster(profile(graphs).slice(0, 0), n_clusters=2), "profile table is empty"),
        (lambda: correlate(clusters, graphs, [1.0] * 5), "5 scores for 6 graphs"),
        (lambda: correlate(clusters, graphs[:2], [1.0, 2.0]), "at least 3 prompts"),
        (lambda: correlate(clusters, graphs, [1.0] * 6), "same score"),
        (lambda: correlate(clusters, graphs, [1.0] * 5 + [np.nan]), "NaN or inf"),
        (lambda: correlate(clusters, graphs, range(6), absent="drop"), "unknown absent"),
        (lambda: clusters.members("C9"), "no cluster 'C9'"),
        (lambda: clusters.members("C01"), "no cluster 'C01'"),
    ]
    for fn, msg in cases:
        with pytest.raises(AdagError, match=msg) as e:
            fn()
        _one_line(e)


def test_plots_write_png(tmp_path, clusters):
    c = clusters
    png = b"\x89PNG\r\n\x1a\n"
    p = plot_similarity(c.similarity, c.units, c.labels, tmp_path / "sim.png")
    assert p.read_bytes()[:8] == png
    # subsampled: every cluster still shown
    q = plot_similarity(c.similarity, c.units, c.labels, tmp_path / "sub.png", max_units=10)
    assert q.read_bytes()[:8] == png
    from adag.clusters.plots import _subsample

    keep = _subsample(c.labels, 10, 0)
    assert len(keep) == 10 and set(c.labels[keep]) == set(c.labels)
    r = plot_sizes_by_layer(c, 3, tmp_path / "layers.png")
    assert r.read_bytes()[:8] == png
    with pytest.raises(AdagError, match="beyond n_layers"):
        plot_sizes_by_layer(c, 1, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(AdagError, match="one row, column and label per unit"):
        plot_similarity(c.similarity, c.units[:-1], c.labels[:-1], tmp_path / "bad.png")


def test_top_m_covering_every_neighbour_is_exact(graphs, clusters):
    """``top_m`` no smaller than any unit's neighbour count keeps every pair: same clusters."""
    wide = cluster(graphs, n_clusters=4, top_m=10**6)
    assert wide.units == clusters.units and np.array_equal(wide.labels, clusters.labels)
    assert wide.similarity is not None and clusters.similarity is not None
    assert (wide.similarity != clusters.similarity).nnz == 0


def test_cluster_stage_with_scores_writes_behaviour_and_resumes(graphs, tmp_path):
    """The stage on a run directory whose graphs carry scores: every file, the behaviour table
    equal to ``correlate``, supernodes in the viewer, and a rerun that rewrites nothing."""
    import json

    import pyarrow.parquet as pq

    from adag.clusters.behaviour import correlate
    from adag.pipeline.cluster import cluster_stage

    run = tmp_path / "run"
    scores = [0.5, 1.0, 3.0, 2.0, 0.0, 1.5]
    for i, (g, s) in enumerate(zip(graphs, scores, strict=True)):
        g2 = Graph(**{f: getattr(g, f) for f in g.__dataclass_fields__})
        g2.settings = {**g.settings, "score": s}
        g2.save(run / "graphs" / f"{i:04d}-p")
    res = cluster_stage(run, n_clusters=3)
    assert not res["reused"] and (run / "behaviour.parquet").exists()
    saved = sorted(run.glob("graphs/*.json"))
    loaded = [Graph.load(p) for p in saved]
    c = Clusters.load(run)
    want, _ = correlate(c, loaded, scores)
    got = pq.read_table(run / "behaviour.parquet")
    np.testing.assert_allclose(got.column("r").to_numpy(), want.column("r").to_numpy())
    viewer = json.loads((run / "viewer" / "0000-p.json").read_text())
    assert {s[0] for s in viewer["qParams"]["supernodes"]} <= set(c.names)
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert cluster_stage(run, n_clusters=3)["reused"]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == mtimes
    assert not cluster_stage(run, n_clusters=2)["reused"]


def test_cluster_stage_restores_supernodes_and_skips_constant_scores(graphs, tmp_path):
    """A trace rerun rewrites the viewer files without supernodes: the reused cluster stage puts
    them back. Scores that never vary have nothing to correlate: no behaviour table, no error."""
    import json

    from adag.graphs.export import write_viewer
    from adag.graphs.prune import prune
    from adag.pipeline.cluster import cluster_stage

    run = tmp_path / "run"
    for i, g in enumerate(graphs):
        g2 = Graph(**{f: getattr(g, f) for f in g.__dataclass_fields__})
        g2.settings = {**g.settings, "score": 1.0}
        g2.save(run / "graphs" / f"{i:04d}-p")
    cluster_stage(run, n_clusters=3)
    assert not (run / "behaviour.parquet").exists()
    viewer = run / "viewer" / "0000-p.json"
    with_clusters = viewer.read_text()
    write_viewer(prune(Graph.load(run / "graphs" / "0000-p")), run / "viewer", slug="0000-p")
    assert json.loads(viewer.read_text())["qParams"]["supernodes"] == []
    assert cluster_stage(run, n_clusters=3)["reused"]
    assert viewer.read_text() == with_clusters
