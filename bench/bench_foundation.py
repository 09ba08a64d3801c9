"""Foundation benchmark (issue 2): SmolLM2 load times, and forward / plain backward / linearised
backward on a 32-token prompt, with ratios against baselines measured in the same run.

Run with ``make bench`` (or ``python bench/bench_foundation.py [--repeats N] [--threads T]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import adag
    from adag.models.linear import linearize

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    results: dict[str, float | int | str] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ADAG_CACHE"] = cache
        t = time.perf_counter()
        adag.load_model("smollm2-135m")
        results["load_first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model = adag.load_model("smollm2-135m")
        results["load_cached_s"] = time.perf_counter() - t
        from adag.models.load import ALIASES, find_alias_gguf, gguf_cache_path

        gguf = find_alias_gguf(ALIASES["smollm2-135m"])
        assert gguf is not None
        eager = AutoModelForCausalLM.from_pretrained(
            str(gguf_cache_path(gguf)), dtype=torch.float32, attn_implementation="eager"
        ).eval()
    results["load_speedup"] = results["load_first_s"] / results["load_cached_s"]

    text = (
        "When Mary and John went to the store on a sunny afternoon in the middle of May, "
        "they bought apples, bread, milk and cheese, and then John gave a drink to"
    )
    toks = model.to_tokens(text)[:, -32:]
    assert toks.shape[1] == 32
    target = int(model(toks)[0, -1].argmax())
    pre0 = "blocks.0.hook_resid_pre"

    def hf_forward() -> None:
        with torch.no_grad():
            eager(input_ids=toks, use_cache=False)

    def forward() -> None:
        with torch.no_grad():
            model(toks)

    def fwd_bwd(linear: bool) -> tuple[Callable[[], None], Callable[[], None]]:
        state: dict[str, object] = {}

        def run_forward() -> None:
            if linear:
                with linearize(model), model.sites(grad=[pre0]) as run:
                    state["metric"] = model(toks)[0, -1, target]
            else:
                with model.sites(grad=[pre0]) as run:
                    state["metric"] = model(toks)[0, -1, target]
            state["run"] = run

        def run_backward() -> None:
            state["run"].grads(state["metric"])  # type: ignore[attr-defined]

        return run_forward, run_backward

    results["hf_eager_forward_ms"] = 1e3 * timeit(hf_forward, args.repeats)
    results["forward_ms"] = 1e3 * timeit(forward, args.repeats)
    for name, linear in (("plain", False), ("linear", True)):
        f, b = fwd_bwd(linear)

        def both(f: Callable[[], None] = f, b: Callable[[], None] = b) -> None:
            f()
            b()

        results[f"{name}_fwd_bwd_ms"] = 1e3 * timeit(both, args.repeats)
        # backward alone: time it after an untimed forward
        times = []
        for _ in range(args.repeats):
            f()
            t = time.perf_counter()
            b()
            times.append(time.perf_counter() - t)
        results[f"{name}_backward_ms"] = 1e3 * statistics.median(times)
    results["hook_overhead_ratio"] = results["forward_ms"] / results["hf_eager_forward_ms"]
    results["linear_vs_plain_backward"] = (
        results["linear_backward_ms"] / results["plain_backward_ms"]
    )
    results["linear_vs_plain_fwd_bwd"] = results["linear_fwd_bwd_ms"] / results["plain_fwd_bwd_ms"]

    print(
        f"# adag foundation benchmark — SmolLM2-135M float32, 32-token prompt, threads={args.threads}"
    )
    print(f"| {'metric':<28} | {'value':>10} |")
    print(f"|{'-' * 30}|{'-' * 12}|")
    for k, v in results.items():
        print(f"| {k:<28} | {v:>10.3f} |" if isinstance(v, float) else f"| {k:<28} | {v!s:>10} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
