"""Data parallelism with ``torchrun`` (issue 15, item 2): two CPU processes on the gloo backend
trace their shards of the prompts, rank 0 merges, and the run directory is the one a single
process writes, file for file; a rank killed mid-run leaves its finished graphs, which the
rerun reuses instead of tracing them again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from adag.pipeline.dist import Dist

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
PROMPTS = [
    "The capital of France is",
    "Mary and John went to the",
    "One two three four",
    "The cat sat on the",
    "Paris is in",
]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def adag(args: list[str], *, ranks: int = 1, **kw: str) -> subprocess.CompletedProcess[str]:
    cmd = (
        [*TORCHRUN, "--master-port", str(free_port()), "-m", "adag", *args]
        if ranks > 1
        else [
            sys.executable,
            "-m",
            "adag",
            *args,
        ]
    )
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(**kw), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(str(p.relative_to(root)).startswith(s) for s in skip)
    }


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return path


def test_static_shards() -> None:
    d = Dist(rank=1, world=3)
    assert [i for i in range(8) if d.owns(i)] == [1, 4, 7]
    assert not d.main and Dist().main and not Dist().active
    assert d.device("cuda") == "cuda:0" and d.device("cpu") == "cpu"


def test_two_gloo_processes_trace_like_one(tiny_dir: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    args = ["trace", str(tiny_dir), "--prompts", str(prompts), "-k", "2", "--json"]
    adag([*args, "--out", str(tmp_path / "one")])
    r = adag([*args, "--out", str(tmp_path / "two")], ranks=2)
    out = json.loads(r.stdout)  # rank 0 alone prints
    assert len(out["traced"]) == len(PROMPTS) and len(out["summaries"]) == len(PROMPTS)
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert list(one) == list(two) and one == two  # graphs, viewer files, index, profiles
    # a rerun on two ranks reuses every graph
    r = adag([*args, "--out", str(tmp_path / "two")], ranks=2)
    assert len(json.loads(r.stdout)["reused"]) == len(PROMPTS)
    assert tree(tmp_path / "two") == one


def test_two_gloo_processes_run_like_one(tiny_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    cfg = {
        "model": str(tiny_dir),
        "dataset": {"file": str(prompts)},
        "trace": {"k": 2, "node_threshold": 0.01, "edge_threshold": 0.02},
        "cluster": {"n_clusters": 3},
        "describe": {"enabled": False},
        "steer": {"scale": [0.0, 2.0]},  # the ranks split the clusters
        "pairs": {"file": str(write_pairs(tmp_path / "pairs.jsonl")), "method": "atp_star"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    adag(["run", str(path), "--out", str(tmp_path / "one"), "--json"])
    r = adag(["run", str(path), "--out", str(tmp_path / "two"), "--json"], ranks=2)
    summary = json.loads(r.stdout)
    assert summary["n_prompts"] == len(PROMPTS) and summary["n_clusters"] == 3
    # everything but the report, which records each run's timings
    skip = ("report.html", "summary.json")
    one, two = tree(tmp_path / "one", skip), tree(tmp_path / "two", skip)
    assert list(one) == list(two)
    for name in (
        "clusters.json",
        "profiles.parquet",
        "cluster-profiles.parquet",
        "steering.parquet",
        "steering-summary.parquet",
    ):
        assert name in one
    # the patch table records its own run time
    one.pop("patching/atp_star.parquet")
    assert two.pop("patching/atp_star.parquet") and one == two
    assert table_of(tmp_path / "one" / "patching" / "atp_star.parquet") == table_of(
        tmp_path / "two" / "patching" / "atp_star.parquet"
    )


def worker_pids(tag: str, rank: int) -> list[int]:
    """Pids of the processes started with ``ADAG_TEST_TAG=tag`` and ``RANK=rank``."""
    want = {f"ADAG_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            environ = set((p / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= environ:
            pids.append(int(p.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process in /proc")
def test_killed_rank_resumes_without_retracing(tiny_dir: Path, tmp_path: Path) -> None:
    many = [f"{p} {i}" for i in range(12) for p in PROMPTS]  # 60 prompts, 30 per rank
    prompts = write_prompts(tmp_path / "p.jsonl", many)
    out = tmp_path / "run"
    args = ["trace", str(tiny_dir), "--prompts", str(prompts), "-k", "2", "--out", str(out)]
    tag = uuid.uuid4().hex
    cmd = [*TORCHRUN, "--master-port", str(free_port()), "-m", "adag", *args]
    proc = subprocess.Popen(
        cmd,
        env=env(ADAG_TEST_TAG=tag),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while len(list((out / "graphs").glob("*.safetensors"))) < 4:
            assert proc.poll() is None, "the run ended before the kill"
            assert time.time() < deadline
            time.sleep(0.05)
        for pid in worker_pids(tag, 1):
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # torchrun stops the group when a rank dies
    finally:
        if proc.poll() is None:
            proc.kill()
    done = {p.stem for p in (out / "graphs").glob("*.json")}
    assert 0 < len(done) < len(many), "the kill did not land mid-run"
    assert not (out / "viewer" / "graph-metadata.json").exists()  # no index of a partial set
    r = adag([*args, "--json"], ranks=2)
    result = json.loads(r.stdout)
    assert set(result["reused"]) == done  # every finished graph, of either rank, is kept
    assert len(result["traced"]) == len(many) - len(done)
    single = tmp_path / "single"
    shutil.rmtree(single, ignore_errors=True)
    adag([*args[:-1], str(single)])
    assert tree(out) == tree(single)


PAIRS = [
    (
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        " Mary",
        " John",
    ),
    (
        "When Alice and Bob went to the park, Bob gave a ball to",
        "When Alice and Bob went to the park, Alice gave a ball to",
        " Alice",
        " Bob",
    ),
    (
        "Then Tom and Anna sat down, and Anna handed a cup to",
        "Then Tom and Anna sat down, and Tom handed a cup to",
        " Tom",
        " Anna",
    ),
    ("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
    ("The capital of Spain is", "The capital of Japan is", " Madrid", " Tokyo"),
]


def write_pairs(path: Path) -> Path:
    path.write_text(
        "".join(
            json.dumps({"clean": c, "noise": n, "answer": a, "foil": f}) + "\n"
            for c, n, a, f in PAIRS
        )
    )
    return path


def table_of(path: Path) -> tuple[dict, dict]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    meta = {k: v for k, v in (t.schema.metadata or {}).items() if k != b"seconds"}
    return t.to_pydict(), meta


@pytest.mark.parametrize("method", ["atp_star", "exhaustive", "ablate_mean"])
def test_two_gloo_processes_patch_like_one(tiny_dir: Path, tmp_path: Path, method: str) -> None:
    """The ranks split the pairs (pairs of two lengths: ids aligned from the end) and rank 0
    merges them into the table one process writes; ablate_mean (a mean over all pairs) runs on
    rank 0 alone."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    args = ["patch", str(tiny_dir), "--pairs", str(pairs), "--method", method, "--json"]
    adag([*args, "--out", str(tmp_path / "one")])
    r = adag([*args, "--out", str(tmp_path / "two")], ranks=2)
    assert json.loads(r.stdout)["reused"] is False
    one = table_of(tmp_path / "one" / "patching" / f"{method}.parquet")
    two = table_of(tmp_path / "two" / "patching" / f"{method}.parquet")
    assert one == two
    if method == "atp_star":  # a current table is reused by every rank
        r = adag([*args, "--out", str(tmp_path / "two")], ranks=2)
        assert json.loads(r.stdout)["reused"] is True
