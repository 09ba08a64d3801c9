"""The command line: output formats, resume, and exit code 2 with one line for bad input.

``load_model("smollm2-135m")`` returns the session's model here (conftest's
``cached_smollm2_loader``); only the ``python -m adag`` subprocess loads its own."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from adag.cli import app

runner = CliRunner()


def test_models_lists_alias_and_architectures():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    for word in (
        "smollm2-135m",
        "llama",
        "qwen3",
        "gemma2",
        "gemma3_text",
        "olmo2",
        "gpt2",
        "qwen2",
    ):
        assert word in r.output


def test_predict_json():
    r = runner.invoke(
        app, ["predict", "smollm2-135m", "The capital of France is", "-k", "3", "--json"]
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [set(x) for x in rows] == [{"token", "id", "prob"}] * 3
    assert rows[0]["token"] == " Paris" and rows[0]["prob"] > 0.5


def test_predict_table():
    r = runner.invoke(
        app,
        ["predict", "smollm2-135m", "When Mary and John went to the store, John gave a drink to"],
    )
    assert r.exit_code == 0, r.output
    assert "' Mary'" in r.stdout


def test_errors_exit_2_with_one_line(tmp_path):
    for args, msg in [
        (["predict", "no-such-model", "hi"], "unknown model 'no-such-model'"),
        (["patch", "no-such-model", "--out", str(tmp_path)], "unknown model 'no-such-model'"),
        (["predict", "smollm2-135m", "hi", "--dtype", "int3"], "unsupported dtype 'int3'"),
        (["predict", "smollm2-135m", "hi", "-k", "0"], "-k must be at least 1"),
        (["predict", "smollm2-135m", ""], "the prompt is empty"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], r.stderr


def test_python_dash_m_is_the_same_cli():
    p = subprocess.run(
        [sys.executable, "-m", "adag", "predict", "nope", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "adag: error: unknown model 'nope'; use an alias (smollm2-135m), a Hugging Face id (org/name), a local directory or a .gguf file"
    ]


def test_patch_localize_checks_the_estimators_by_exact_patching(tmp_path):
    """``--method localize``: AtP*, AtP-IG, the downstream QK fix and AtP under the linearised
    backward, their rankings checked by exact patching; the table has the exact effects of the
    checked nodes, which equal exhaustive patching's."""
    import pyarrow.parquet as pq

    from adag.patching import PatchingOracle
    from adag.tasks import make_task
    from tests.conftest import _session_smollm2

    args = ["patch", "smollm2-135m", "--out", str(tmp_path), "--n-pairs", "1"]
    r = runner.invoke(app, [*args, "--method", "localize", "--nodes", "heads"])
    assert r.exit_code == 0, r.output
    assert "position" in r.stdout and "END" in r.stdout
    t = pq.read_table(tmp_path / "patching" / "localize.parquet").to_pydict()
    for col in ("exact", "checked", "atp_star", "atp_ig", "atp_dqk", "atp_linear", "position"):
        assert col in t
    checked = np.array(t["checked"]) == 1.0
    assert 20 <= checked.sum() < len(checked)
    model = _session_smollm2()
    oracle = PatchingOracle(model, make_task("ioi", model, 1, seed=0), nodes="heads")
    where = {n: i for i, n in enumerate(oracle.ids)}
    want = oracle.single(np.array([where[n] for n, c in zip(t["node"], checked, strict=True) if c]))
    np.testing.assert_allclose(np.array(t["exact"])[checked], want, atol=2e-4)
    r = runner.invoke(app, [*args, "--method", "atp_ig", "--nodes", "heads", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["top"][0][0].startswith("head:")


def test_patch_writes_table_and_plot_then_reuses_them(tmp_path):
    args = ["patch", "smollm2-135m", "--out", str(tmp_path), "--n-pairs", "2", "--method", "atp"]
    r = runner.invoke(app, [*args, "--nodes", "heads", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["reused"] is False
    assert out["top"][0][0].startswith("head:")
    files = sorted(p.name for p in (tmp_path / "patching").iterdir())
    assert files == ["atp.parquet", "atp.parquet.key.json", "atp.png"]
    import pyarrow.parquet as pq

    table = tmp_path / "patching" / "atp.parquet"
    t = pq.read_table(table)
    assert t.column_names[:3] == ["node", "estimate", "abs_estimate"]
    mtime = table.stat().st_mtime_ns
    # the same settings again (another batch size, which does not change the effects): reused
    again = runner.invoke(app, [*args, "--nodes", "heads", "--batch-size", "8", "--json"])
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert second["reused"] is True and second["top"] == out["top"]
    assert table.stat().st_mtime_ns == mtime
    # another node set decides the content: recomputed
    other = runner.invoke(app, [*args, "--nodes", "sublayers", "--json"])
    assert other.exit_code == 0, other.output
    third = json.loads(other.stdout)
    assert third["reused"] is False and third["top"][0][0].split(":")[0] in ("attn", "mlp")


def test_patch_from_pairs_file(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps(
            {
                "clean": "The capital of France is",
                "noise": "The capital of Italy is",
                "answer": " Paris",
                "foil": " Rome",
            }
        )
        + "\n"
    )
    r = runner.invoke(
        app,
        [
            "patch",
            "smollm2-135m",
            "--out",
            str(tmp_path / "run"),
            "--pairs",
            str(pairs),
            "--method",
            "atp_qk",
            "--nodes",
            "qkv",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "patching" / "atp_qk.parquet").is_file()
    assert "atp_qk: top nodes (1 pairs)" in r.stdout and "head:" in r.stdout


def test_patch_errors_exit_2_and_write_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a b", "noise": "a b c d", "answer": " x"}\n')
    cases = [
        (["--method", "magic"], "unknown method 'magic'"),
        (["--nodes", "everything"], "unknown node set 'everything'"),
        (["--n-pairs", "0"], "--n-pairs must be at least 1"),
        (["--task", "sorting"], "sorting"),
        (["--pairs", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--pairs", str(bad)], "clean is 2 tokens but noise is 4"),
    ]
    for extra, msg in cases:
        out = tmp_path / "run"
        r = runner.invoke(app, ["patch", "smollm2-135m", "--out", str(out), *extra])
        assert r.exit_code == 2, (extra, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (extra, r.stderr)
        assert not (out / "patching").exists()


def test_patch_evaluate_prints_summary(tmp_path, monkeypatch):
    """The --evaluate table (the evaluation itself is tested in test_patching.py)."""
    import adag.pipeline.patch as run

    seen = {}

    def fake_evaluate(model, pairs, out_dir, **kw):
        seen["pairs"] = len(pairs)
        return {
            "n_pairs": len(pairs),
            "n_nodes": 42,
            "atp_star": {
                "seconds": 1.0,
                "recall_top20_in_top40": 0.9,
                "true_top50_ranked_below_500": 1,
            },
        }

    monkeypatch.setattr(run, "evaluate", fake_evaluate)
    r = runner.invoke(
        app, ["patch", "smollm2-135m", "--out", str(tmp_path), "--n-pairs", "2", "--evaluate"]
    )
    assert r.exit_code == 0, r.output
    assert seen == {"pairs": 2}
    assert (
        "evaluation against exhaustive patching (42 nodes)" in r.stdout and "atp_star" in r.stdout
    )
