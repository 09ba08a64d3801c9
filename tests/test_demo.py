"""``adag demo`` end to end on SmolLM2 with the local explainer, and the shared small run
(``tests/fixtures/run-small.yaml``): every stage's files, a description or a recorded failure
for every cluster and side, and a report that renders in headless Chromium (Debian's package)
without errors or network requests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from adag.cli import app

from . import browser

runner = CliRunner()


def check_run(run: Path, n_clusters: int) -> dict:
    for name in (
        "config.yaml",
        "prompts.jsonl",
        "profiles.parquet",
        "clusters.json",
        "cluster-profiles.parquet",
        "descriptions.jsonl",
        "steering.parquet",
        "report.html",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    rows = [json.loads(x) for x in (run / "descriptions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * n_clusters
    for r in rows:
        assert r["explainer"] == "local:smollm2-135m"
        if r["status"] == "ok":
            assert r["explanation"] and isinstance(r["score"], float) and -1 <= r["score"] <= 1
        else:
            assert r["failure"], r
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m" and summary["n_clusters"] == n_clusters
    steering = pq.read_table(run / "steering-summary.parquet").to_pylist()
    assert {r["label"] for r in steering} == {f"C{i}" for i in range(n_clusters)}
    return summary


def check_report(run: Path, png: Path) -> None:
    result = browser.screenshot(run / "report.html", png)
    assert not result["console_errors"] and not result["page_errors"], result
    assert not result["blocked"] and not result["failed_requests"], result
    assert not browser.is_blank(png)


def test_small_run(small_run: Path, tmp_path: Path):
    summary = check_run(small_run, 4)
    assert summary["means"]["input"]["n"] + summary["means"]["input"]["failed"] == 4
    check_report(small_run, tmp_path / "report.png")


def test_demo_end_to_end(tmp_path: Path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--out", str(out), "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    result = json.loads(r.stdout)
    assert set(result["timings"]) >= {"dataset", "trace", "cluster", "describe", "steer", "report"}
    summary = check_run(out, 8)
    assert summary["n_prompts"] == 16
    check_report(out, tmp_path / "report.png")
