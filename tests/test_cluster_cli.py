"""``adag cluster``, ``adag steer`` and ``adag generate`` on a small real run (SmolLM2, a few
capitals prompts at high thresholds): the files they write, resume (a rerun recomputes nothing),
and one-line exit-2 errors that leave nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from adag.cli import app

runner = CliRunner()
FAST = ["--node-threshold", "0.02", "--edge-threshold", "0.05", "-k", "2"]
PROMPTS = [
    "The capital of France is",
    "The capital of Italy is",
    "The capital of Japan is",
    "The capital of Spain is",
]


def ok(args: list[str]) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(r.stdout)


def one_line_error(args: list[str], needle: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adag: error:") and needle in lines[0], lines
    assert "Traceback" not in r.output


def snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clusters")
    f = d / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = d / "run"
    ok(["trace", "smollm2-135m", "--prompts", str(f), "--out", str(out), *FAST])
    return out


def test_cluster_steer_generate_and_resume(run: Path):
    res = ok(["cluster", str(run), "--n-clusters", "3"])
    assert (
        res["n_clusters"] == 3
        and not res["reused"]
        and sum(res["sizes"].values()) == res["n_units"]
    )
    for name in ("clusters.json", "clusters.parquet", "cluster-profiles.parquet"):
        assert (run / name).exists(), name
    for name in ("clusters-similarity.png", "clusters-by-layer.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    viewer = json.loads(next((run / "viewer").glob("0000-*.json")).read_text())
    names = {s[0] for s in viewer["qParams"]["supernodes"]}
    assert names and names <= {"C0", "C1", "C2"}
    before = snapshot(run)
    assert ok(["cluster", str(run), "--n-clusters", "3"])["reused"]
    assert snapshot(run) == before  # a rerun recomputes and rewrites nothing

    res = ok(["steer", str(run), "--cluster", "C0", "--scale", "0,1,2"])
    assert not res["reused"]
    table = pq.read_table(run / "steering.parquet")
    assert set(table.column("label").to_pylist()) == {"C0"}
    assert sorted(set(table.column("factor").to_pylist())) == [0.0, 1.0, 2.0]
    before = snapshot(run)
    assert ok(["steer", str(run), "--cluster", "C0", "--scale", "0,1,2"])["reused"]
    assert snapshot(run) == before

    plain = ok(["generate", "smollm2-135m", PROMPTS[0], "--max-new-tokens", "4"])
    same = ok(
        ["generate", "smollm2-135m", PROMPTS[0], "--max-new-tokens", "4", "--steer", f"{run}:C0x1"]
    )
    assert plain["text"] == same["text"] and plain["text"].strip()


def test_errors_are_one_line_and_write_nothing(run: Path, tmp_path: Path):
    ok(["cluster", str(run), "--n-clusters", "3"])  # reused when the other test ran first
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(["cluster", str(empty)], "has no graphs")
    one_line_error(["cluster", str(tmp_path / "absent")], "does not exist")
    before = snapshot(run)
    one_line_error(["cluster", str(run), "--n-clusters", "100000"], "100000")
    one_line_error(["cluster", str(run), "--method", "kmedoids"], "unknown clustering method")
    one_line_error(["steer", str(run), "--cluster", "C99"], "unknown cluster 'C99'")
    one_line_error(["steer", str(run), "--scale", "0,x"], "bad --scale '0,x'")
    one_line_error(["steer", str(run), "--scale", ""], "bad --scale")
    one_line_error(["generate", "smollm2-135m", "hi", "--steer", "nocolon"], "bad --steer")
    assert snapshot(run) == before
    one_line_error(["steer", str(empty)], "has no graphs")
    assert list(empty.iterdir()) == []
