"""Data parallelism on the CPU (issue 15): ``adag trace`` of ``--prompts`` capitals prompts on
SmolLM2, one process against ``torchrun --nproc-per-node 2`` (gloo), run in the same session:

- ``1 proc x 1 thread``, ``1 proc x 2 threads``: one process (torch threads = OMP_NUM_THREADS);
- ``2 procs x 1 thread``: two ranks of one thread each, prompts sharded ``i % 2``, rank 0
  merging (the index and the profiles).

Wall time of the whole command (each process loads the model: a few seconds) and prompts per
second; the two runs of one thread per process must be equal file for file (a process of two
threads sums in another order, so its floats differ in the last bits). Writes ``bench/results/dist.json``.
Run with ``python bench/bench_dist.py [--prompts 16]`` on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    from adag import load_model
    from adag.tasks.datasets import make_dataset

    specs = make_dataset("capitals", load_model(args.model), args.prompts)
    runs: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in specs))
        base = ["-m", "adag", "trace", args.model, "--prompts", str(prompts), "-k", "5"]
        configs = {
            "1 proc x 1 thread": ([sys.executable, *base], "1"),
            "1 proc x 2 threads": ([sys.executable, *base], "2"),
            "2 procs x 1 thread": (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc-per-node",
                    "2",
                    "--master-port",
                    str(free_port()),
                    *base,
                ],
                "1",
            ),
        }
        outs = {}
        for name, (cmd, threads) in configs.items():
            out = Path(tmp) / name.replace(" ", "_")
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(k, None)
            t0 = time.perf_counter()
            r = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
            secs = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(f"{name} failed:\n{r.stderr[-2000:]}")
            runs[name] = {"seconds": secs, "prompts_per_s": args.prompts / secs}
            outs[name] = tree(out)
            print(f"{name:<20} {secs:7.1f} s  {args.prompts / secs:6.3f} prompts/s", flush=True)
        # equal thread counts per process give equal bytes; two threads sum in another order
        same = outs["2 procs x 1 thread"] == outs["1 proc x 1 thread"]
    base_s = runs["1 proc x 1 thread"]["seconds"]
    for r in runs.values():
        r["speedup"] = base_s / r["seconds"]
    print(
        f"2 procs x 1 thread: {runs['2 procs x 1 thread']['speedup']:.2f}x one process of one "
        f"thread, {runs['1 proc x 2 threads']['seconds'] / runs['2 procs x 1 thread']['seconds']:.2f}x"
        f" one process of two threads; run directories identical: {same}"
    )
    out_path = Path(__file__).parent / "results" / "dist.json"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(
        json.dumps(
            {
                "prompts": args.prompts,
                "model": args.model,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "identical": same,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    if not same:
        raise SystemExit("the run directories differ")


if __name__ == "__main__":
    main()
