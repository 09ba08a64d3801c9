"""``adag run`` end to end on a tiny random Llama (SmolLM2's tokenizer, random weights) with the
explainer, simulator and judge behind a real loopback OpenAI-compatible server: every file of
the run directory, resume (a rerun reuses every stage and makes no LLM call), a changed LLM
redoes only describe, judge and report, and a run killed with SIGKILL mid-describe finishes on
rerun with the same files as an uninterrupted run, without repeating finished calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests.llm_servers import FakeOpenAI, scripted_reply

SECRET = "sk-test-3f9c2a7e-never-on-disk"
PROMPTS = [
    "The capital of France is",
    "The capital of Italy is",
    "The capital of Japan is",
    "The capital of Spain is",
    "The capital of Peru is",
    "The capital of Chad is",
]
ENV = {**os.environ, "ADAG_TEST_KEY": SECRET, "OMP_NUM_THREADS": "1"}
UNSTABLE = {"report.html", "summary.json"}  # timings and call counters


def write_config(path: Path, tiny_dir: Path, base_url: str, *, model: str = "fake-model") -> Path:
    prompts = path.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    cfg = {
        "model": str(tiny_dir),
        "dataset": {"file": str(prompts)},
        "trace": {"k": 2, "node_threshold": 0.01, "edge_threshold": 0.02},
        "cluster": {"n_clusters": 3},
        "describe": {
            "llm": {
                "backend": "openai",
                "model": model,
                "base_url": base_url,
                "api_key_env": "ADAG_TEST_KEY",
                "concurrency": 2,
                "backoff": 0.01,
            },
            "n_samples": 2,
            "min_highlights": 2,
        },
        "steer": {
            "scale": [0.0, 2.0],
            "generate": 2,
            "max_new_tokens": 4,
            "judge": "Is it a city?",
        },
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def adag(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "adag", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return json.loads(out)


def files(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and "llm-cache" not in p.parts
    }


def bodies(server: FakeOpenAI, start: int = 0) -> list[str]:
    return [json.dumps(r.json, sort_keys=True) for r in server.api_requests()[start:]]


def test_run_end_to_end_resume_and_llm_change(tmp_path: Path, tiny_dir: Path):
    with FakeOpenAI(scripted_reply) as server:
        cfg = write_config(tmp_path / "run.yaml", tiny_dir, server.base_url)
        run = tmp_path / "run"
        result = finish(adag("run", str(cfg), "--out", str(run), "--json"))
        n_calls = len(server.api_requests())
        assert n_calls > 0
        for name in (
            "config.yaml",
            "prompts.jsonl",
            "profiles.parquet",
            "clusters.json",
            "cluster-profiles.parquet",
            "descriptions.jsonl",
            "steering.parquet",
            "steering-judged.parquet",
            "report.html",
            "summary.json",
            "llm-cache/cache.sqlite",
        ):
            assert (run / name).is_file(), name
        assert len(list((run / "graphs").glob("*.json"))) == len(PROMPTS)
        rows = [json.loads(x) for x in (run / "descriptions.jsonl").read_text().splitlines()]
        assert {(r["cluster"], r["side"]) for r in rows} == {
            (c, s) for c in ("C0", "C1", "C2") for s in ("input", "output")
        }
        for r in rows:  # a description with a score, or a failure with its reason
            assert (r["status"] == "ok" and r["explanation"]) or r["failure"], r
            assert r["explainer"] == "openai:fake-model"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["n_clusters"] == 3 and len(summary["clusters"]) == 3
        assert result["timings"].keys() >= {"trace", "cluster", "describe", "steer", "report"}
        judged = pq.read_table(run / "steering-judged.parquet").to_pylist()
        assert len(judged) == 2 * (1 + 3 * 2) and all(r["judged"] is True for r in judged)
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["describe"]["llm"]["api_key_env"] == "ADAG_TEST_KEY"
        for p in run.rglob("*"):  # the key never reaches disk
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes(), p

        # a rerun reuses every stage and makes no LLM call
        before = files(run)
        again = finish(adag("run", str(cfg), "--out", str(run), "--json"))
        assert len(server.api_requests()) == n_calls
        assert set(again["reused"]) >= {"dataset", "trace", "cluster", "describe", "steer", "judge"}
        after = files(run)
        assert {k: v for k, v in after.items() if k not in UNSTABLE} == {
            k: v for k, v in before.items() if k not in UNSTABLE
        }

        # adag steer --generate --judge on the same run: the judged table and its summary
        res = finish(
            adag(
                "steer",
                str(run),
                "--cluster",
                "C1",
                "--scale",
                "0",
                "--generate",
                "1",
                "--judge",
                "Is it about a capital?",
                "--backend",
                "openai",
                "--llm-model",
                "fake-model",
                "--base-url",
                server.base_url,
                "--api-key-env",
                "ADAG_TEST_KEY",
                "--max-new-tokens",
                "3",
                "--json",
            )
        )
        rates = {(r["cluster"], r["factor"]): r for r in res["judge"]["summary"]}
        assert set(rates) == {("none", 1.0), ("C1", 0.0)}
        assert rates["C1", 0.0]["rate"] == 1.0 and rates["C1", 0.0]["n"] == 1
        assert rates["C1", 0.0]["lo"] < 1.0 <= rates["C1", 0.0]["hi"]  # Wilson
        n_calls = len(server.api_requests())
        finish(adag("run", str(cfg), "--out", str(run), "--json"))  # back to the config's judge
        assert len(server.api_requests()) == n_calls  # its answers are cached
        before = files(run)

        # another explainer model: describe, judge and report only
        write_config(cfg, tiny_dir, server.base_url, model="other-model")
        third = finish(adag("run", str(cfg), "--out", str(run), "--json"))
        assert len(server.api_requests()) > n_calls
        assert set(third["reused"]) == {"dataset", "trace", "cluster", "steer"}
        rows = [json.loads(x) for x in (run / "descriptions.jsonl").read_text().splitlines()]
        assert rows[0]["explainer"] == "openai:other-model"
        assert files(run)["clusters.json"] == before["clusters.json"]


def test_sigkill_mid_describe_resumes_to_the_same_files(tmp_path: Path, tiny_dir: Path):
    with FakeOpenAI(scripted_reply, delay=0.02) as server:
        cfg = write_config(tmp_path / "run.yaml", tiny_dir, server.base_url)
        full = tmp_path / "full"
        finish(adag("run", str(cfg), "--out", str(full), "--json"))
        start = len(server.api_requests())

        killed = tmp_path / "killed"
        p = adag("run", str(cfg), "--out", str(killed), "--json")
        deadline = time.monotonic() + 300
        while len(server.api_requests()) - start < 12:  # well inside describe
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        killed_at = time.monotonic()
        assert not (killed / "descriptions.jsonl").exists()
        answered = {
            json.dumps(r.json, sort_keys=True)
            for r in server.api_requests()[start:]
            if r.status == 200 and r.time < killed_at - 0.5
        }
        mid = len(server.api_requests())

        finish(adag("run", str(cfg), "--out", str(killed), "--json"))
        repeated = answered & set(bodies(server, mid))
        assert not repeated, f"{len(repeated)} finished calls were made again"
        a, b = files(full), files(killed)
        assert a.keys() == b.keys()
        differ = [k for k in a if a[k] != b[k] and k not in UNSTABLE]
        assert not differ, differ
