"""GPU benchmark (issue 15, item 6): neuron-graph tracing, AtP* and transcoder graphs on a randomly
initialised model with the exact shapes of Llama-3.1-8B (no weights needed for timing).

Shapes: d_model 4096, d_mlp 14336, 32 layers, 32 heads (8 key/value heads), vocabulary 128,256,
RoPE θ 500,000, bfloat16 on the GPU. ``--tiny`` scales it down (d_model 64, d_mlp 224, 4 layers,
4 heads, vocabulary 512, float32) so that CI runs the same code on a CPU.

For each prompt length (``--lengths``, default 32,128,512 tokens; random token ids) and prompt
batch size (``--batches``, default 1,2,4,8) it times:

- ``trace``: a neuron graph with k = ``--k`` targets, every neuron a candidate (node threshold 0)
  and the kept nodes capped at ``--max-nodes`` by |attribution| (random weights decide how many
  pass a threshold, so the number of kept nodes is fixed instead), edges at the default threshold;
- ``atp_star``: AtP* over attention heads on random clean/noise pairs of that length;
- ``transcoders``: a feature graph of random TopK per-layer transcoders (``--features`` per layer,
  ``--topk`` active per token) with ``max_feature_nodes`` = ``--max-nodes`` (``--no-transcoders``
  skips it).

adag traces the prompts of a batch one after the other (prompt batching in one forward/backward
is not built yet), so a batch size says how many prompts were timed together, and seconds per
prompt is the batch's time over its size. Reported: seconds per prompt, milliseconds per kept
node, peak memory (``torch.cuda.max_memory_allocated``; on the CPU the peak resident memory of
the process, reset per row where Linux allows). The target: under 5 s per prompt for a 50-token
prompt with k = 5 on one H100-class GPU (Transluce's release code: 10.0 s at batch 4, 22 GB):
``--lengths 50 --k 5``.

Run: ``python bench/gpu.py`` on a GPU machine, ``python bench/gpu.py --tiny`` anywhere.
Writes ``bench/results/gpu[-tiny].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

FULL = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128_256,
    "rope_theta": 500_000.0,
    "max_position_embeddings": 8192,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 224,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "rope_theta": 500_000.0,
    "max_position_embeddings": 1024,
}


def build(shapes: dict[str, Any], dtype: torch.dtype, device: str) -> Any:
    """A randomly initialised Llama with ``shapes``, made directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adag.models.model import Model

    cfg = LlamaConfig(**shapes, tie_word_embeddings=False, initializer_range=0.02)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return Model(hf.eval(), None, name="llama-3.1-8b-shapes (random)" if shapes is FULL else "tiny")


def random_transcoders(model: Any, features: int, topk: int) -> Any:
    from adag.transcoders import Transcoders

    g = torch.Generator(device=model.device).manual_seed(1)
    d, L, dt, dev = model.d_model, model.n_layers, model.dtype, model.device

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    return Transcoders(
        kind="plt",
        layers=list(range(L)),
        W_enc=[rand(features, d, scale=d**-0.5) for _ in range(L)],
        b_enc=[torch.zeros(features, dtype=dt, device=dev) for _ in range(L)],
        W_dec=[rand(features, d, scale=topk**-0.5 * 0.1) for _ in range(L)],
        b_dec=[torch.zeros(d, dtype=dt, device=dev) for _ in range(L)],
        activation="topk",
        k=topk,
        meta={"format": "random (bench/gpu.py)"},
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM
        except OSError:
            pass


def peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="scaled-down shapes, float32 (CI, CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--lengths", default="32,128,512")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-nodes", type=int, default=None, help="default 500 (--tiny: 50)")
    ap.add_argument("--features", type=int, default=None, help="default 16384 (--tiny: 256)")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--no-transcoders", action="store_true")
    ap.add_argument("--methods", default="trace,atp_star,transcoders")
    args = ap.parse_args()

    from adag.graphs.config import TraceConfig
    from adag.graphs.neurons import MlpNeurons
    from adag.graphs.trace import trace_tokens
    from adag.patching.atp import atp_star
    from adag.tasks.pairs import PromptPair, TokenizedPair

    dev = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32"))
    shapes = TINY if args.tiny else FULL
    cap = args.max_nodes or (50 if args.tiny else 500)
    features = args.features or (256 if args.tiny else 16384)
    t0 = time.perf_counter()
    model = build(shapes, dtype, dev)
    sync(dev)
    built = time.perf_counter() - t0
    methods = [m for m in args.methods.split(",") if m]
    if args.no_transcoders:
        methods = [m for m in methods if m != "transcoders"]
    tc = random_transcoders(model, features, args.topk) if "transcoders" in methods else None
    g = torch.Generator().manual_seed(0)
    V = model.d_vocab
    rows: list[dict[str, Any]] = []
    print(
        f"{model.name}: {model.n_layers} layers, d_model {model.d_model}, d_mlp {model.d_mlp}, "
        f"{str(dtype).removeprefix('torch.')} on {dev} (built in {built:.1f} s); k={args.k}, "
        f"kept nodes capped at {cap}; prompts of a batch traced one after the other"
    )
    head = f"{'method':<12} {'tokens':>6} {'batch':>5} {'s/prompt':>9} {'ms/node':>8} {'nodes':>6} {'peak GiB':>9}"
    print(head)
    for T in (int(x) for x in args.lengths.split(",")):
        for B in (int(x) for x in args.batches.split(",")):
            prompts = [torch.randint(1, V, (T,), generator=g).tolist() for _ in range(B)]
            for method in methods:
                reset_peak(dev)
                sync(dev)
                t0 = time.perf_counter()
                nodes = 0
                if method == "trace":
                    fam = MlpNeurons()
                    fam.max_nodes = cap  # type: ignore[attr-defined]
                    cfg = TraceConfig(k=args.k, node_threshold=0.0)
                    for ids in prompts:
                        gr = trace_tokens(model, ids, cfg, families=[fam])
                        nodes += int(sum(k == "neuron" for k in gr.node_kinds))
                elif method == "transcoders":
                    from adag.graphs.trace import trace

                    for ids in prompts:
                        gr = trace(
                            model,
                            torch.tensor(ids),
                            transcoders=tc,
                            k=args.k,
                            targets=None,
                            desired_logit_prob=None,
                            max_feature_nodes=cap,
                        )[0]
                        nodes += int(sum(k == "feature" for k in gr.node_kinds))
                elif method == "atp_star":
                    pairs = [
                        TokenizedPair(
                            pair=PromptPair(clean="", noise="", answer="", foil=""),
                            clean=torch.tensor([ids], device=model.device),
                            noise=torch.randint(1, V, (1, T), generator=g).to(model.device),
                            answer_id=int(ids[-1]),
                            foil_id=int(ids[0]),
                        )
                        for ids in prompts
                    ]
                    scores = atp_star(model, pairs)
                    nodes = len(scores.nodes) * B  # heads x positions, scored per pair
                else:
                    raise SystemExit(f"unknown method {method!r}")
                sync(dev)
                secs = time.perf_counter() - t0
                row = {
                    "method": method,
                    "tokens": T,
                    "batch": B,
                    "s_per_prompt": secs / B,
                    "ms_per_node": 1000 * secs / nodes if nodes else None,
                    "nodes": nodes // B if nodes else 0,
                    "peak_gib": peak_gib(dev),
                }
                rows.append(row)
                mpn = f"{row['ms_per_node']:.2f}" if row["ms_per_node"] else "-"
                print(
                    f"{method:<12} {T:>6} {B:>5} {row['s_per_prompt']:>9.3f} {mpn:>8} "
                    f"{row['nodes']:>6} {row['peak_gib']:>9.2f}"
                )
    out = Path(__file__).parent / "results" / ("gpu-tiny.json" if args.tiny else "gpu.json")
    out.parent.mkdir(exist_ok=True)
    meta = {
        "shapes": "tiny" if args.tiny else "llama-3.1-8b",
        "device": dev,
        "device_name": torch.cuda.get_device_name()
        if dev.startswith("cuda")
        else platform.processor(),
        "dtype": str(dtype),
        "k": args.k,
        "max_nodes": cap,
        "features": features if tc is not None else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
