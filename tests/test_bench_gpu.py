"""``bench/gpu.py --tiny`` runs on a CPU (issue 15, item 6: CI exercises the GPU benchmark's code
with scaled-down shapes): every method reports a row with positive times and the node cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_runs_on_cpu() -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--tiny",
            "--lengths",
            "12",
            "--batches",
            "1,2",
            "--max-nodes",
            "20",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((ROOT / "bench" / "results" / "gpu-tiny.json").read_text())
    assert data["shapes"] == "tiny" and data["device"] == "cpu"
    rows = data["rows"]
    assert {(x["method"], x["batch"]) for x in rows} == {
        (m, b) for m in ("trace", "atp_star", "transcoders") for b in (1, 2)
    }
    for x in rows:
        assert x["s_per_prompt"] > 0 and x["peak_gib"] > 0
        if x["method"] != "atp_star":
            assert x["nodes"] == 20  # the cap: every neuron/feature is a candidate
    assert "s/prompt" in r.stdout
