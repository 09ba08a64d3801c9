"""``adag trace``: the run directory it writes, resuming, and one-line exit-2 errors that leave
nothing on disk. Real SmolLM2 (high thresholds keep it quick)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from adag.cli import app
from adag.graphs.graph import Graph

runner = CliRunner()
FAST = ["--node-threshold", "0.03", "--edge-threshold", "0.05", "-k", "2"]


def test_trace_one_prompt(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        ["trace", "smollm2-135m", "The capital of France is", "--out", str(out), *FAST, "--json"],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    slug = "the-capital-of-france-is"
    assert res["graphs"] == [str(out / "graphs" / f"{slug}.json")]
    g = Graph.load(out / "graphs" / slug)
    assert g.target_tokens[0] == " Paris" and g.settings["node_threshold"] == 0.03
    data = json.loads((out / "viewer" / f"{slug}.json").read_text(encoding="utf-8"))
    assert {n["adag_id"] for n in data["nodes"]} <= set(g.node_ids) and data["nodes"]
    index = json.loads((out / "viewer" / "graph-metadata.json").read_text())
    assert [e["slug"] for e in index["graphs"]] == [slug]
    t = pq.read_table(out / "profiles.parquet")
    assert set(t.column("side").to_pylist()) == {"input", "output"}
    assert set(t.column("prompt_id").to_pylist()) == {slug}
    assert oct((out / "graphs" / f"{slug}.json").stat().st_mode & 0o777) != "0o600"


def test_trace_dataset_resumes_and_prints_table(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "The capital of France is"}\n\n{"prompt": "The capital of Italy is", "label": "it"}\n'
    )
    out = tmp_path / "run"
    args = ["trace", "smollm2-135m", "--prompts", str(prompts), "--out", str(out), *FAST]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "2 graph(s)" in r.stdout and "' Paris'" in r.stdout and "' Rome'" in r.stdout
    names = sorted(p.name for p in (out / "graphs").iterdir())
    assert names == [
        "0000-the-capital-of-france-is.json",
        "0000-the-capital-of-france-is.safetensors",
        "0001-the-capital-of-italy-is.json",
        "0001-the-capital-of-italy-is.safetensors",
    ]
    assert Graph.load(out / "graphs" / "0001-the-capital-of-italy-is").settings["label"] == "it"
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["reused"]) == 2
    # other settings: traced again
    r = runner.invoke(app, [*args[:-1], "3", "--json"])
    assert json.loads(r.stdout)["reused"] == []


def test_trace_targets_and_foil(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "trace",
            "smollm2-135m",
            "When Mary and John went to the store, John gave a drink to",
            "--target",
            " Mary",
            "--foil",
            " John",
            "--out",
            str(out),
            *FAST,
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    g = Graph.load(json.loads(r.stdout)["graphs"][0])
    assert g.target_tokens == [" Mary", " John"] and g.target_coef.tolist() == [1.0, -1.0]
    assert g.metric == float(g.target_logits[0] - g.target_logits[1])
    assert g.metric > 0


def test_trace_errors_exit_2_and_write_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    cases = [
        (["The capital of France is", "--target", " Parisian city"], "is 3 tokens"),
        (["   "], "prompt is empty"),
        (["word " * 9000], "longer than the model's context"),
        (["The capital", "--foil", " Rome"], "--foil needs exactly one --target"),
        (["--prompts", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--prompts", str(empty)], "no prompts in"),
        (["--prompts", str(bad)], "bad.jsonl:2"),
        ([], "give either a PROMPT or --prompts FILE"),
        (["The capital", "--node-threshold", "-1"], "thresholds must be >= 0"),
    ]
    for extra, msg in cases:
        out = tmp_path / "run"
        r = runner.invoke(app, ["trace", "smollm2-135m", *extra, "--out", str(out)])
        assert r.exit_code == 2, (extra, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (extra, r.stderr)
        assert not out.exists(), extra
    r = runner.invoke(app, ["trace", "no-such-model", "hi", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
