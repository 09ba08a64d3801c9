"""``adag demo`` (issue 11): the whole job on SmolLM2 with the local explainer and simulator, from
an empty run directory. Prints the wall time per stage, the LLM calls and tokens, and the mean
input/output description scores next to both baselines (shuffled, top tokens). Target: under 10
minutes in total on a 2-core CPU machine.

``python bench/bench_demo.py [--out bench/results/demo]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/demo")
    args = ap.parse_args()
    from adag.pipeline.config import DEMO, parse_config
    from adag.pipeline.run import run

    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    result = run(parse_config(DEMO, source="demo"), out=args.out)
    total = time.perf_counter() - t0
    print("stage        seconds")
    for stage, s in result["timings"].items():
        print(f"{stage:<12} {s:8.1f}")
    print(f"{'total':<12} {total:8.1f}   (target < 600)")
    print("LLM usage:", json.dumps(result["usage"]))
    print("mean scores   description  shuffled  top-tokens  (scored, failed)")
    for side in ("input", "output"):
        m = result["means"][side]
        fmt = lambda x: "   -  " if x is None else f"{x:+.3f}"  # noqa: E731
        print(
            f"{side:<12}  {fmt(m['score']):>11}  {fmt(m['shuffled']):>8}  "
            f"{fmt(m['top_tokens']):>10}  ({m['n']}, {m['failed']})"
        )
    print("cluster  label                 input r  output r")
    for c in result["clusters"]:
        i, o = c["input"]["score"], c["output"]["score"]
        print(
            f"{c['name']:<8} {(c['label'] or '')[:20]:<20}  "
            f"{'-' if i is None else f'{i:+.2f}':>7}  {'-' if o is None else f'{o:+.2f}':>8}"
        )


if __name__ == "__main__":
    main()
