"""The describe stage against real loopback servers speaking the OpenAI chat-completions and the
Anthropic messages APIs, with injected faults (429 with Retry-After, 500, a hang past the
timeout, malformed text): every cluster ends with a description or a recorded failure, retries
back off, and a rerun makes no new call (the cache answers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from adag.graphs.trace import trace
from adag.pipeline.cluster import cluster_stage
from adag.pipeline.describe import describe_stage

from .conftest import VOCAB, tiny_model
from .llm_servers import FakeAnthropic, FakeOpenAI, Fault, scripted_reply

KEY = "sk-describe-stage-test-key"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Graphs of a tiny float64 Llama and 3 clusters (the cluster stage)."""
    model = tiny_model("llama")
    d = tmp_path_factory.mktemp("describe") / "run"
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (6, 7, 8, 6, 9, 7, 8)]
    for i, g in enumerate(trace(model, ids, k=3, node_threshold=0.01)):
        g.save(d / "graphs" / f"{i:04d}-p")
    cluster_stage(d, n_clusters=3)
    return d


FAULTS = [
    Fault.status(429, retry_after=0.3),
    Fault.status(500),
    Fault.hang(3.0),
    Fault.text("!!! ??? garbage without numbers"),
]


@pytest.mark.parametrize("server_cls", [FakeOpenAI, FakeAnthropic], ids=["openai", "anthropic"])
def test_describe_with_faults_then_cached(run: Path, tmp_path: Path, server_cls, monkeypatch):
    monkeypatch.setenv("ADAG_DESCRIBE_KEY", KEY)
    backend = "openai" if server_cls is FakeOpenAI else "anthropic"
    d = tmp_path / "run"
    d.mkdir()
    for name in ("graphs", "clusters.json", "clusters.parquet", "cluster-profiles.parquet"):
        src = run / name
        if src.is_dir():
            (d / name).mkdir()
            for f in src.iterdir():
                (d / name / f.name).write_bytes(f.read_bytes())
        else:
            (d / name).write_bytes(src.read_bytes())
    with server_cls(scripted_reply, FAULTS) as server:
        llm = {
            "backend": backend,
            "model": "fake-model",
            "base_url": server.base_url,
            "api_key_env": "ADAG_DESCRIBE_KEY",
            "timeout": 1.0,
            "backoff": 0.01,
            "max_retries": 3,
            "concurrency": 1,
        }
        first = describe_stage(d, llm=llm, n_samples=2, min_highlights=2)
        reqs = server.api_requests()
        assert server.pending_faults == 0  # every fault was met
        assert [r.status for r in reqs[:3]] == [429, 500, None]  # None: hung, dropped
        retry = next(r for r in reqs[1:] if r.json == reqs[0].json)
        assert retry.time - reqs[0].time >= 0.3  # Retry-After honoured
        usage = first["usage"]["explainer"]
        assert usage["retries"] >= 3 and usage["calls"] == len(reqs) - usage["retries"]
        rows = [json.loads(x) for x in (d / "descriptions.jsonl").read_text().splitlines()]
        assert len(rows) == 6
        for r in rows:  # a description with a score, or a failure with its reason
            if r["status"] == "ok":
                assert r["explanation"] and r["score"] is not None
            else:
                assert r["failure"], r
        # the malformed reply was retried: some candidate or label recorded it, or a retry won
        assert any(r["status"] == "ok" for r in rows)
        n = len(reqs)

        # a rerun of a current stage: nothing recomputed, no call
        again = describe_stage(d, llm=llm, n_samples=2, min_highlights=2)
        assert again["reused"] and len(server.api_requests()) == n
        # forced: recomputed from the cache alone, the same rows
        before = (d / "descriptions.jsonl").read_bytes()
        forced = describe_stage(d, llm=llm, n_samples=2, min_highlights=2, force=True)
        assert len(server.api_requests()) == n
        assert forced["usage"]["explainer"]["cache_hits"] > 0
        assert forced["usage"]["explainer"]["calls"] == 0
        assert (d / "descriptions.jsonl").read_bytes() == before
    for p in d.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    assert os.environ["ADAG_DESCRIBE_KEY"] == KEY
