"""``adag trace MODEL PROMPT --transcoders DIR``: transcoder feature graphs through the same
command and run directory as neuron graphs (a tiny random Llama with SmolLM2's tokenizer and
random transcoders saved in our format): feature and error nodes, resume keyed by the
transcoders' weights, and one-line errors for transcoders that do not fit the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from adag.cli import app
from adag.graphs.graph import Graph
from adag.transcoders import Transcoders, save_transcoders

runner = CliRunner()


def random_plt(d_model: int, n_layers: int, seed: int, d_features: int = 24) -> Transcoders:
    g = torch.Generator().manual_seed(seed)
    return Transcoders(
        kind="plt",
        layers=list(range(n_layers)),
        W_enc=[torch.randn(d_features, d_model, generator=g) for _ in range(n_layers)],
        b_enc=[torch.zeros(d_features) for _ in range(n_layers)],
        W_dec=[torch.randn(d_features, d_model, generator=g) * 0.1 for _ in range(n_layers)],
        b_dec=[torch.zeros(d_model) for _ in range(n_layers)],
        activation="relu",
    )


def test_trace_with_transcoders(tiny_dir: Path, tmp_path: Path):
    tc_dir = save_transcoders(random_plt(32, 2, 0), tmp_path / "tc")
    out = tmp_path / "run"
    args = ["trace", str(tiny_dir), "The capital of France is", "--out", str(out)]
    args += ["--transcoders", str(tc_dir), "--node-threshold", "0.001", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads(r.stdout)
    assert res["traced"] and not res["reused"]
    g = Graph.load(res["graphs"][0])
    kinds = set(g.node_kinds)
    assert {"feature", "error", "logit", "embed"} <= kinds and "neuron" not in kinds
    assert g.settings["transcoders_fingerprint"] == random_plt(32, 2, 0).fingerprint()
    assert g.settings["desired_logit_prob"] == 0.95
    viewer = json.loads(next((out / "viewer").glob("*.json")).read_text())
    types = {n["feature_type"] for n in viewer["nodes"]}
    assert "mlp reconstruction error" in types

    r = runner.invoke(app, args)  # same weights: reused
    assert json.loads(r.stdout)["reused"]
    tc2 = save_transcoders(random_plt(32, 2, 1), tmp_path / "tc2")
    r = runner.invoke(app, [*args[:-4], str(tc2), *args[-3:]])
    assert r.exit_code == 0 and json.loads(r.stdout)["traced"]  # other weights: traced again


def test_transcoders_that_do_not_fit(tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    base = ["trace", str(tiny_dir), "The capital of France is", "--out", str(out)]
    cases = {
        "d_model": save_transcoders(random_plt(16, 2, 0), tmp_path / "wide"),
        "miss": save_transcoders(random_plt(32, 1, 0), tmp_path / "short"),
    }
    for needle, d in cases.items():
        r = runner.invoke(app, [*base, "--transcoders", str(d)])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
    r = runner.invoke(app, [*base, "--transcoders", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "not a directory" in r.stderr
    assert not out.exists()


def test_intervene_cli(tiny_dir: Path, tmp_path: Path):
    tc_dir = save_transcoders(random_plt(32, 2, 0), tmp_path / "tc")
    base = ["intervene", str(tiny_dir), "The capital of France is", "--transcoders", str(tc_dir)]
    outs = {}
    for mode in ("constrained", "frozen", "free"):
        r = runner.invoke(app, [*base, "--edit", "feature:0:*:3=0", "--mode", mode, "--json"])
        assert r.exit_code == 0, (r.output, r.exception)
        outs[mode] = json.loads(r.stdout)
        assert outs[mode]["mode"] == mode and len(outs[mode]["top_after"]) == 5
    # scaling by 1 changes nothing
    r = runner.invoke(app, [*base, "--edit", "feature:1:2:5*1", "--json", "--generate", "2"])
    res = json.loads(r.stdout)
    assert res["kl"] < 1e-9 and isinstance(res["generated"], str)
    for bad, needle in [
        ("feature:0:*:3", "bad intervention"),
        ("feature:0:*:999=0", "out of range"),
        ("neuron:0:1:2=0", "only transcoder features"),
    ]:
        r = runner.invoke(app, [*base, "--edit", bad])
        assert r.exit_code == 2 and needle in r.stderr, (bad, r.output)
    r = runner.invoke(app, [*base, "--edit", "feature:0:*:3=0", "--mode", "loose"])
    assert r.exit_code == 2 and "unknown --mode" in r.stderr


def test_train_transcoders_cli(tiny_dir: Path, tmp_path: Path):
    text = tmp_path / "text.txt"
    text.write_text(
        "\n".join(f"The capital of country number {i} is a city with a river." for i in range(400)),
        encoding="utf-8",
    )
    out = tmp_path / "tc"
    args = ["train-transcoders", str(tiny_dir), "--out", str(out), "--text", str(text)]
    args += ["--features", "16", "--tokens", "2048", "--batch-tokens", "128"]
    args += ["--buffer-tokens", "4096", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    metrics = json.loads(r.stdout)
    assert [m["layer"] for m in metrics["layers"]] == [0, 1]
    assert all(m["fvu"] < m["fvu_init"] for m in metrics["layers"])
    from adag.transcoders import load_transcoders

    tc = load_transcoders(out)
    assert tc.kind == "plt" and tc.d_features == 16 and tc.layers == [0, 1]
    # and the trained set traces
    r = runner.invoke(
        app,
        [
            *("trace", str(tiny_dir), "The capital of France is"),
            *("--out", str(tmp_path / "run"), "--transcoders", str(out), "--json"),
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    for bad, needle in [
        (["--self", "--text", str(text)], "one of them"),
        (["--kind", "sae", "--self"], "unknown --kind"),
        (["--text", str(tmp_path / "none.txt")], "does not exist"),
    ]:
        r = runner.invoke(
            app, ["train-transcoders", str(tiny_dir), "--out", str(tmp_path / "x"), *bad]
        )
        assert r.exit_code == 2 and needle in r.stderr, (bad, r.output)
